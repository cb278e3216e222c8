"""The fast backend: FP8 linear layers, a chosen attention kernel, torch.compile per shape bucket, CUDA graphs.

Every optimisation is a switch (gpt-fast style), applied in this order so the benchmark can show what each
buys: `fp8` (e4m3 weights, per-output-channel scales, per-token dynamic activation scales), `attn`
(SDPA kernel choice), `compile` (torch.compile, one graph per shape bucket, compiled at warm-up and counted),
`cudagraphs` (compile's reduce-overhead mode).

FP8 primitives (Fp8Linear, per-token activation scales, emulation where FP8 GEMMs are missing) live in
wanrt.runtime.fp8. The backend is told its device and refuses experts that are not where the memory plan
puts them (an expert left on the host would be quantised for emulation and run with host weights against
device inputs). On the GPU path experts are quantised in place, never copied (a 14B expert is 28.6 GB).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from wanrt.runtime.fp8 import adopt_fp8_linears, fp8_mode, set_fp8_mode, swap_fp8_linears

ATTENTION = {
    "sdpa": None,  # let PyTorch choose
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False  # decided without touching CUDA
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()  # "cuda" means the current device
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index


def check_expert_device(name: str, expert: torch.nn.Module, device: torch.device, expected: str = "") -> None:
    """ValueError naming the expert and both devices when any of its tensors is not on `device`."""
    expected = expected or (f"the pipeline runs on {device}: move it there first, or build the backend with "
                            "offload=True for experts that wait on the host (the runtime factory does so for an "
                            "offload plan)")
    for t in list(expert.parameters()) + list(expert.buffers()):
        if not _same_device(t.device, device):
            raise ValueError(f"compiled backend: the {name}-noise expert is on {t.device} but {expected}")


@dataclass
class CompiledStats:
    fp8_layers: dict = field(default_factory=dict)
    fp8_mode: str = "off"
    fast_accum: bool = False
    attention: str = "sdpa"
    compiled: bool = False
    compile_off: str = ""  # why compile was asked for and not done
    cudagraphs: bool = False
    shapes_seen: set = field(default_factory=set)
    compiles: int = 0


class CompiledBackend:
    """`device`: where the pipeline runs (the runtime factory passes it; left out, where the high-noise expert
    is). Without `offload` every expert must be on `device`. With `offload` (the memory plan's one expert at
    a time) they wait on the host, and an ExpertSwapper built after this backend brings each onto `device`
    for its steps; FP8 quantisation then runs on `device` one layer at a time and the FP8 weights stay on
    the host, so the device never holds more than one layer extra, and no CUDA graphs (every swap moves the
    weights they would capture). `streamed`: block streaming runs the experts (implies offload; no compile).
    `fast_accum`: _scaled_mm's fast FP8 accumulation."""

    name = "compiled"

    def __init__(self, model, device: str | torch.device | None = None, fp8: bool = True, attn: str = "sdpa",
                 compile: bool = True, cudagraphs: bool = True, fast_accum: bool = True, offload: bool = False,
                 streamed: bool = False):
        import copy

        if attn not in ATTENTION:
            raise ValueError(f"attn must be one of {', '.join(ATTENTION)}")
        device = torch.device(device) if device is not None else next(model.transformer_high.parameters()).device
        offload = offload or streamed
        self.device, self.offload = device, offload
        self.stats = CompiledStats(attention=attn)
        if compile and streamed:
            compile, self.stats.compile_off = False, "block streaming moves each block's weights around its forward"
        for name, module in model.experts.items():  # before any copy, quantisation or CUDA call
            if offload:
                check_expert_device(name, module, torch.device("cpu"),
                                    f"with offload it must wait on the host (cpu); the swapper brings it to {device}")
            else:
                check_expert_device(name, module, device)
        mode_fp8 = fp8_mode(device)
        self.experts = {}
        for name, module in model.experts.items():
            # An FP8 checkpoint's linears are FP8 whatever `fp8` says: run them the way this device can.
            adopted = adopt_fp8_linears(module, mode_fp8, fast_accum) + set_fp8_mode(module, mode_fp8)
            if fp8:
                # CPU (tests, the tiny model): swap a copy, so the served model keeps its full-precision experts
                # for the eager reference. Elsewhere in place: a 14B expert is 28.6 GB, a copy would double it.
                if device.type == "cpu" and not offload:
                    module = copy.deepcopy(module)
                self.stats.fp8_layers[name] = swap_fp8_linears(module, mode_fp8 == "emulate", use_fast_accum=fast_accum,
                                                               quantize_on=device if offload else None, mode=mode_fp8)
            if fp8 or adopted:
                self.stats.fp8_mode = {"emulate": "emulated"}.get(mode_fp8, mode_fp8)
                self.stats.fast_accum = fast_accum and mode_fp8 == "scaled_mm"
            if compile:
                # CUDA graphs capture weight addresses; swapped experts change them.
                graphs = cudagraphs and device.type == "cuda" and not offload
                mode = "reduce-overhead" if graphs else "max-autotune-no-cudagraphs"
                module = torch.compile(module, mode=mode, dynamic=False, fullgraph=False)
                self.stats.compiled, self.stats.cudagraphs = True, mode == "reduce-overhead"
            self.experts[name] = module
        self._backends = None
        if ATTENTION[attn] is not None:
            from torch.nn.attention import SDPBackend

            self._backends = [getattr(SDPBackend, ATTENTION[attn])]

    def _attention_context(self):
        if self._backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._backends)

    @torch.inference_mode()
    def denoise(self, expert: str, latent_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        key = (expert, tuple(latent_input.shape), tuple(context.shape))
        if key not in self.stats.shapes_seen:
            self.stats.shapes_seen.add(key)
            if self.stats.compiled:
                self.stats.compiles += 1  # one graph per expert per shape bucket, at warm-up
        with self._attention_context():
            return self.experts[expert](hidden_states=latent_input, timestep=timestep,
                                        encoder_hidden_states=context, return_dict=False)[0]

    def describe(self) -> dict:
        s = self.stats
        out = {"backend": "compiled", "device": str(self.device), "fp8": s.fp8_mode, "fp8_layers": s.fp8_layers,
               "fp8_fast_accum": s.fast_accum, "attention": s.attention,
               "compiled": s.compiled, "cudagraphs": s.cudagraphs, "shape_buckets": len(s.shapes_seen)}
        if s.compile_off:
            out["compile_off"] = s.compile_off
        if s.compiled:
            from torch._dynamo.utils import counters

            out["dynamo_graphs"] = int(counters["stats"]["unique_graphs"])  # recompiles show up here
        return out

"""The fast backend: FP8 linear layers, a chosen attention kernel, torch.compile per shape bucket, CUDA graphs.

Every optimisation is a switch (gpt-fast style), applied in this order so the benchmark can show what each
buys: `fp8` (e4m3 weights, per-output-channel scales, per-token dynamic activation scales), `attn`
(SDPA kernel choice), `compile` (torch.compile, one graph per shape bucket, compiled at warm-up and counted),
`cudagraphs` (compile's reduce-overhead mode).

FP8 on the GPU uses torch._scaled_mm (Hopper/Ada, row-wise scales). Activation scales are per token, so the
cond and uncond halves of a CFG batch never share (and overwrite) a scale, the trap peers fell into. Where
FP8 GEMMs are not available (CPU, older GPUs) the same quantisation is emulated in higher precision, so CPU
tests run the same code path and measure the same rounding.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

from wanrt.engine_build.quantize import DEFAULT_INCLUDE, FP8, FP8_MAX, quantize_weight

ATTENTION = {
    "sdpa": None,  # let PyTorch choose
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def fp8_gemm_supported(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(torch.nn.Module):
    """y = x W^T + b with W in e4m3 (per-output-channel scale) and x quantised per token on the fly."""

    def __init__(self, linear: torch.nn.Linear, emulate: bool):
        super().__init__()
        q, scale = quantize_weight(linear.weight.data, "channel")
        self.register_buffer("weight_fp8", q.to(linear.weight.device))
        self.register_buffer("weight_scale", scale.to(linear.weight.device, torch.float32))  # (out, 1)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        self.emulate = emulate

    @staticmethod
    def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x32 = x.float()
        scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # one per token
        return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = self.quantize_activation(x2)
        if self.emulate:
            w = self.weight_fp8.float() * self.weight_scale
            y = (xq.float() * xs) @ w.t()
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(self.out_dtype if x.dtype == torch.float32 else x.dtype)
        else:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale.t(),
                                 out_dtype=torch.bfloat16)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def swap_fp8_linears(expert: torch.nn.Module, emulate: bool, include: str = DEFAULT_INCLUDE) -> int:
    pattern = re.compile(include)
    targets = [name for name, m in expert.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(name)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = expert.get_submodule(parent_name) if parent_name else expert
        setattr(parent, child, Fp8Linear(getattr(parent, child), emulate))
    return len(targets)


@dataclass
class CompiledStats:
    fp8_layers: dict = field(default_factory=dict)
    fp8_mode: str = "off"
    attention: str = "sdpa"
    compiled: bool = False
    cudagraphs: bool = False
    shapes_seen: set = field(default_factory=set)
    compiles: int = 0


class CompiledBackend:
    name = "compiled"

    def __init__(self, model, fp8: bool = True, attn: str = "sdpa", compile: bool = True, cudagraphs: bool = True):
        import copy

        if attn not in ATTENTION:
            raise ValueError(f"attn must be one of {', '.join(ATTENTION)}")
        device = next(model.transformer_high.parameters()).device
        self.stats = CompiledStats(attention=attn)
        self.experts = {}
        for name, expert in model.experts.items():
            module = expert
            if fp8:
                module = copy.deepcopy(expert) if device.type == "cpu" else expert  # on GPU: in place, no 2nd copy
                emulate = not fp8_gemm_supported(device)
                self.stats.fp8_layers[name] = swap_fp8_linears(module, emulate)
                self.stats.fp8_mode = "emulated" if emulate else "scaled_mm"
            if compile:
                mode = "reduce-overhead" if (cudagraphs and device.type == "cuda") else "max-autotune-no-cudagraphs"
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
        out = {"backend": "compiled", "fp8": s.fp8_mode, "fp8_layers": s.fp8_layers, "attention": s.attention,
               "compiled": s.compiled, "cudagraphs": s.cudagraphs, "shape_buckets": len(s.shapes_seen)}
        if s.compiled:
            from torch._dynamo.utils import counters

            out["dynamo_graphs"] = int(counters["stats"]["unique_graphs"])  # recompiles show up here
        return out

"""Memory plan: both experts resident when they fit; otherwise one expert on the GPU at a time, the other
in pinned host memory (a later tier streams blocks).

The plan counts what will really be on the device, part by part (model/sizes.py): each expert at its
storage precision (1 byte/param + row scales for the FP8 linears, 2 bytes in BF16), the text encoder,
the VAE, the activation workspace of the largest warm-up bucket, and a fixed overhead. Parts are not all
there at once: the request runs in phases (text encode, VAE encode, the loop, VAE decode; loading before
them), and the plan needs the largest phase to fit. The text encoder runs once per request, so when
keeping it would not fit, the plan says it must leave the device after encoding.

With offload, the swap happens once per request at the high->low boundary, and the high-noise expert for the
next request is copied back on a side stream while the VAE decodes (`after_loop`), so the copy overlaps work
instead of adding to it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from wanrt.model import sizes

GiB = sizes.GiB
DEFAULT_BUCKET = "640x640x81"  # the seed's default request: 21x40x40 = 33,600 tokens
# Not in the formulas: cuBLAS/cuDNN workspaces, the caching allocator's fragmentation and rounding,
# compiled kernels' scratch. A flat allowance rather than a percentage: it does not grow with the weights.
OVERHEAD_BYTES = 2 * GiB
PHASES = ("load", "text", "vae_encode", "loop", "vae_decode")


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors_of(module))


@dataclass(frozen=True)
class MemoryPlan:
    mode: str  # "resident" or "offload"
    need_bytes: int  # the largest phase (overhead included)
    free_bytes: int | None
    reason: str
    parts: dict = field(default_factory=dict)  # bytes by part (see model_parts)
    phases: dict = field(default_factory=dict)  # device bytes at each phase's peak
    fits: bool = True  # False: even the smallest tier does not fit (block streaming, a later tier, would)
    text_encoder_resident: bool = True  # False: move the text encoder off the device after encoding

    def table(self) -> str:
        rows = [f"{k:<22}{v / GiB:>8.2f} GiB" for k, v in self.parts.items()]
        rows += [f"phase {k:<16}{v / GiB:>8.2f} GiB" for k, v in self.phases.items()]
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes / GiB:.2f} GiB"
        return "\n".join([f"{self.mode}: need {self.need_bytes / GiB:.2f} GiB, free {free} ({self.reason})", *rows])


# --------------------------------------------------------------------------------------------- byte model
def model_parts(dtype_bytes: int = 2, fp8: bool = False, bucket: str = DEFAULT_BUCKET, expert_config=None,
                text_config=None, text_tied: bool = True, vae_params: int = sizes.WAN21_VAE_PARAMS,
                vae_base_dim: int = 96, batch: int = 2) -> dict[str, int]:
    """Device bytes of each part for one shape bucket ("WxHxF"). Weights: experts at their storage
    precision, `expert_load` at the model dtype (how they arrive from the loaders), text encoder in the
    model dtype with its `wo` projections in fp32 and tied embeddings (as our loaders build it), VAE in fp32. Workspaces: model/sizes.py (the
    VAE's scale with its channel width, measured at the real base dim 96)."""
    e = sizes.expert_params(expert_config)
    c = {**sizes.A14B_EXPERT, **(expert_config or {})}
    t = {**sizes.UMT5_XXL, **(text_config or {})}
    w, h, _ = (int(v) for v in bucket.lower().split("x"))
    tokens = sizes.bucket_tokens(bucket)
    expert = e.bytes(dtype_bytes, fp8=fp8)
    return {
        "expert_high": expert,
        "expert_low": expert,
        "expert_load": e.bytes(dtype_bytes),
        "text_encoder": sizes.umt5_bytes(text_config, dtype_bytes, tied=text_tied),
        "vae": vae_params * 4,
        "text_workspace": sizes.text_workspace_bytes(batch, d_model=t["d_model"], d_ff=t["d_ff"], heads=t["num_heads"]),
        "vae_encode_workspace": sizes.vae_encode_workspace_bytes(w, h) * vae_base_dim // 96,
        "loop_workspace": sizes.loop_workspace_bytes(
            tokens, batch, dim=c["num_attention_heads"] * c["attention_head_dim"], ffn=c["ffn_dim"],
            head_dim=c["attention_head_dim"], act_bytes=dtype_bytes),
        "vae_decode_workspace": sizes.vae_decode_workspace_bytes(w, h) * vae_base_dim // 96,
        "overhead": OVERHEAD_BYTES,
    }


def phase_bytes(parts: dict[str, int], mode: str, text_encoder_resident: bool = True,
                fp8_at_load: bool = False) -> dict[str, int]:
    """Device bytes at each phase of a request. resident: both experts throughout; offload: one (the next
    request's first expert is prefetched during the decode, so it is there while the text encodes).
    load: the loaders put each expert on the device in the model dtype and the FP8 swap runs afterwards,
    so both arrive at BF16 size unless `fp8_at_load` (quantised on the host, or one expert at a time);
    with offload the experts load on the host."""
    if mode == "resident":
        experts = parts["expert_high"] + parts["expert_low"]
        load = (experts if fp8_at_load else 2 * parts["expert_load"])
    else:
        experts = max(parts["expert_high"], parts["expert_low"])
        load = 0
    base = parts["vae"] + parts["overhead"]
    te = parts["text_encoder"] if text_encoder_resident else 0
    return {
        "load": load + parts["text_encoder"] + base,
        "text": experts + parts["text_encoder"] + parts["text_workspace"] + base,
        "vae_encode": experts + te + parts["vae_encode_workspace"] + base,
        "loop": experts + te + parts["loop_workspace"] + base,
        "vae_decode": experts + te + parts["vae_decode_workspace"] + base,
    }


def decide(parts: dict[str, int], free_bytes: int | None, fp8_at_load: bool = False,
           requested: str = "auto") -> MemoryPlan:
    """The first tier that fits, in order: resident with the text encoder kept, resident with the text
    encoder leaving after encoding, offload with it kept, offload with it leaving. None fits: offload,
    fits=False (the reason says by how much). A requested mode is priced the same way, alone."""
    modes = ("resident", "offload") if requested == "auto" else (requested,)
    tried = []
    for mode in modes:
        for keep_te in (True, False):
            phases = phase_bytes(parts, mode, keep_te, fp8_at_load)
            need = max(phases.values())
            tried.append((mode, keep_te, phases, need))
            if free_bytes is None or need <= free_bytes:
                peak = max(phases, key=phases.get)
                how = "requested" if requested != "auto" else "fits"
                te = "" if keep_te else ", text encoder off the device after encoding"
                free = "" if free_bytes is None else f" of {free_bytes / GiB:.1f} GiB free"
                return MemoryPlan(mode, need, free_bytes, f"{how}: {need / GiB:.1f} GiB at {peak}{free}{te}",
                                  dict(parts), phases, True, keep_te)
    mode, keep_te, phases, need = tried[-1]
    return MemoryPlan(mode, need, free_bytes,
                      f"{'requested; ' if requested != 'auto' else ''}does not fit: {mode} needs {need / GiB:.1f} GiB at {max(phases, key=phases.get)}, "
                      f"{free_bytes / GiB:.1f} GiB free (block streaming needed)",
                      dict(parts), phases, False, keep_te)


# --------------------------------------------------------------------------------------------- planners
def choose_plan(model, device: str | torch.device, free_bytes: int | None = None, bucket: str = DEFAULT_BUCKET,
                fp8_at_load: bool = True) -> MemoryPlan:
    """The plan for a model already built (weights measured, workspaces from its config). CPU without
    free_bytes: always resident (host memory)."""
    device = torch.device(device)
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if free_bytes is None:
        return MemoryPlan("resident", 0, None, "host memory")
    cfg = model.transformer_high.config
    expert_config = {k: getattr(cfg, k) for k in sizes.A14B_EXPERT if hasattr(cfg, k)}
    t = model.text_encoder.config
    parts = model_parts(bucket=bucket, expert_config=expert_config,
                        text_config=dict(d_model=t.d_model, d_ff=t.d_ff, num_heads=t.num_heads),
                        vae_base_dim=model.vae.config.base_dim)
    parts.update(expert_high=module_bytes(model.transformer_high), expert_low=module_bytes(model.transformer_low),
                 text_encoder=module_bytes(model.text_encoder), vae=module_bytes(model.vae))
    parts["expert_load"] = max(parts["expert_high"], parts["expert_low"])
    return decide(parts, free_bytes, fp8_at_load)


def estimate_plan(spec: str, device, dtype, requested: str = "auto", *, fp8: bool = False,
                  warmup: tuple[str, ...] = (), free_bytes: int | None = None, fp8_at_load: bool = False) -> MemoryPlan:
    """The plan before loading anything (loading both experts onto a 24 GB card would fail first).

    fp8: the experts will be stored in FP8 (compiled backend with fp8 on). warmup: the "WxHxF" buckets the
    worker warms up; the largest sets the activation workspace (default 640x640x81). free_bytes: the
    device's free memory (default: asked from CUDA). fp8_at_load: the experts reach the device already in
    FP8 (otherwise both arrive in `dtype` first, as the loaders do today)."""
    device = torch.device(device)
    if spec == "tiny" or (device.type != "cuda" and free_bytes is None):
        return MemoryPlan(requested if requested in ("resident", "offload") else "resident", 0, None,
                          "requested" if requested in ("resident", "offload") else "CPU or tiny model")
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    bucket = max(warmup or (DEFAULT_BUCKET,), key=sizes.bucket_tokens)
    parts = model_parts(torch.tensor([], dtype=dtype).element_size(), fp8=fp8, bucket=bucket)
    return decide(parts, free_bytes, fp8_at_load, requested if requested in ("resident", "offload") else "auto")


# --------------------------------------------------------------------------------------------- expert swap
def _tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class ExpertSwapper:
    """Keeps at most one expert on `device`; every expert keeps one host copy (pinned when the device is
    CUDA), made once here. Weights never change, so evicting is dropping the device tensors (`param.data`
    goes back to the host copy) and loading is one copy in; nothing is ever copied back.

    Build it after any module surgery (the FP8 swap): it holds the experts' tensors as they are now.
    On CUDA a prefetch allocates on the compute stream (so it reuses what the evicted expert freed, in
    stream order), copies on a side stream that first waits for the compute stream, `record_stream`s the
    new tensors to the side stream (never handed out again before the copy ends), and records an event
    that the compute stream waits for before the expert's first forward. On CPU copies are synchronous."""

    def __init__(self, experts: dict[str, torch.nn.Module], device, log: list | None = None):
        self.experts = experts
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.log = log if log is not None else []
        self.copies: Counter = Counter()  # "host": host copies made (once per tensor); "to_device": tensors copied in
        self.seconds: Counter = Counter()  # host-side time in load/prefetch (copies are async on CUDA)
        self.resident: str | None = None
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pending: torch.cuda.Event | None = None
        self._host: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, module in experts.items():
            pairs = []
            for t in _tensors_of(module):
                host = t.data
                if host.device.type != "cpu":
                    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=self.cuda)
                    host = pinned.copy_(host)
                    self.copies["host"] += 1
                elif self.cuda and not host.is_pinned():
                    host = host.pin_memory()
                    self.copies["host"] += 1
                t.data = host  # drops a device copy, if the expert arrived on the device
                pairs.append((t, host))
            self._host[name] = pairs
            self.log.append(("host", name))

    def _evict(self, name: str) -> None:
        for t, host in self._host[name]:
            t.data = host
        if self.resident == name:
            self.resident = None
        self.log.append(("evict", name))

    def _copy_in(self, name: str, side_stream: bool) -> None:
        t0 = time.perf_counter()
        pairs = self._host[name]
        # Allocated on the current (compute) stream: reuses, in stream order, what the evicted expert freed.
        device_copies = [torch.empty(host.shape, dtype=host.dtype, device=self.device) for _, host in pairs]
        if side_stream:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the evicted expert's last use
            with torch.cuda.stream(self._stream):
                for dev, (_, host) in zip(device_copies, pairs, strict=True):
                    dev.copy_(host, non_blocking=True)
                    dev.record_stream(self._stream)
                self._pending = torch.cuda.Event()
                self._pending.record(self._stream)
        else:
            for dev, (_, host) in zip(device_copies, pairs, strict=True):
                dev.copy_(host, non_blocking=self.cuda)  # pinned -> async, ordered before the next kernels
        for dev, (t, _) in zip(device_copies, pairs, strict=True):
            t.data = dev
        self.copies["to_device"] += len(pairs)
        self.resident = name
        self.seconds["side" if side_stream else "compute"] += time.perf_counter() - t0

    def ensure(self, name: str) -> torch.nn.Module:
        """Make `name` the resident expert (the compute stream waits for a prefetch of it)."""
        if self._pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending)
            self._pending = None
        if self.resident != name:
            if self.resident is not None:
                self._evict(self.resident)
            self._copy_in(name, side_stream=False)
            self.log.append(("load", name))
        return self.experts[name]

    def prefetch(self, name: str) -> None:
        """Start copying `name` to the device on the side stream (evicting the other first)."""
        if self.resident == name:
            return
        if self.resident is not None:
            self._evict(self.resident)
        self._copy_in(name, side_stream=self._stream is not None)
        self.log.append(("prefetch", name))


class OffloadingBackend:
    """Wraps any backend built on the same expert modules: swaps experts as the steps need them and, after
    the loop, prefetches the next request's first expert while the VAE decodes."""

    def __init__(self, inner, swapper: ExpertSwapper, first_expert: str = "high"):
        self.inner, self.swapper, self.first_expert = inner, swapper, first_expert
        self.name = f"{getattr(inner, 'name', 'backend')}+offload"

    def denoise(self, expert: str, latent_input, timestep, context):
        self.swapper.ensure(expert)
        return self.inner.denoise(expert, latent_input, timestep, context)

    def after_loop(self) -> None:
        self.swapper.prefetch(self.first_expert)

    def describe(self) -> dict:
        inner = self.inner.describe() if hasattr(self.inner, "describe") else {"backend": getattr(self.inner, "name", "?")}
        return {**inner, "memory": "offload", "resident": self.swapper.resident}

"""Attention for the compiled backend's `attn` switch: which SDPA kernel PyTorch picks, what `auto` means, and
FP8 attention through cuDNN (`cudnn_fp8`).

- `kernel_report`: for Q/K/V of a shape, dtype and device, which kernels can run them (each tried alone under
  `sdpa_kernel`, with the reasons PyTorch gives when one cannot) and the one PyTorch would choose
  (`torch._fused_sdp_choice`, what F.scaled_dot_product_attention dispatches on). On the CPU the choice is
  PyTorch's CPU flash kernel or math; efficient and cuDNN are CUDA kernels and are reported unavailable there.
- `resolve`: `auto` on Hopper (SM 9.x), where PyTorch can run cuDNN attention at the model's head dim, is cuDNN or
  flash attention, whichever measures faster: `measured_plan` times both once per process and attention shape
  (a few calls at the real shape, on the first denoise of each shape bucket) and puts the faster first in
  priority, PyTorch's other kernels behind it as fallbacks. Elsewhere `auto` is PyTorch's own choice. A named
  kernel (`flash`, `efficient`, `cudnn`, `math`) is that kernel alone, as before.
- `cudnn_fp8`: Q, K and V quantised to e4m3 with one scale per tensor, cuDNN's FP8 flash attention
  (nvidia-cudnn-frontend's `sdpa_fp8`), the output in e4m3 at V's scale (a convex combination of V rows
  cannot exceed V's amax) and dequantised to BF16. `torch.ops.wanrt.cudnn_fp8_sdpa` holds it: a custom op with
  a fake implementation, so torch.compile traces through it without a graph break and Inductor calls it as one
  opaque kernel; under CUDA graphs the cuDNN plan must exist before capture (the warm-up call builds it). Only
  the experts' self-attention uses it (cross-attention to 512 text tokens is ~1.5% of the FLOPs).
  `build_fp8_attention` refuses without a GPU that has FP8 attention or without cudnn-frontend, and refuses
  when the op's PSNR against BF16 attention on the same Q/K/V is below FP8_MIN_PSNR_DB.
- `fuse_projections`: the experts' Q/K/V projections fused as diffusers' WanAttention.fuse_projections does
  (self-attention to_qkv, cross-attention to_kv), with row views left under the old names for LoRA slots; the
  processors here and in runtime/parallel.py read them through diffusers' `_get_qkv_projections`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import statistics
import threading
import warnings
from dataclasses import dataclass

import torch

from wanrt.runtime.fp8 import FP8, FP8_MAX, _to_fp8, fuse_linears, is_row_view, row_views

KERNELS = {"sdpa": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
           "math": "MATH"}
CHOICES = ("auto", *KERNELS, "cudnn_fp8")
# Wan 2.2 A14B self-attention at 640x640x81 with CFG: 21 latent frames x 40 x 40 patches.
WAN_SELF_ATTENTION = {"batch": 2, "heads": 40, "tokens": 33_600, "head_dim": 128}
FP8_MIN_PSNR_DB = 40.0
FP8_CHECK_TOKENS = 33_600  # the gate runs one CFG half at Wan's length: P's rounding depends on it
FP8_SCALE_S = 256.0  # softmax tiles are in [0, 1] (max 1 per row): x256 keeps them in e4m3's normal range
_AUTO_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
HOPPER_CANDIDATES = ("cudnn", "flash")  # what `auto` measures on Hopper (cuDNN first: it wins ties)
MEASURE_ITERS = 3  # timed calls per kernel, after one warm-up: ~0.1 s each at Wan's 33,600 tokens


# --------------------------------------------------------------------------------------------- which kernel
def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, KERNELS[name])


def chosen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel F.scaled_dot_product_attention runs for (B, H, S, D) q, k, v under the active `sdpa_kernel`
    context: flash, efficient, cudnn or math (the CPU has a flash kernel of its own)."""
    from torch.nn.attention import SDPBackend

    choice = SDPBackend(torch._fused_sdp_choice(q, k, v))
    return {KERNELS[n]: n for n in KERNELS if KERNELS[n]}.get(choice.name, choice.name.lower())


def can_run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Whether kernel `name` alone can run q, k, v; when not, the reasons PyTorch gives (its warnings)."""
    from torch.nn.attention import sdpa_kernel

    error = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([_sdp_backend(name)]):
                ok = chosen_kernel(q, k, v) == name
        except RuntimeError as e:  # no kernel left: PyTorch warned why each one cannot
            ok, error = False, str(e)
    reasons = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
    return ok, "" if ok else (reasons or error or f"PyTorch chose another kernel over {name}")


def kernel_report(batch: int = 2, heads: int = 40, tokens: int = 33_600, head_dim: int = 128,
                  dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                  kv_tokens: int | None = None, measure: bool = True) -> dict:
    """Which SDPA kernels can run this attention, which one PyTorch picks, and what `auto` and `cudnn_fp8`
    resolve to here. The tensors are allocated, never written (the choice reads shapes, strides, dtypes and
    the device), so Wan's 2.6 GB of Q/K/V cost no pages on the CPU. Where `auto` measures (Hopper), `measure`
    runs (or reads, once per process) its timing at this self-attention shape: auto.measured_ms."""
    device = torch.device(device)
    q = torch.empty(batch, heads, tokens, head_dim, dtype=dtype, device=device)
    kv = q if kv_tokens is None else torch.empty(batch, heads, kv_tokens, head_dim, dtype=dtype, device=device)
    kernels = {}
    for name in ("flash", "efficient", "cudnn", "math"):
        ok, why = can_run(name, q, kv, kv)
        kernels[name] = {"available": ok} | ({} if ok else {"why_not": why[:400]})
    chosen = chosen_kernel(q, kv, kv)
    del q, kv  # a measurement allocates (and writes) its own
    plan = resolve("auto", device, heads=heads, head_dim=head_dim, dtype=dtype)
    auto = {"kernel": plan.kernel, "reason": plan.reason}
    if plan.measure and measure and kv_tokens is None:
        plan, m = measured_plan(plan, batch, heads, tokens, head_dim, dtype, device)
        auto = {"kernel": plan.kernel, "reason": plan.reason, "measured_ms": dict(m.ms)}
    out = {"shape": {"batch": batch, "heads": heads, "tokens": tokens, "kv_tokens": kv_tokens or tokens,
                     "head_dim": head_dim},
           "dtype": str(dtype).removeprefix("torch."), "device": str(device), "torch": torch.__version__,
           "chosen": chosen, "kernels": kernels, "auto": auto,
           "cudnn_fp8": fp8_unavailable(device) or "available (the PSNR gate runs when a backend is built)"}
    if device.type == "cpu":
        out["note"] = "CPU: PyTorch's own flash kernel or math; efficient and cuDNN attention are CUDA kernels"
    else:
        out["capability"] = list(torch.cuda.get_device_capability(device))
        out["cudnn"] = torch.backends.cudnn.version()
    return out


# --------------------------------------------------------------------------------------------- attn -> plan
@dataclass(frozen=True)
class AttentionPlan:
    """`requested`: the `attn` setting; `kernel`: what runs (auto resolved); `backends`: SDPBackend names for
    `sdpa_kernel` (empty: PyTorch's choice); `priority`: they are an order of preference, not a restriction;
    `measure`: kernels `measured_plan` times per attention shape before the first call (`kernel` until then)."""

    requested: str
    kernel: str
    backends: tuple[str, ...] = ()
    priority: bool = False
    reason: str = ""
    measure: tuple[str, ...] = ()

    def first(self, kernel: str, reason: str) -> "AttentionPlan":
        """This plan with `kernel` first (the rest of auto's order behind it where priorities exist), measured."""
        if not self.priority:  # torch < 2.6: the kernel alone
            return dataclasses.replace(self, kernel=kernel, backends=(KERNELS[kernel],), reason=reason, measure=())
        order = (KERNELS[kernel], *(b for b in _AUTO_ORDER if b != KERNELS[kernel]))
        return dataclasses.replace(self, kernel=kernel, backends=order, reason=reason, measure=())

    def context(self):
        if not self.backends:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [getattr(SDPBackend, b) for b in self.backends]
        return sdpa_kernel(backends, set_priority=True) if self.priority else sdpa_kernel(backends)


def _has_set_priority() -> bool:
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def _kernel_runs(name: str, device: torch.device, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether PyTorch's kernel `name` runs the model's heads and head dim here (a short probe sequence)."""
    probe = torch.empty(1, heads, 256, head_dim, dtype=dtype, device=device)
    return can_run(name, probe, probe, probe)


def resolve(attn: str, device: str | torch.device, heads: int = 40, head_dim: int = 128,
            dtype: torch.dtype = torch.bfloat16) -> AttentionPlan:
    """The plan for an `attn` setting on `device` (ValueError for an unknown one). Only `auto` looks at the
    device; it makes no CUDA call unless `device` is a CUDA device."""
    if attn not in CHOICES:
        raise ValueError(f"attn must be one of {', '.join(CHOICES)}, not {attn!r}")
    if attn == "cudnn_fp8":
        return AttentionPlan(attn, attn, reason="self-attention in FP8 through cuDNN; cross-attention: PyTorch's "
                                                "choice")
    if attn != "auto":
        return AttentionPlan(attn, attn, (KERNELS[attn],) if KERNELS[attn] else ())
    device = torch.device(device)
    if device.type != "cuda":
        return AttentionPlan(attn, "sdpa", reason=f"PyTorch's choice ({device.type})")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return AttentionPlan(attn, "sdpa", reason=f"PyTorch's choice (SM {major}.{minor} is not Hopper)")
    ok, why = _kernel_runs("cudnn", device, heads, head_dim, dtype)
    if not ok:
        return AttentionPlan(attn, "sdpa", reason=f"PyTorch's choice (cuDNN attention cannot run here: {why[:200]})")
    # Measured per shape when flash runs too (which wins depends on the cuDNN and torch builds and the shape).
    measure = HOPPER_CANDIDATES if _kernel_runs("flash", device, heads, head_dim, dtype)[0] else ()
    if not _has_set_priority():  # torch < 2.6: cuDNN alone
        return AttentionPlan(attn, "cudnn", ("CUDNN_ATTENTION",), reason="Hopper: cuDNN attention", measure=measure)
    reason = ("Hopper: cuDNN or flash attention, whichever measures faster at each shape (cuDNN until measured), "
              "PyTorch's other kernels behind it") if measure else \
        "Hopper: cuDNN attention first, PyTorch's other kernels behind it"
    return AttentionPlan(attn, "cudnn", _AUTO_ORDER, priority=True, reason=reason, measure=measure)


# --------------------------------------------------------------------------------------------- auto, measured
@dataclass(frozen=True)
class Measurement:
    kernel: str  # the fastest (the first candidate when nothing could be timed)
    ms: dict  # kernel -> median milliseconds of one call; kernels that could not run are absent
    note: str = ""  # why candidates are missing


def choose_kernel(candidates: tuple[str, ...], timer) -> Measurement:
    """The fastest of `candidates` by `timer(name)` -> seconds of one call (a tie goes to the earlier one); a kernel
    whose timer raises RuntimeError (cannot run at this shape, out of memory) is left out."""
    ms, failed = {}, {}
    for name in candidates:
        try:
            ms[name] = round(float(timer(name)) * 1e3, 3)
        except RuntimeError as e:
            failed[name] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    note = "; ".join(f"{k}: {v}" for k, v in failed.items())
    if not ms:
        return Measurement(candidates[0], {}, note)
    return Measurement(min(ms, key=ms.get), ms, note)  # min keeps the first of equal times


def time_sdpa(name: str, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device,
              iters: int = MEASURE_ITERS) -> float:
    """Median seconds of one self-attention call by kernel `name` alone at this shape (CUDA events, after a warm-up
    call that also builds cuDNN's plan). Q, K and V share one random tensor: the timing reads no values."""
    from torch.nn.attention import sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(batch, heads, tokens, head_dim, dtype=dtype, device=device)
    times = []
    with sdpa_kernel([_sdp_backend(name)]):
        sdpa(q, q, q)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            sdpa(q, q, q)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


_MEASURED: dict[tuple, Measurement] = {}  # once per process and shape
_MEASURED_LOCK = threading.Lock()


def measured_plan(plan: AttentionPlan, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                  device, timer=None) -> tuple[AttentionPlan, Measurement | None]:
    """`plan` with the faster of its `measure` kernels first at this self-attention shape, and the measurement
    (None for a plan that measures nothing). Timed once per process and shape (`timer(name)` -> seconds; default
    time_sdpa at this shape, on `device`); later calls read the cache. Call it outside compiled regions and CUDA
    graph capture."""
    if not plan.measure:
        return plan, None
    key = (str(torch.device(device)), batch, heads, tokens, head_dim, str(dtype), plan.measure)
    m = _MEASURED.get(key)
    if m is None:
        with _MEASURED_LOCK:
            m = _MEASURED.get(key)
            if m is None:
                timer = timer or functools.partial(time_sdpa, batch=batch, heads=heads, tokens=tokens,
                                                   head_dim=head_dim, dtype=dtype, device=device)
                m = _MEASURED[key] = choose_kernel(plan.measure, timer)
    times = ", ".join(f"{k} {v:.2f} ms" for k, v in m.ms.items())
    reason = f"measured at {batch}x{heads}x{tokens}x{head_dim}: {times}" if m.ms else "not measured"
    return plan.first(m.kernel, reason + (f" ({m.note})" if m.note else "")), m


# --------------------------------------------------------------------------------------------- FP8 attention
def fp8_unavailable(device: str | torch.device) -> str | None:
    """Why `cudnn_fp8` cannot run on `device` (None when it can be tried)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"attn=cudnn_fp8 needs a CUDA GPU with FP8 attention (Hopper, SM 9.0, or newer) and "
                f"nvidia-cudnn-frontend; the device here is {device}: use attn=auto")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return (f"attn=cudnn_fp8 needs cuDNN's FP8 attention, which needs SM 9.0 (Hopper) or newer; "
                f"{torch.cuda.get_device_name(device)} is SM {major}.{minor}: use attn=auto")
    try:
        import cudnn  # noqa: F401  (nvidia-cudnn-frontend)
    except ImportError as e:
        return (f"attn=cudnn_fp8 needs nvidia-cudnn-frontend's Python API (`pip install nvidia-cudnn-frontend`), "
                f"which does not import here ({e}): use attn=auto")
    return None


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3 x / descale, descale): one fp32 scale for the tensor, kept on x's device (no host sync)."""
    amax = torch.linalg.vector_norm(x, float("inf")).float()
    descale = (amax / FP8_MAX).clamp(min=1e-12).reshape(1, 1, 1, 1)
    return _to_fp8(x, descale), descale


def emulate_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """What the cuDNN FP8 kernel computes, in fp32 on any device ((B, S, H, D) in and out): e4m3 Q, K, V with
    per-tensor scales, the softmax tile exp(s - rowmax) scaled by FP8_SCALE_S and rounded to e4m3 before the
    P @ V GEMM (the row sum stays fp32), the output rounded to e4m3 at V's scale. Flash kernels subtract a
    running max per tile rather than the row's max; the rounding is the same. For CPU tests and estimates."""
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t) for t in (q, k, v))
    qf, kf, vf = ((t8.float() * d).transpose(1, 2) for t8, d in ((q8, dq), (k8, dk), (v8, dv)))
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = (p * FP8_SCALE_S).to(FP8).float() / FP8_SCALE_S
    o = (p8 @ vf) / p.sum(-1, keepdim=True)
    o = (o / dv).to(FP8).float() * dv
    return o.transpose(1, 2).to(q.dtype)


def psnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(max|ref|^2 / MSE)."""
    ref, test = ref.float(), test.float()
    mse = (ref - test).pow(2).mean().item()
    peak = ref.abs().max().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def check_fp8_attention(fn, device: str | torch.device, tokens: int = FP8_CHECK_TOKENS, heads: int = 40,
                        head_dim: int = 128, min_psnr_db: float = FP8_MIN_PSNR_DB, dtype: torch.dtype = torch.bfloat16,
                        seed: int = 0) -> float:
    """PSNR of fn(q, k, v, scale) ((B, S, H, D), as the experts call it) against BF16 SDPA on the same Q/K/V
    (one batch, `tokens`, standard normal); ValueError naming both numbers when it is below `min_psnr_db`."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    scale = head_dim ** -0.5
    with torch.inference_mode():
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        db = psnr_db(ref, fn(q, k, v, scale))
    if not db >= min_psnr_db:
        raise ValueError(f"attn=cudnn_fp8 refused: FP8 attention's PSNR against BF16 attention on the same Q/K/V is "
                         f"{db:.1f} dB, below the {min_psnr_db:.0f} dB threshold (1 x {tokens} tokens x {heads} "
                         f"heads x {head_dim}); use attn=auto")
    return db


class _Fp8Plan:
    """One cuDNN FP8 SDPA graph for one shape: Q/K/V/O (B, S, H, D) in e4m3, declared to cuDNN as BHSD dims with
    BSHD strides, so the experts' layout goes in and comes out without a transpose."""

    def __init__(self, b: int, sq: int, skv: int, h: int, d: int, scale: float, device: torch.device):
        import cudnn

        self.cudnn, self.device = cudnn, device
        dt = cudnn.data_type
        g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT)

        def bshd(name, s):
            return g.tensor(name=name, dim=[b, h, s, d], stride=[s * h * d, d, h * d, 1], data_type=dt.FP8_E4M3)

        def scalar(name):
            return g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)

        self.q, self.k, self.v = bshd("q", sq), bshd("k", skv), bshd("v", skv)
        self.descale_q, self.descale_k, self.descale_v = scalar("descale_q"), scalar("descale_k"), scalar("descale_v")
        self.descale_s, self.scale_s, self.scale_o = scalar("descale_s"), scalar("scale_s"), scalar("scale_o")
        kwargs = dict(q=self.q, k=self.k, v=self.v, descale_q=self.descale_q, descale_k=self.descale_k,
                      descale_v=self.descale_v, descale_s=self.descale_s, scale_s=self.scale_s, scale_o=self.scale_o,
                      attn_scale=scale, use_causal_mask=False)
        try:
            o, _, amax_s, amax_o = g.sdpa_fp8(**kwargs, generate_stats=False)
        except TypeError:  # cudnn-frontend before generate_stats
            o, _, amax_s, amax_o = g.sdpa_fp8(**kwargs, is_inference=True)
        o.set_output(True).set_dim([b, h, sq, d]).set_stride([sq * h * d, d, h * d, 1]).set_data_type(dt.FP8_E4M3)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        self.o, self.amax_s, self.amax_o = o, amax_s, amax_o
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.handle = cudnn.create_handle()
        self.workspace = g.get_workspace_size()
        self.s_scales = (torch.full((1, 1, 1, 1), 1 / FP8_SCALE_S, device=device),
                         torch.full((1, 1, 1, 1), FP8_SCALE_S, device=device))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t) for t in (q, k, v))
        o8 = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=FP8, device=q.device)
        amax = torch.empty(2, 1, 1, 1, dtype=torch.float32, device=q.device)
        workspace = torch.empty(self.workspace, dtype=torch.uint8, device=q.device)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.descale_q: dq, self.descale_k: dk, self.descale_v: dv,
                self.descale_s: self.s_scales[0], self.scale_s: self.s_scales[1], self.scale_o: 1 / dv,
                self.o: o8, self.amax_s: amax[0:1], self.amax_o: amax[1:2]}
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        self.graph.execute(pack, workspace, handle=self.handle)
        out = o8.to(q.dtype)  # exact: every e4m3 value is a bf16 value
        return out.mul_(dv)  # o = o8 / scale_o, computed in fp32 per element, rounded once into q's dtype


_PLANS: dict[tuple, _Fp8Plan] = {}
_PLANS_LOCK = threading.Lock()


def _cudnn_fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    why = fp8_unavailable(q.device)
    if why:
        raise ValueError(why)
    b, sq, h, d = q.shape
    key = (q.device, b, sq, k.shape[1], h, d, float(scale))
    plan = _PLANS.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():  # cuDNN builds its plan with host work: warm up first
            raise RuntimeError(f"cudnn_fp8: no plan for {tuple(q.shape)} yet; run this shape once before capture")
        with _PLANS_LOCK:
            plan = _PLANS.get(key) or _Fp8Plan(b, sq, k.shape[1], h, d, float(scale), q.device)
            _PLANS[key] = plan
    return plan(q.contiguous(), k.contiguous(), v.contiguous())


_IMPL = _cudnn_fp8_sdpa  # what the op runs (tests on the CPU put the emulation here)


@torch.library.custom_op("wanrt::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, S, H, D) tensors in FP8 (per-tensor scales), output in q's dtype."""
    return _IMPL(query, key, value, scale)


@cudnn_fp8_sdpa.register_fake
def _(query, key, value, scale):
    return query.new_empty(query.shape[:-1] + (value.shape[-1],))


def build_fp8_attention(device: str | torch.device, min_psnr_db: float = FP8_MIN_PSNR_DB,
                        tokens: int = FP8_CHECK_TOKENS, heads: int = 40, head_dim: int = 128) -> float:
    """Refuse (ValueError) unless FP8 attention can run on `device` and passes the PSNR gate; returns the PSNR."""
    why = fp8_unavailable(device)
    if why:
        raise ValueError(why)
    return check_fp8_attention(torch.ops.wanrt.cudnn_fp8_sdpa, device, tokens=tokens, heads=heads,
                               head_dim=head_dim, min_psnr_db=min_psnr_db)


# --------------------------------------------------------------------------------------------- in the experts
# Copied from diffusers 0.42.1 diffusers.models.transformers.transformer_wan.WanAttnProcessor.__call__
# (its nested apply_rotary_emb)
def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


# Copied from diffusers 0.42.1 diffusers.models.transformers.transformer_wan.WanAttnProcessor.__call__
# (self-attention: projections, q/k norms, heads, rotary embedding)
def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb=None):
    """(query, key, value) as (B, S, H, D), as diffusers' Wan processor feeds its attention call: shared by the
    processors that replace only that call (FP8 attention here, Ulysses in runtime/parallel.py). Fused
    projections (`fuse_projections`) run as one GEMM through `attn.to_qkv` while `attn.fused_projections`."""
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _apply_rotary_emb(query, *rotary_emb)
        key = _apply_rotary_emb(key, *rotary_emb)
    return query, key, value


class Fp8SelfAttnProcessor:
    """Self-attention through the FP8 op; cross-attention (and masked calls) go to the processor it replaced."""

    def __init__(self, inner):
        self.inner = inner
        self._attention_backend = getattr(inner, "_attention_backend", None)

    # Copied from diffusers 0.42.1 diffusers.models.transformers.transformer_wan.WanAttnProcessor.__call__
    # (self-attention path; the attention call is ours)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)
        out = torch.ops.wanrt.cudnn_fp8_sdpa(query, key, value, query.shape[-1] ** -0.5)
        hidden_states = out.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def install_fp8_attention(expert: torch.nn.Module) -> int:
    """Every block's self-attention (`blocks.N.attn1`) of `expert` through the FP8 op, in place; returns how many."""
    n = 0
    for name, module in expert.named_modules():
        if name.endswith(".attn1") and hasattr(module, "set_processor"):
            if not isinstance(module.processor, Fp8SelfAttnProcessor):
                module.set_processor(Fp8SelfAttnProcessor(module.processor))
            n += 1
    return n


# --------------------------------------------------------------------------------------------- fused projections
def _fusion_groups(attn) -> list[tuple[str, tuple[str, ...]]]:
    """(fused name, parts) as diffusers 0.42's WanAttention.fuse_projections fuses them and its processor
    (_get_qkv_projections, _get_added_kv_projections) reads them: self-attention Q/K/V into to_qkv;
    cross-attention K/V into to_kv (Q reads other tokens); Wan 2.1's image K/V into to_added_kv."""
    groups = [("to_kv", ("to_k", "to_v")) if attn.is_cross_attention else ("to_qkv", ("to_q", "to_k", "to_v"))]
    if getattr(attn, "add_k_proj", None) is not None:
        groups.append(("to_added_kv", ("add_k_proj", "add_v_proj")))
    return groups


def _is_wan_attention(module) -> bool:
    from diffusers.models.transformers.transformer_wan import WanAttention

    return isinstance(module, WanAttention)


def fuse_projections(expert: torch.nn.Module, views: bool = True) -> list[torch.nn.Module]:
    """Fuse the Q/K/V projections of every WanAttention of `expert`, in place, as diffusers' fuse_projections
    (one GEMM where there were three; ours also fuses Fp8Linear parts, and frees them): the parts stay, under
    their names, as row views of the fused layer (fp8.row_views), so LoRA slots still find `attn1.to_q`.
    `views=False` leaves the parts out until `refresh_fused`, for a caller that quantises the fused layers first
    (a view would keep each full-precision fused layer alive until then). Attention whose parts LoRA slots
    already wrap, or that diffusers fused itself, is left alone. Returns the attention modules fused (now or
    by an earlier call)."""
    done = []
    for attn in [m for m in expert.modules() if _is_wan_attention(m)]:
        if getattr(attn, "_wanrt_fused", None):  # an earlier backend on the same model
            done.append(attn)
            continue
        if getattr(attn, "fused_projections", False):
            continue
        groups = _fusion_groups(attn)
        fused = [fuse_linears([getattr(attn, p) for p in parts]) for _, parts in groups]
        if any(f is None for f in fused):
            continue
        attn._wanrt_fused = tuple((name, parts, tuple(getattr(attn, p).out_features for p in parts))
                                  for name, parts in groups)
        for (name, parts), layer in zip(groups, fused, strict=True):
            setattr(attn, name, layer)
            for part in parts:  # and its tensors with it
                delattr(attn, part)
        if views:
            refresh_fused([attn])
        attn.fused_projections = True
        done.append(attn)
    return done


def refresh_fused(attns: list[torch.nn.Module]) -> None:
    """The parts as row views of each fused layer as it is now (quantisation replaces it); a part that a LoRA slot
    wraps keeps its view (inside its wrapper)."""
    for attn in attns:
        for name, parts, sizes in attn._wanrt_fused:
            for part, view in zip(parts, row_views(getattr(attn, name), list(sizes)), strict=True):
                current = getattr(attn, part, None)
                if current is None or is_row_view(current):
                    setattr(attn, part, view)


def fused_attention(expert: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of `expert` that fuse_projections fused."""
    return [m for m in expert.modules() if getattr(m, "_wanrt_fused", None)]


def sync_fused_projections(attns: list[torch.nn.Module]) -> None:
    """diffusers' processor runs a fused layer while `fused_projections`: true while every part is still its bare
    row view. LoRA slots installed afterwards wrap the parts (and the fused layer): the parts then run one by one,
    with their side paths. Called before each forward (outside compiled regions; a change recompiles)."""
    for attn in attns:
        attn.fused_projections = all(is_row_view(getattr(attn, p)) for _, parts, _ in attn._wanrt_fused for p in parts)

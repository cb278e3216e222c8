"""FP8 (e4m3) primitives shared by the compiled backend and `wanrt build` (engine_build imports them from here,
so the runtime never imports engine_build).

Weights: per-output-channel (or per-tensor) scales. Activations: per-token dynamic scales, so the cond and
uncond halves of a CFG batch never share (and overwrite) a scale, the trap peers fell into. On the GPU the
GEMM is torch._scaled_mm (Hopper/Ada, row-wise scales); elsewhere the same quantisation is emulated in higher
precision, so CPU tests run the same code path and measure the same rounding.

GPUs without FP8 tensor cores (Ampere: the RTX 3080/3090, A100) run FP8 weights weight-only: the e4m3 weight
is upcast to the activation dtype one layer at a time at compute time (one BF16 copy of the largest layer
alive, never the expert), and the GEMM runs in BF16. Storage, host memory and PCIe bytes stay FP8's, which is
what lets the 14 GB FP8 files users have fit a 32 GB host and a block stream. The upcast is an opaque op
(`fp8_upcast`): a compiled graph holds no e4m3 cast, which Triton cannot compile there. `fp8_mode(device)` picks.

Fused projections (`fuse_linears`, used by runtime/attention.fuse_projections): layers reading the same input
become one layer with their rows stacked (one GEMM instead of three), and each old layer a row view of it
(`LinearRows`, `Fp8LinearRows`) holding no tensors of its own, so LoRA slots still find `attn1.to_q` by name.

`quantize_torchao`: the same recipe (e4m3, per-row weight scales, per-token dynamic activation scales) through
torchao's Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()): the compiled backend's
`fp8_impl="torchao"`, CUDA SM >= 8.9 only; the CPU emulation stays ours.
"""

from __future__ import annotations

import itertools
import re

import torch

from wanrt.model.keymaps import FP8_DTYPES

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# to_qkv / to_kv: the fused projections (runtime/attention.fuse_projections)
DEFAULT_INCLUDE = (r"^blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_qkv|to_kv|to_out\.0)$"
                   r"|^blocks\.\d+\.ffn\.net\.(0\.proj|2)$")
SCALE_SUFFIX = "weight_scale"


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3, written straight into the e4m3 output: on CUDA the kernel computes each
    element in fp32 and rounds it once, so no full-size fp32 (or bf16) temporary exists (CPU TensorIterator
    stages through fp32 internally; CPU is the emulation path). Same bits as
    `(x.float() / scale).clamp(-448, 448).to(FP8)`: |x| / scale <= 448 by construction of the scale."""
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    return torch.div(x, scale, out=out)


def quantize_weight(w: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (e4m3 weights, fp32 scale) with w ~= q * scale; scale (out, 1) or a scalar."""
    w = w.detach()
    if granularity == "channel":
        amax = torch.linalg.vector_norm(w, float("inf"), dim=1, keepdim=True)
    elif granularity == "tensor":
        amax = torch.linalg.vector_norm(w, float("inf")).reshape(())
    else:
        raise ValueError(f"granularity must be 'channel' or 'tensor', not {granularity!r}")
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
    return _to_fp8(w, scale), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def dequantize_state_dict(sd: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """FP8 artifact -> a plain state dict (what the eager backend runs; compiled/TensorRT use the FP8)."""
    out = {}
    for key, value in sd.items():
        if key.endswith(f".{SCALE_SUFFIX}"):
            continue
        scale = sd.get(key[: -len("weight")] + SCALE_SUFFIX) if key.endswith(".weight") else None
        out[key] = dequantize_weight(value, scale, dtype) if scale is not None else value.to(dtype) if value.is_floating_point() else value
    return out


def fp8_gemm_supported(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


MODES = ("scaled_mm", "emulate", "weight_only")


def fp8_mode(device) -> str:
    """scaled_mm where FP8 GEMMs exist (SM >= 8.9); weight_only on other GPUs (upcast per layer, BF16 GEMM);
    emulate on the CPU (the tests measure the FP8 GEMM's rounding there)."""
    device = torch.device(device)
    if fp8_gemm_supported(device):
        return "scaled_mm"
    return "weight_only" if device.type == "cuda" else "emulate"


@torch.library.custom_op("wanrt::fp8_upcast", mutates_args=())
def fp8_upcast(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight (e4m3) * scale in `dtype`: weight-only FP8's upcast, as one op torch.compile does not trace into.
    Traced, Inductor fuses the cast into a Triton kernel reading an fp8e4nv pointer, which Triton refuses below
    SM 8.9, the GPUs that run weight-only (pytorch/pytorch#167082); opaque, it runs eager's ATen kernels, and
    fullgraph still holds (the fake below gives dynamo the output's shape and dtype)."""
    # e4m3 -> dtype is exact; the in-place multiply computes in fp32 and rounds once (the same bits as
    # dequantize_weight), so only this one layer's weight exists at `dtype`, and only now.
    w = weight.to(dtype, copy=True)  # never the weight itself: the multiply is in place
    return w.mul_(scale)


@fp8_upcast.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(weight, dtype=dtype)  # the strides .to(copy=True) keeps (a transposed view too)


class Fp8Linear(torch.nn.Module):
    """y = x W^T + b with W in e4m3 (per-output-channel scale).

    Modes: `scaled_mm` (x quantised per token on the fly, torch._scaled_mm), `emulate` (the same rounding in
    fp32: CPU), `weight_only` (W upcast to x's dtype for this call, x untouched: GPUs without FP8 GEMMs).
    `emulate` picks between the first two (the original switch); `mode` overrides it.
    `use_fast_accum`: _scaled_mm's faster FP8 accumulation (Hopper), on by default; the emulation ignores it.
    `quantize_on`: where the weight is quantised (default where it is); the result stays where the layer is,
    so host-side experts are quantised on the GPU one layer at a time.
    """

    def __init__(self, linear: torch.nn.Linear | None, emulate: bool = False, use_fast_accum: bool = True,
                 quantize_on: torch.device | str | None = None, mode: str | None = None):
        super().__init__()
        self.mode = mode or ("emulate" if emulate else "scaled_mm")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        self.use_fast_accum = use_fast_accum
        if linear is None:  # from_quantized fills the rest
            return
        w = linear.weight.data
        q, scale = quantize_weight(w if quantize_on is None else w.to(quantize_on), "channel")
        self.register_buffer("weight_fp8", q.to(linear.weight.device))
        self.register_buffer("weight_scale", scale.to(linear.weight.device, torch.float32))  # (out, 1)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the bias's: a weight defer_cast left in its file's precision (FP32) is not the dtype the layer runs in
        self.out_dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype

    @classmethod
    def from_quantized(cls, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       out_dtype: torch.dtype, mode: str = "weight_only", use_fast_accum: bool = True) -> "Fp8Linear":
        """A layer around e4m3 weights that are already quantised (an FP8 checkpoint): the tensors are adopted,
        not copied. `scale`: a scalar (ComfyUI's per-tensor scale_weight) or one per output row."""
        self = cls(None, mode=mode, use_fast_accum=use_fast_accum)
        out_features, in_features = weight_fp8.shape
        scale = scale.to(torch.float32)
        scale = scale.reshape(1, 1).expand(out_features, 1) if scale.numel() == 1 else scale.reshape(out_features, 1)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", scale.contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype = out_dtype
        return self

    @property
    def emulate(self) -> bool:
        return self.mode == "emulate"

    @staticmethod
    def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # amax in x's own dtype (a max is exact in any float format, and vector_norm needs no |x| temporary);
        # only the per-token scale is fp32. A 14B expert's activations are GBs: an fp32 copy would double them.
        amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)
        scale = (amax.float() / FP8_MAX).clamp(min=1e-12)  # one per token
        return _to_fp8(x, scale), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "weight_only":
            w = fp8_upcast(self.weight_fp8, self.weight_scale, x.dtype)  # opaque to torch.compile: see fp8_upcast
            return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
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
            # The bias goes into the GEMM epilogue (BF16, as _scaled_mm wants for a BF16 output).
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale.t(), bias=bias,
                                 out_dtype=torch.bfloat16, use_fast_accum=self.use_fast_accum)
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def _quantizable(include: str):
    """filter(module, name): a full-precision nn.Linear named by `include` (row views are their fused layer's)."""
    pattern = re.compile(include)
    return lambda m, name: (isinstance(m, torch.nn.Linear) and not isinstance(m, _Rows) and bool(pattern.search(name))
                            and m.weight.dtype not in FP8_DTYPES)


def swap_fp8_linears(expert: torch.nn.Module, emulate: bool, include: str = DEFAULT_INCLUDE,
                     use_fast_accum: bool = True, quantize_on: torch.device | str | None = None,
                     mode: str | None = None) -> int:
    """Replace the matching nn.Linear layers of `expert` by Fp8Linear, in place, where they are (each layer's
    BF16 weight is freed as soon as its FP8 copy exists; `quantize_on`, `mode`: see Fp8Linear). Layers that
    are FP8 already (an FP8 checkpoint, `adopt_fp8_linears`) are left as they are. Returns how many of the
    checkpoint's linears now run in FP8 (a fused layer counts its parts)."""
    wanted = _quantizable(include)
    targets = [name for name, m in expert.named_modules() if wanted(m, name)]
    n = 0
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = expert.get_submodule(parent_name) if parent_name else expert
        old = getattr(parent, child)
        new = Fp8Linear(old, emulate, use_fast_accum, quantize_on, mode)
        new.fused_parts = getattr(old, "fused_parts", 1)
        n += new.fused_parts
        setattr(parent, child, new)
    return n


def adopt_fp8_linears(module: torch.nn.Module, mode: str = "weight_only", use_fast_accum: bool = True,
                      out_dtype: torch.dtype | None = None) -> int:
    """nn.Linear layers whose weight a loader left in e4m3 (with its scale in a `weight_scale` buffer, see
    model/loading.py keep_fp8) become Fp8Linear around the same tensors: no copy, no requantisation."""
    targets = [name for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == FP8 and hasattr(m, "weight_scale")]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        lin = getattr(parent, child)
        bias = None if lin.bias is None else lin.bias.data
        dtype = out_dtype or (bias.dtype if bias is not None else torch.bfloat16)
        setattr(parent, child, Fp8Linear.from_quantized(lin.weight.data, lin.weight_scale, bias, dtype, mode,
                                                        use_fast_accum))
    return len(targets)


def fp8_layer_count(module: torch.nn.Module) -> int:
    """The checkpoint's linears of `module` that run in FP8, whoever quantised them (a fused layer counts its
    parts; its row views are not layers of their own)."""
    return sum(getattr(m, "fused_parts", 1) for m in module.modules() if isinstance(m, Fp8Linear) and not is_row_view(m))


def set_fp8_mode(module: torch.nn.Module, mode: str) -> int:
    """Every Fp8Linear of `module` runs in `mode` from now on (the weights stay as they are)."""
    layers = [m for m in module.modules() if isinstance(m, Fp8Linear)]
    for m in layers:
        m.mode = mode
    return len(layers)


# --------------------------------------------------------------------------------------------- fused layers
def fuse_linears(layers: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One layer whose output is the layers' outputs side by side (their rows stacked), or None when they cannot
    be fused: not all plain nn.Linear or all Fp8Linear (a LoRA slot already wraps one), other inputs, dtypes,
    devices, modes or biases. Fp8Linear rows keep their bits: the scales are per output row, so stacking the
    quantised rows is quantising the stacked weight. The parts' tensors are released with the parts."""
    first = layers[0]
    kind = type(first)
    if kind not in (torch.nn.Linear, Fp8Linear) or any(type(m) is not kind for m in layers):
        return None

    def same(get) -> bool:
        return all(get(m) == get(first) for m in layers)

    w_of = (lambda m: m.weight_fp8) if kind is Fp8Linear else (lambda m: m.weight)
    if not (same(lambda m: m.in_features) and same(lambda m: m.bias is None) and same(lambda m: w_of(m).dtype)
            and same(lambda m: w_of(m).device)):
        return None
    with torch.no_grad():
        bias = None if first.bias is None else torch.cat([m.bias.data for m in layers])
        if kind is Fp8Linear:
            if not (same(lambda m: m.mode) and same(lambda m: m.out_dtype) and same(lambda m: m.use_fast_accum)):
                return None
            # concatenated as bytes: cat kernels need not know e4m3
            weight = torch.cat([m.weight_fp8.view(torch.uint8) for m in layers]).view(first.weight_fp8.dtype)
            scale = torch.cat([m.weight_scale for m in layers])
            fused = Fp8Linear.from_quantized(weight, scale, bias, first.out_dtype, first.mode, first.use_fast_accum)
        else:
            weight = torch.cat([m.weight.data for m in layers])
            with torch.device("meta"):  # as diffusers' fuse_projections: no second allocation
                fused = torch.nn.Linear(first.in_features, weight.shape[0], bias=bias is not None)
            fused.weight = torch.nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    fused.fused_parts = len(layers)
    return fused


class _Rows:
    """Rows [start, stop) of a fused layer, with no tensors of its own: the weights exist once, in the fused layer,
    and follow it through .to(), an ExpertSwapper or block streaming. The fused layer is kept out of the module
    tree here (a plain attribute), so state_dicts, byte counts and LoRA slots see it once, under its own name.
    Its forward runs these rows alone: what the attention runs when a LoRA slot wraps this part."""

    def _init_rows(self, fused: torch.nn.Module, start: int, stop: int) -> None:
        torch.nn.Module.__init__(self)
        object.__setattr__(self, "fused", fused)
        self.rows = (start, stop)
        self.in_features, self.out_features = fused.in_features, stop - start

    def _slice(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[self.rows[0]:self.rows[1]]

    def extra_repr(self) -> str:
        return f"rows {self.rows[0]}:{self.rows[1]} of a fused {type(self.fused).__name__}"


class LinearRows(_Rows, torch.nn.Linear):
    """An nn.Linear that is rows of a fused nn.Linear (nn.Linear.forward on the sliced weight and bias)."""

    def __init__(self, fused: torch.nn.Linear, start: int, stop: int):
        self._init_rows(fused, start, stop)

    @property
    def weight(self) -> torch.Tensor:
        return self._slice(self.fused.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._slice(self.fused.bias)


class Fp8LinearRows(_Rows, Fp8Linear):
    """An Fp8Linear that is rows of a fused Fp8Linear (row slices of a row-major weight stay contiguous, as
    _scaled_mm wants); mode and fast accumulation are the fused layer's."""

    def __init__(self, fused: Fp8Linear, start: int, stop: int):
        self._init_rows(fused, start, stop)

    weight_fp8 = property(lambda self: self._slice(self.fused.weight_fp8))
    weight_scale = property(lambda self: self._slice(self.fused.weight_scale))
    bias = property(lambda self: self._slice(self.fused.bias))
    out_dtype = property(lambda self: self.fused.out_dtype)
    mode = property(lambda self: self.fused.mode, lambda self, v: setattr(self.fused, "mode", v))
    use_fast_accum = property(lambda self: self.fused.use_fast_accum,
                              lambda self, v: setattr(self.fused, "use_fast_accum", v))


def row_views(fused: torch.nn.Module, sizes: list[int]) -> list[torch.nn.Module]:
    """The parts of a fused layer as row views, in order (`sizes`: their out_features)."""
    cls = Fp8LinearRows if isinstance(fused, Fp8Linear) else LinearRows
    return [cls(fused, a, b) for a, b in itertools.pairwise(itertools.accumulate(sizes, initial=0))]


def is_row_view(module: torch.nn.Module) -> bool:
    return isinstance(module, _Rows)


# --------------------------------------------------------------------------------------------- torchao
FP8_IMPLS = ("wanrt", "torchao")


def torchao_unavailable(device, offload: bool = False) -> str | None:
    """Why fp8_impl=torchao cannot run here (None when it can): a CUDA GPU with FP8 GEMMs, torchao importable, and
    experts resident (torchao's weights are tensor subclasses; the swapper and block streams move plain tensors)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"fp8_impl=torchao needs a CUDA GPU with FP8 tensor cores (SM 8.9+: Ada, Hopper); the device here is "
                f"{device}: use fp8_impl=wanrt (its FP8 GEMM is emulated off the GPU)")
    if not fp8_gemm_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"fp8_impl=torchao needs FP8 tensor cores (SM 8.9+); {torch.cuda.get_device_name(device)} is SM "
                f"{major}.{minor}: use fp8_impl=wanrt (weight-only FP8 there)")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        return f"fp8_impl=torchao needs torchao >= 0.18 (`pip install torchao`), which does not import here ({e})"
    if offload:
        return "fp8_impl=torchao runs resident experts only (the offload and stream tiers move plain tensors)"
    return None


def quantize_torchao(expert: torch.nn.Module, include: str = DEFAULT_INCLUDE) -> int:
    """torchao's FP8 (per-row weights, per-token dynamic activations) on the layers swap_fp8_linears would take,
    in place. Returns how many of the checkpoint's linears now run in FP8 (a fused layer counts its parts)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    wanted, n = _quantizable(include), 0

    def filter_fn(module, fqn) -> bool:
        nonlocal n
        ok = wanted(module, fqn)
        n += getattr(module, "fused_parts", 1) if ok else 0
        return ok

    # set_inductor_config=False: torchao's recommended settings are process-wide (TF32 for every fp32 matmul, the
    # VAE's included; coordinate-descent tuning, minutes per compile): the switches here stay wanrt's own
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(expert, config, filter_fn=filter_fn)
    return n

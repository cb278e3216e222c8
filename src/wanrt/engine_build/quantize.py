"""FP8 (e4m3) weights with scales for the experts' linear layers, and the quality guard that decides which.

Quantized: the attention projections (q, k, v, out of self- and cross-attention) and the FFN of every block:
>97% of an expert's weights and FLOPs. Kept in BF16: patch embedding, time/text embedders, modulation
tables, norms and the output head: small, and where an error reaches every token (the guard below measures
it; `--fp8-exclude` moves more layers out). Scales are per output channel (default) or per tensor.
Always applied after LoRA fusion (LoRAs merged into FP8 weights lose quality).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# The primitives are shared with the compiled backend, so they live in the runtime.
from wanrt.runtime.fp8 import (  # noqa: F401
    DEFAULT_INCLUDE,
    FP8,
    FP8_MAX,
    SCALE_SUFFIX,
    dequantize_state_dict,
    dequantize_weight,
    quantize_weight,
)


def quantizable_layers(expert, include: str = DEFAULT_INCLUDE, exclude: tuple[str, ...] = ()) -> list[str]:
    inc = re.compile(include)
    excl = [re.compile(e) for e in exclude]
    return [name for name, m in expert.named_modules()
            if isinstance(m, torch.nn.Linear) and inc.search(name) and not any(e.search(name) for e in excl)]


def quantize_expert(expert, granularity: str = "channel", include: str = DEFAULT_INCLUDE,
                    exclude: tuple[str, ...] = (), keep_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """State dict: fp8 `<layer>.weight` + fp32 `<layer>.weight_scale` for quantized layers, every other
    tensor in `keep_dtype` (fp32 where diffusers keeps it in fp32)."""
    layers = set(quantizable_layers(expert, include, exclude))
    keep_fp32 = set(getattr(expert, "_keep_in_fp32_modules", None) or [])
    out = {}
    for key, value in expert.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in layers and key.endswith(".weight"):
            q, scale = quantize_weight(value, granularity)
            out[key], out[f"{module}.{SCALE_SUFFIX}"] = q.contiguous(), scale.contiguous()
        elif value.is_floating_point():
            fp32 = any(part in keep_fp32 for part in key.split("."))
            out[key] = value.detach().to(torch.float32 if fp32 else keep_dtype).contiguous()
        else:
            out[key] = value.detach().contiguous()
    return out


def weight_error(expert, quantized: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative Frobenius error of each quantized weight (cheap enough for 14B experts on the GPU)."""
    errors = []
    for key, value in expert.state_dict().items():
        scale = quantized.get(key[: -len("weight")] + SCALE_SUFFIX) if key.endswith(".weight") else None
        if scale is None:
            continue
        w = value.float()
        d = dequantize_weight(quantized[key].to(w.device), scale.to(w.device))
        errors.append(((w - d).norm() / w.norm().clamp(min=1e-30)).item())
    return {"mean": sum(errors) / max(1, len(errors)), "max": max(errors, default=0.0), "layers": len(errors)}


@torch.no_grad()
def quality_guard_in_place(expert, quantized: dict[str, torch.Tensor], **kw) -> "GuardResult":
    """Same as quality_guard, for experts too big to hold twice (14B on one GPU): the quantized layers'
    weights are swapped in place for their FP8 round trip and restored afterwards (backup on the host)."""
    params = dict(expert.named_parameters())
    keys = [k for k in quantized if k.endswith(f".{SCALE_SUFFIX}")]
    backup = {}

    class _Swapped:
        def __init__(self, swap: bool):
            self.swap = swap

        def __call__(self, **inputs):
            if self.swap and not backup:
                for sk in keys:
                    wk = sk[: -len(SCALE_SUFFIX)] + "weight"
                    backup[wk] = params[wk].data.to("cpu", copy=True)
                    params[wk].data.copy_(dequantize_weight(quantized[wk].to(params[wk].device),
                                                            quantized[sk].to(params[wk].device), params[wk].dtype))
            elif not self.swap and backup:
                for wk, v in backup.items():
                    params[wk].data.copy_(v.to(params[wk].device))
                backup.clear()
            return expert(**inputs)

        config = expert.config
        dtype = expert.dtype

        def parameters(self):
            return expert.parameters()

    try:
        return quality_guard(_Swapped(False), _Swapped(True), **kw)
    finally:
        for wk, v in backup.items():
            params[wk].data.copy_(v.to(params[wk].device))


@dataclass
class GuardResult:
    cosine: float
    rel_error: float
    max_abs_error: float

    def passes(self, min_cosine: float = 0.995) -> bool:
        return self.cosine >= min_cosine


@torch.no_grad()
def quality_guard(reference, candidate, frames: int = 3, height: int = 16, width: int = 16, text_len: int = 512,
                  seed: int = 0, timesteps=(999.0, 500.0, 100.0)) -> GuardResult:
    """Expert output of `candidate` vs `reference` on random latents/contexts at several timesteps."""
    cfg = reference.config
    device = next(reference.parameters()).device
    dtype = reference.dtype
    g = torch.Generator("cpu").manual_seed(seed)
    cos, num, den, mx = [], 0.0, 0.0, 0.0
    for t in timesteps:
        x = torch.randn(1, cfg.in_channels, frames, height, width, generator=g).to(device, dtype)
        c = torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype)
        ts = torch.tensor([t], device=device)
        a = reference(hidden_states=x, timestep=ts, encoder_hidden_states=c, return_dict=False)[0].float()
        b = candidate(hidden_states=x, timestep=ts, encoder_hidden_states=c, return_dict=False)[0].float()
        cos.append(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item())
        num += (a - b).pow(2).sum().item()
        den += a.pow(2).sum().item()
        mx = max(mx, (a - b).abs().max().item())
    return GuardResult(cosine=min(cos), rel_error=(num / max(den, 1e-30)) ** 0.5, max_abs_error=mx)

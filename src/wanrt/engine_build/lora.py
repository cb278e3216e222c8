"""Read LoRAs in the formats users have and fuse them into an expert, exactly, before any quantization.

Formats (detected per key):
- diffusers / peft: `transformer.blocks.0.attn1.to_q.lora_A.weight` + `lora_B` (optional `.alpha`)
- ComfyUI / kohya: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` + `lora_up` + `.alpha`
- kohya underscored: `lora_unet_blocks_0_self_attn_q.lora_down.weight`
- original Wan (DiffSynth): `blocks.0.self_attn.q.lora_A.weight` (also `.lora_A.default.weight`)
- full diffs: `.diff` (weight) and `.diff_b` (bias), as in Lightning / CausVid LoRAs
W' = W + s * (alpha / r) * B @ A in fp32, cast back to W's dtype. Keys that match no layer are an error that
names them, except Wan 2.1 I2V image cross-attention (`k_img`, `v_img`, `norm_k_img`), which Wan 2.2 I2V
does not have: those are reported as skipped.

diffusers' own converter (lora_conversion_utils) scales the caller's tensors in place and does not report
what it matched, so we read the files ourselves; tests hold our fusion equal to diffusers' fuse_lora.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanrt.model import keymaps

WAN21_IMAGE_KEYS = ("k_img", "v_img", "norm_k_img", "add_k_proj", "add_v_proj", "norm_added_k", "img_emb")
_WAN21_IMAGE = re.compile(r"(^|[._])(" + "|".join(WAN21_IMAGE_KEYS) + r")([._]|$)")
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "unet.")
_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|(?P<alpha>alpha)|(?P<diff>diff|diff_b))$")


class LoraError(ValueError):
    pass


@dataclass
class LoraSpec:
    """One `--lora TARGET:PATH:STRENGTH`; target is high, low or both."""

    target: str
    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        parts = text.split(":")
        if len(parts) < 2 or parts[0] not in ("high", "low", "both"):
            raise LoraError(f"--lora {text!r}: expected high|low|both:PATH[:STRENGTH]")
        strength = 1.0
        path = ":".join(parts[1:])
        if len(parts) >= 3:
            try:
                strength = float(parts[-1])
                path = ":".join(parts[1:-1])
            except ValueError:
                pass
        return cls(parts[0], Path(path), strength)

    def applies_to(self, expert: str) -> bool:
        return self.target in ("both", expert)


@dataclass
class LoraLayer:
    module: str  # diffusers module name, e.g. blocks.0.attn1.to_q
    down: torch.Tensor | None = None  # A: (r, in)
    up: torch.Tensor | None = None  # B: (out, r)
    alpha: float | None = None
    diff: torch.Tensor | None = None  # full weight delta
    diff_b: torch.Tensor | None = None  # bias delta

    @property
    def scale(self) -> float:
        if self.down is None or self.alpha is None:
            return 1.0
        return self.alpha / self.down.shape[0]


@dataclass
class FuseReport:
    lora: str
    strength: float
    layers_touched: int = 0
    skipped: list[str] = field(default_factory=list)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _module_name_table(expert) -> dict[str, str]:
    """Every name a LoRA may use for a layer -> its diffusers module name."""
    table = {}
    for name, module in expert.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.LayerNorm)) and not hasattr(module, "weight"):
            continue
        table[name] = name
        original = next(iter(keymaps.transformer_to_original({f"{name}.weight": None})))[: -len(".weight")]
        table[original] = name
        table[original.replace(".", "_")] = name  # kohya lora_unet_ names
    return table


def _strip(key: str) -> str:
    if key.startswith("lora_unet_"):
        return key[len("lora_unet_"):]
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def read_lora(sd: dict[str, torch.Tensor], expert, allow_unmatched: bool = False) -> tuple[dict[str, LoraLayer], list[str]]:
    """Group a LoRA state dict by the expert's layers. Returns (layers, skipped keys)."""
    table = _module_name_table(expert)
    layers: dict[str, LoraLayer] = {}
    unmatched, skipped = [], []
    for key, value in sd.items():
        m = _SUFFIX.match(_strip(key))
        if m is None:
            unmatched.append(key)
            continue
        module_key = m.group("module")
        if _WAN21_IMAGE.search(module_key):
            skipped.append(key)
            continue
        module = table.get(module_key) or table.get(module_key.replace(".", "_"))
        if module is None:
            unmatched.append(key)
            continue
        layer = layers.setdefault(module, LoraLayer(module))
        value = value.detach().to("cpu", torch.float32)  # our own copy: the caller's tensors stay untouched
        if m.group("kind") in ("lora_A", "lora_down"):
            layer.down = value
        elif m.group("kind") in ("lora_B", "lora_up"):
            layer.up = value
        elif m.group("alpha"):
            layer.alpha = float(value.reshape(-1)[0])
        elif m.group("diff") == "diff":
            layer.diff = value
        else:
            layer.diff_b = value
    if unmatched and not allow_unmatched:
        shown = ", ".join(unmatched[:20]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        raise LoraError(f"LoRA keys match no layer of the Wan 2.2 I2V expert: {shown} (--allow-unmatched to ignore)")
    for layer in layers.values():
        if (layer.down is None) != (layer.up is None):
            raise LoraError(f"LoRA layer {layer.module} has only one of lora_A/lora_down and lora_B/lora_up")
    return layers, skipped + (unmatched if allow_unmatched else [])


@torch.no_grad()
def fuse_lora(expert, sd: dict[str, torch.Tensor], strength: float, name: str = "lora",
              allow_unmatched: bool = False) -> FuseReport:
    """W += strength * (alpha/r) * B @ A (and diffs), computed in fp32 on the weight's device."""
    layers, skipped = read_lora(sd, expert, allow_unmatched)
    modules = dict(expert.named_modules())
    report = FuseReport(lora=name, strength=strength, skipped=skipped)
    for layer in layers.values():
        module = modules[layer.module]
        weight = module.weight
        delta = None
        if layer.down is not None:
            down, up = layer.down.to(weight.device), layer.up.to(weight.device)
            if down.ndim > 2:  # conv LoRAs store (r, in, 1, 1, 1)
                down, up = down.flatten(1), up.flatten(1)
            delta = (up @ down) * layer.scale
        if layer.diff is not None:
            delta = layer.diff.to(weight.device) if delta is None else delta + layer.diff.to(weight.device)
        if delta is not None:
            if delta.numel() != weight.numel():
                raise LoraError(f"LoRA layer {layer.module}: delta shape {tuple(delta.shape)} does not fit weight "
                                f"{tuple(weight.shape)}")
            if delta.shape != weight.shape:
                delta = delta.reshape(weight.shape)
            weight.data = (weight.data.float() + strength * delta).to(weight.dtype)
        if layer.diff_b is not None:
            if module.bias is None or module.bias.shape != layer.diff_b.shape:
                raise LoraError(f"LoRA layer {layer.module}: bias delta {tuple(layer.diff_b.shape)} does not fit")
            module.bias.data = (module.bias.data.float() + strength * layer.diff_b.to(module.bias.device)).to(module.bias.dtype)
        report.layers_touched += 1
    return report


def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    from wanrt.model.loading import read_state_dict

    return read_state_dict(Path(path), "cpu")


def fuse_loras(model, specs: list[LoraSpec], allow_unmatched: bool = False) -> dict[str, list[FuseReport]]:
    """Fuse each LoRA into the experts it targets (the file is read anew for each expert)."""
    reports: dict[str, list[FuseReport]] = {"high": [], "low": []}
    for expert_name, expert in model.experts.items():
        for spec in specs:
            if spec.applies_to(expert_name):
                sd = load_lora_file(spec.path)
                reports[expert_name].append(fuse_lora(expert, sd, spec.strength, spec.path.name, allow_unmatched))
    return reports

"""Fuse LoRAs into an expert, exactly, before any quantization (`wanrt build --lora`).

W' = W + s * (alpha / r) * B @ A in fp32, cast back to W's dtype; `.diff` / `.diff_b` add to the weight / bias.
Reading the files (formats, key mapping, alpha, unmatched and Wan 2.1 `k_img` keys) lives in wanrt.runtime.lora,
shared with the per-request LoRAs of the runtime; its names are re-exported here. Tests hold our fusion equal to
diffusers' fuse_lora.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wanrt.runtime.lora import (  # noqa: F401 - re-exported: the build's and the tests' names
    _PREFIXES,
    _SUFFIX,
    _WAN21_IMAGE,
    WAN21_IMAGE_KEYS,
    LoraError,
    LoraLayer,
    LoraSpec,
    _module_name_table,
    _strip,
    detect_format,
    file_sha256,
    load_lora_file,
    read_lora,
)


@dataclass
class FuseReport:
    lora: str
    strength: float
    layers_touched: int = 0
    skipped: list[str] = field(default_factory=list)


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


def fuse_loras(model, specs: list[LoraSpec], allow_unmatched: bool = False) -> dict[str, list[FuseReport]]:
    """Fuse each LoRA into the experts it targets (the file is read anew for each expert)."""
    reports: dict[str, list[FuseReport]] = {"high": [], "low": []}
    for expert_name, expert in model.experts.items():
        for spec in specs:
            if spec.applies_to(expert_name):
                sd = load_lora_file(spec.path)
                reports[expert_name].append(fuse_lora(expert, sd, spec.strength, spec.path.name, allow_unmatched))
    return reports

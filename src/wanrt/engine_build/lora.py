"""Fuse LoRAs into an expert, exactly, before any quantization (`wanrt build --lora`).

W' = W + s * (alpha / r) * B @ A in fp32, cast back to W's dtype; `.diff` / `.diff_b` add to the weight / bias, and
a modulation delta (`blocks.N.diff_m`, `blocks.N.modulation.diff`) to the block's scale_shift_table. A delta must
have its weight's shape (size-1 dims aside); only a conv LoRA's product is reshaped to its kernel.
Reading the files (formats, key mapping, alpha, unmatched and skipped keys) lives in wanrt.runtime.lora, shared
with the per-request LoRAs of the runtime; its names are re-exported here. Tests hold our fusion equal to
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
    fits_shape,
    load_lora_file,
    log_skipped,
    lora_file_metadata,
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
              allow_unmatched: bool = False, metadata: dict[str, str] | None = None) -> FuseReport:
    """W += strength * (alpha/r) * B @ A (and diffs), computed in fp32 on the weight's device. `metadata`: the
    file's safetensors header (alpha of diffusers-saved files)."""
    layers, skipped = read_lora(sd, expert, allow_unmatched, metadata, name)
    log_skipped(name, skipped)
    modules = dict(expert.named_modules())
    report = FuseReport(lora=name, strength=strength, skipped=skipped)
    for layer in layers.values():
        module = modules.get(layer.module)
        weight = module.weight if module is not None else expert.get_parameter(layer.module)  # a modulation table
        delta = None
        if layer.down is not None:
            down, up = layer.down.to(weight.device), layer.up.to(weight.device)
            conv = down.ndim > 2  # conv LoRAs store (r, in, kt, kh, kw) and (out, r, 1, 1, 1)
            if conv:
                down, up = down.flatten(1), up.flatten(1)
            if up.shape[1] != down.shape[0]:
                raise LoraError(f"LoRA layer {layer.module}: lora_A {tuple(layer.down.shape)} and lora_B "
                                f"{tuple(layer.up.shape)} do not make a pair")
            delta = (up @ down) * layer.scale
            if conv and delta.numel() == weight.numel():
                delta = delta.reshape(weight.shape)  # the flattened kernel, back in the conv's layout
            if delta.shape != weight.shape:
                raise LoraError(f"LoRA layer {layer.module}: delta shape {tuple(delta.shape)} does not fit weight "
                                f"{tuple(weight.shape)}")
        if layer.diff is not None:
            diff = layer.diff.to(weight.device)
            if not fits_shape(diff.shape, weight.shape):  # a transposed diff has the same count: never reshape it
                raise LoraError(f"LoRA layer {layer.module}: .diff shape {tuple(diff.shape)} does not fit weight "
                                f"{tuple(weight.shape)}")
            diff = diff.reshape(weight.shape)  # at most size-1 dims differ
            delta = diff if delta is None else delta + diff
        if delta is not None:
            weight.data = (weight.data.float() + strength * delta).to(weight.dtype)
        if layer.diff_b is not None:
            bias = getattr(module, "bias", None)
            if bias is None or bias.shape != layer.diff_b.shape:
                raise LoraError(f"LoRA layer {layer.module}: bias delta {tuple(layer.diff_b.shape)} does not fit")
            bias.data = (bias.data.float() + strength * layer.diff_b.to(bias.device)).to(bias.dtype)
        report.layers_touched += 1
    return report


def fuse_loras(model, specs: list[LoraSpec], allow_unmatched: bool = False) -> dict[str, list[FuseReport]]:
    """Fuse each LoRA into the experts it targets (the file is read anew for each expert)."""
    reports: dict[str, list[FuseReport]] = {"high": [], "low": []}
    for expert_name, expert in model.experts.items():
        for spec in specs:
            if spec.applies_to(expert_name):
                sd = load_lora_file(spec.path)
                reports[expert_name].append(fuse_lora(expert, sd, spec.strength, spec.path.name, allow_unmatched,
                                                      lora_file_metadata(spec.path)))
    return reports

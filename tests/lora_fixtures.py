"""LoRA state dicts in every format users have, built for the tiny model with the real key names."""

from __future__ import annotations

import torch

from wanrt.model import keymaps

TARGETS = ["blocks.0.attn1.to_q", "blocks.0.attn1.to_out.0", "blocks.1.attn2.to_k", "blocks.1.ffn.net.0.proj",
           "blocks.0.ffn.net.2", "proj_out"]


def random_lora(expert, rank=4, seed=0, targets=TARGETS, alpha=None):
    """{diffusers module name: (A, B, alpha)} with B non-zero so the LoRA really changes the weights."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(expert.named_modules())
    out = {}
    for name in targets:
        w = modules[name].weight
        out[name] = (torch.randn(rank, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], rank, generator=g) * 0.1,
                     alpha)
    return out


def to_original(name: str) -> str:
    return next(iter(keymaps.transformer_to_original({f"{name}.weight": None})))[: -len(".weight")]


def as_format(lora: dict, fmt: str) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (a, b, alpha) in lora.items():
        if fmt == "peft":
            base = f"transformer.{name}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a.clone(), b.clone()
        elif fmt == "comfy":
            base = f"diffusion_model.{to_original(name)}"
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a.clone(), b.clone()
        elif fmt == "kohya":
            base = "lora_unet_" + to_original(name).replace(".", "_")
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a.clone(), b.clone()
        elif fmt == "wan":
            base = to_original(name)
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a.clone(), b.clone()
        else:
            raise ValueError(fmt)
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    return sd


def lightx2v_like(expert, seed=11):
    """What the lightx2v distill LoRAs ship beside their pairs: `blocks.N.diff_m` (block N's modulation delta),
    Kijai's `blocks.N.modulation.diff`, and a full `head.head.diff` + `diff_b` (the Wan2.2 4-step ones)."""
    g = torch.Generator().manual_seed(seed)
    sd = as_format(random_lora(expert, rank=4, seed=seed, alpha=4.0, targets=["blocks.0.attn1.to_q", "blocks.1.ffn.net.2"]),
                   "comfy")
    sd["diffusion_model.blocks.0.diff_m"] = torch.randn(1, 6, 32, generator=g) * 0.1
    sd["diffusion_model.blocks.1.modulation.diff"] = torch.randn(1, 6, 32, generator=g) * 0.1
    sd["diffusion_model.head.modulation.diff"] = torch.randn(1, 2, 32, generator=g) * 0.1
    sd["diffusion_model.head.head.diff"] = torch.randn(64, 32, generator=g) * 0.05
    sd["diffusion_model.head.head.diff_b"] = torch.randn(64, generator=g) * 0.05
    return sd

"""The parts of a WAN 2.2 I2V model, held together. Built by `tiny`, `loading` or `random_full`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Upstream scheduler config of Wan-AI/Wan2.2-I2V-A14B-Diffusers (UniPC, flow sigmas, shift 5).
UNIPC_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 5.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}
EULER_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 5.0,
}
I2V_BOUNDARY_RATIO = 0.9  # high-noise expert while t >= 0.9 * 1000 (Wan2.2 i2v_A14B config)


def cast_module(module, device=None, dtype=None, skip=None):
    """`module.to(device, dtype)` that keeps `_keep_in_fp32_modules` (RoPE, time embedder, modulation
    tables, norms in WanTransformer3DModel) in fp32, as diffusers' from_pretrained(torch_dtype=...) does.
    skip(name, tensor) -> True leaves that tensor as it is (loading.deferred_matrix: what the FP8 swap reads)."""
    import torch

    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if skip is not None and skip(name, tensor):
            continue
        target = dtype
        if tensor.is_floating_point() and keep and any(part in keep for part in name.split(".")):
            target = torch.float32 if tensor.dtype != torch.float64 else None
        if not tensor.is_floating_point():
            target = None
        tensor.data = tensor.data.to(device=device, dtype=target)
    return module


def empty_weights(*modules) -> int:
    """Each parameter and buffer emptied in place (same dtype and device, no storage), so whatever still holds the
    tensors (a hook, an exported program) holds no memory; returns the bytes released."""
    import torch

    released = 0
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            released += t.numel() * t.element_size()
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return released


@dataclass
class WanI2VModel:
    """Two experts of one architecture + UMT5 text encoder + Wan 2.1 VAE + tokenizer."""

    transformer_high: Any  # diffusers WanTransformer3DModel, runs while t >= boundary
    transformer_low: Any  # diffusers WanTransformer3DModel, runs after
    vae: Any  # diffusers AutoencoderKLWan
    text_encoder: Any  # transformers UMT5EncoderModel
    tokenizer: Any
    scheduler_config: dict = field(default_factory=lambda: dict(UNIPC_SCHEDULER_CONFIG))
    boundary_ratio: float = I2V_BOUNDARY_RATIO
    name: str = "unnamed"
    max_sequence_length: int = 512

    @property
    def experts(self) -> dict[str, Any]:
        return {"high": self.transformer_high, "low": self.transformer_low}

    def to(self, device, dtype=None, skip=None) -> "WanI2VModel":
        """Move everything; the experts and text encoder take `dtype` (except the modules diffusers keeps
        in fp32), the VAE stays fp32. skip: the experts' tensors left as they are (see cast_module)."""
        for m in (self.transformer_high, self.transformer_low):
            cast_module(m, device, dtype, skip=skip)
        cast_module(self.text_encoder, device, dtype)
        self.vae.to(device)
        return self

    def eval(self) -> "WanI2VModel":
        for m in (self.transformer_high, self.transformer_low, self.vae, self.text_encoder):
            m.eval().requires_grad_(False)
        return self

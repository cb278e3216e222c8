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

    def to(self, device, dtype=None) -> "WanI2VModel":
        """Move everything; the experts and text encoder take `dtype`, the VAE stays fp32 on CPU."""
        for m in (self.transformer_high, self.transformer_low, self.text_encoder):
            m.to(device=device, dtype=dtype) if dtype is not None else m.to(device)
        self.vae.to(device)
        return self

    def eval(self) -> "WanI2VModel":
        for m in (self.transformer_high, self.transformer_low, self.vae, self.text_encoder):
            m.eval().requires_grad_(False)
        return self

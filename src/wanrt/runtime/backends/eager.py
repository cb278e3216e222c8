"""The reference backend: diffusers' WanTransformer3DModel in plain torch (CPU or GPU, SDPA attention)."""

from __future__ import annotations

import torch


class EagerBackend:
    name = "eager"

    def __init__(self, model):
        self.experts = model.experts

    @torch.inference_mode()
    def denoise(self, expert: str, latent_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.experts[expert](
            hidden_states=latent_input,
            timestep=timestep,
            encoder_hidden_states=context,
            return_dict=False,
        )[0]

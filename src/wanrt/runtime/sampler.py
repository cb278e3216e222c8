"""Flow-matching sampling for the two-expert model: schedule, boundary switch, CFG per expert.

The scheduler maths (UniPC or Euler on shifted flow sigmas) is diffusers' own; the loop is ours so that any
backend (eager, compiled, TensorRT) can run the expert forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


class Cancelled(Exception):
    """The job was cancelled between two steps."""


class DenoiseBackend(Protocol):
    def denoise(self, expert: str, latent_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One expert forward: (B, 36, F, H, W) latents + conditions -> (B, 16, F, H, W) velocity."""


@dataclass(frozen=True)
class Step:
    index: int
    timestep: torch.Tensor  # scalar tensor, as the scheduler wants it back
    expert: str  # "high" or "low"
    guidance: float

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0


def make_scheduler(config: dict):
    """A fresh scheduler per request: they keep per-run state (step index, multistep history)."""
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "UniPCMultistepScheduler"))
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def plan_steps(scheduler, steps: int, boundary_ratio: float, cfg_high: float, cfg_low: float, device=None) -> list[Step]:
    """Timesteps at or above boundary_ratio * num_train_timesteps go to the high-noise expert.

    The split follows the shifted schedule (with shift 5 and 6 steps: 3 high, 3 low), not half-half."""
    scheduler.set_timesteps(steps, device=device)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    plan = []
    for i, t in enumerate(scheduler.timesteps):
        high = bool(t >= boundary)
        plan.append(Step(i, t, "high" if high else "low", float(cfg_high if high else cfg_low)))
    return plan


def sample(
    backend: DenoiseBackend,
    scheduler,
    plan: list[Step],
    latents: torch.Tensor,
    condition: torch.Tensor,
    context: torch.Tensor,
    negative_context: torch.Tensor | None,
    model_dtype: torch.dtype,
    on_step: Callable[[Step], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_x0: Callable[[Step, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the plan. cfg == 1 for an expert skips its unconditional pass; cfg > 1 batches cond+uncond.

    on_x0(step, x0) gets each step's predicted clean latent x0 = x_t - sigma_t * v (float32, the sampler's
    normalised space; what UniPC itself computes as its x0 prediction). Only computed when asked for."""
    # sigmas[i] belongs to timesteps[i] (UniPC and Euler, flow sigmas); read once, as floats, so that no step
    # waits on a device-to-host copy
    sigmas = scheduler.sigmas.detach().float().cpu().tolist() if on_x0 is not None else []
    for step in plan:
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        latent_input = torch.cat([latents, condition], dim=1).to(model_dtype)
        if step.uses_cfg:
            if negative_context is None:
                raise ValueError("guidance > 1 needs a negative context")
            velocity = backend.denoise(
                step.expert,
                torch.cat([latent_input, latent_input]),
                step.timestep.expand(2),
                torch.cat([context, negative_context]),
            )
            cond, uncond = velocity.float().chunk(2)
            velocity = uncond + step.guidance * (cond - uncond)
        else:
            # float32 like the CFG branch: Euler's step casts the new latents to the velocity's dtype
            velocity = backend.denoise(step.expert, latent_input, step.timestep.expand(1), context).float()
        x0 = None
        if on_x0 is not None:
            x0 = latents - sigmas[step.index] * velocity.float()
        latents = scheduler.step(velocity, step.timestep, latents, return_dict=False)[0]
        if x0 is not None:
            on_x0(step, x0)
        if on_step is not None:
            on_step(step)
    return latents

"""Our loop vs diffusers' WanImageToVideoPipeline on the tiny model: same latents (fp32, CPU)."""

import copy

import pytest
import torch

from wanrt.model.components import EULER_SCHEDULER_CONFIG, UNIPC_SCHEDULER_CONFIG
from wanrt.params import GenerateParams
from wanrt.runtime.pipeline import WanI2VPipeline
from wanrt.runtime.sampler import make_scheduler


def diffusers_latents(model, image, p: GenerateParams):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline(
        tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
        scheduler=make_scheduler(model.scheduler_config), image_processor=None, image_encoder=None,
        transformer=model.transformer_high, transformer_2=model.transformer_low, boundary_ratio=model.boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        image=image, prompt=p.prompt, negative_prompt=p.negative_prompt, height=p.height, width=p.width,
        num_frames=p.frames_generated, num_inference_steps=p.steps, guidance_scale=p.cfg_high_noise,
        guidance_scale_2=p.cfg_low_noise, generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent",
    ).frames


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
@pytest.mark.parametrize("steps,cfg_high,cfg_low", [(4, 3.5, 3.5), (6, 4.0, 1.0), (5, 2.0, 5.0)])
def test_latents_match_diffusers(tiny_model, image64, scheduler, steps, cfg_high, cfg_low):
    # diffusers decides "CFG or not" from the high-noise scale alone, so cfg_high is > 1 in every case here.
    model = copy.copy(tiny_model)  # the session's model is shared: change the scheduler on a shallow copy
    model.scheduler_config = dict(UNIPC_SCHEDULER_CONFIG if scheduler == "unipc" else EULER_SCHEDULER_CONFIG)
    p = GenerateParams(prompt="a cat smiling and waving", negative_prompt="static, blurry", steps=steps,
                       cfg_high_noise=cfg_high, cfg_low_noise=cfg_low, width=64, height=48, frames=9, seed=123)
    ours = WanI2VPipeline(model).generate(p, image64.resize((64, 48)), None).latents
    ref = diffusers_latents(model, image64.resize((64, 48)), p)
    assert ours.shape == ref.shape == (1, 16, 3, 6, 8)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref.abs().mean() > 0.1  # not trivially zero


def test_parity_is_sensitive(tiny_model, image64):
    """The comparison would catch a real difference (a different seed is far off)."""
    p = GenerateParams(prompt="a cat", steps=3, width=64, height=64, frames=9, seed=1)
    ours = WanI2VPipeline(tiny_model).generate(p, image64, None).latents
    ref = diffusers_latents(tiny_model, image64, GenerateParams(**{**p.to_dict(), "seed": 2}))
    assert (ours - ref).abs().max().item() > 0.1

import numpy as np
import pytest
import torch

from wanrt.params import GenerateParams
from wanrt.runtime.backends.eager import EagerBackend
from wanrt.runtime.pipeline import WanI2VPipeline
from wanrt.runtime.sampler import Cancelled, make_scheduler, plan_steps
from wanrt.runtime.vae import decode_stream
from wanrt.runtime.video import probe_mp4, read_frames

from conftest import make_image

SMALL = dict(prompt="a dog nodding", width=64, height=64, steps=4, seed=5)


class CountingBackend(EagerBackend):
    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def denoise(self, expert, latent_input, timestep, context):
        self.calls.append((expert, latent_input.shape[0]))
        return super().denoise(expert, latent_input, timestep, context)


def test_default_schedule_splits_steps_by_boundary():
    sched = make_scheduler({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                            "use_flow_sigmas": True, "flow_shift": 5.0})
    plan = plan_steps(sched, 6, 0.9, 3.5, 3.5)
    assert [s.expert for s in plan] == ["high"] * 3 + ["low"] * 3
    plan = plan_steps(sched, 4, 0.9, 3.5, 3.5)
    assert [int(s.timestep) for s in plan] == [999, 937, 833, 625]
    assert [s.expert for s in plan] == ["high", "high", "low", "low"]


@pytest.mark.parametrize("cfg_high,cfg_low,expected", [
    (3.5, 3.5, [("high", 2), ("high", 2), ("low", 2), ("low", 2)]),
    (1.0, 3.5, [("high", 1), ("high", 1), ("low", 2), ("low", 2)]),
    (3.5, 1.0, [("high", 2), ("high", 2), ("low", 1), ("low", 1)]),
    (1.0, 1.0, [("high", 1)] * 2 + [("low", 1)] * 2),
])
def test_cfg_one_skips_uncond_and_cfg_batches(tiny_model, image64, cfg_high, cfg_low, expected):
    backend = CountingBackend(tiny_model)
    p = GenerateParams(**SMALL, frames=9, cfg_high_noise=cfg_high, cfg_low_noise=cfg_low)
    WanI2VPipeline(tiny_model, backend).generate(p, image64, None)
    assert backend.calls == expected


def test_same_seed_same_frames_other_seed_differs(tiny_pipeline, image64, tmp_path):
    p = GenerateParams(**SMALL, frames=9)
    a = tiny_pipeline.generate(p, image64, tmp_path / "a.mp4", keep_latents=True)
    b = tiny_pipeline.generate(p, image64, tmp_path / "b.mp4", keep_latents=True)
    c = tiny_pipeline.generate(GenerateParams(**{**p.to_dict(), "seed": 6}), image64, tmp_path / "c.mp4", keep_latents=True)
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(read_frames(a.path), read_frames(b.path))
    assert not torch.equal(a.latents, c.latents)


def test_frames_trimmed_to_requested_count(tiny_pipeline, image64, tmp_path):
    p = GenerateParams(**SMALL, frames=18, fps=12)
    r = tiny_pipeline.generate(p, image64, tmp_path / "v.mp4")
    assert (r.frames_generated, r.frames_written) == (21, 18)
    info = probe_mp4(r.path)
    assert info["frames"] == 18 and (info["width"], info["height"]) == (64, 64) and info["fps"] == 12


def test_progress_monotone_to_100_and_timings(tiny_pipeline, image64, tmp_path):
    seen = []
    r = tiny_pipeline.generate(GenerateParams(**SMALL, frames=9), image64, tmp_path / "v.mp4",
                               progress=lambda v, stage: seen.append((v, stage)))
    values = [v for v, _ in seen]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 100.0
    assert len(set(values)) >= 4 + 3  # every step and every decoded chunk moves it
    assert {"text_encode", "vae_encode", "denoise", "vae_decode", "done"} <= {s for _, s in seen}
    for key in ("text_encode_s", "vae_encode_s", "denoise_high_s", "denoise_low_s", "vae_decode_s", "mp4_encode_s", "total_s"):
        assert r.timings[key] >= 0
    assert r.steps_per_expert == {"high": 2, "low": 2}


@pytest.mark.parametrize("cancel_after", [1, 3, 7])
def test_cancel_between_steps_leaves_no_file(tiny_pipeline, image64, tmp_path, cancel_after):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > cancel_after

    out = tmp_path / "v.mp4"
    with pytest.raises(Cancelled):
        tiny_pipeline.generate(GenerateParams(**SMALL, frames=9), image64, out, should_cancel=should_cancel)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_streaming_decode_equals_vae_decode(tiny_model):
    from wanrt.runtime.vae import latent_stats

    z = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    chunks = list(decode_stream(tiny_model.vae, z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    mean, inv_std = latent_stats(tiny_model.vae, "cpu")
    with torch.inference_mode():
        ref = tiny_model.vae.decode(z / inv_std + mean).sample
    assert torch.equal(torch.cat(chunks, dim=2), ref)


def test_non_matching_image_is_cover_cropped(tiny_pipeline, tmp_path):
    wide = make_image(200, 80)
    r = tiny_pipeline.generate(GenerateParams(**SMALL, frames=9), wide, tmp_path / "v.mp4")
    assert probe_mp4(r.path)["width"] == 64


def test_chunked_first_frame_encode_equals_vae_encode(tiny_model):
    from wanrt.runtime.vae import encode_first_frame_video

    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    video = torch.cat([image.unsqueeze(2), torch.zeros(1, 3, 12, 32, 48)], dim=2)
    with torch.inference_mode():
        ref = tiny_model.vae.encode(video).latent_dist.mode()
    seen = []
    got = encode_first_frame_video(tiny_model.vae, image, 13, on_chunk=lambda i, n: seen.append((i, n)))
    assert torch.equal(got, ref)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_euler_keeps_float32_latents_under_a_bf16_model(cfg):
    """FlowMatchEulerDiscreteScheduler.step casts the new latents to the velocity's dtype: a bf16 model's velocity
    must reach it as float32, with CFG or without (Lightning-style cfg 1 runs)."""
    from wanrt.model.components import EULER_SCHEDULER_CONFIG
    from wanrt.runtime.sampler import sample

    class Bf16Backend:
        def denoise(self, expert, latent_input, timestep, context):
            return (latent_input[:, :16] * 0.5 + context.mean()).to(torch.bfloat16)

    g = torch.Generator().manual_seed(0)
    latents, condition = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    context = torch.randn(1, 3, 8, generator=g)
    sched = make_scheduler(EULER_SCHEDULER_CONFIG)
    plan = plan_steps(sched, 4, 0.9, cfg, cfg)
    out = sample(Bf16Backend(), sched, plan, latents, condition, context, torch.zeros_like(context), torch.bfloat16)
    assert out.dtype == torch.float32

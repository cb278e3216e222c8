"""The VAE decode's precision (settings.vae_dtype) and the MP4 writer thread in the pipeline.

On the CPU the tiny model's random VAE decodes in bf16 at ~43 dB PSNR against fp32 (uint8 frames); the bound
asserted is 40 dB. That figure is the tiny VAE's, not the real Wan 2.1 VAE's: the real one's needs a GPU and the
weights (benchmarks/bench_vae.py --model <diffusers dir> --device cuda; --model random-full gives the timings). channels_last_3d and cudnn.benchmark are chosen
on CUDA only (decode_format) and are exercised here on the CPU by forcing them through a DecodeFormat.
"""

import copy
import threading

import numpy as np
import pytest
import torch

from wanrt.params import GenerateParams
from wanrt.runtime.pipeline import WanI2VPipeline
from wanrt.runtime.sampler import Cancelled
from wanrt.runtime.streaming import DeviceLedger, Shuttle
from wanrt.runtime.vae import DecodeFormat, VaeMemory, attach, decode_format, decode_stream, to_uint8_frames
from wanrt.runtime.video import probe_mp4

from conftest import make_image

SMALL = dict(prompt="a dog nodding", width=64, height=64, steps=2, seed=5, frames=9)
QUICK = dict(SMALL, width=32, height=32, frames=5)  # the pipeline tests: 2 latent frames, 2 chunks (1 + 4)
PSNR_BOUND_DB = 40.0  # tiny random VAE, CPU bf16 vs fp32: 42.9 dB measured on these latents (64x64x9)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def decode_uint8(vae, latents, vae_dtype):
    return np.concatenate([to_uint8_frames(c) for c in decode_stream(vae, latents, vae_dtype)])


@pytest.fixture(scope="module")
def tiny_latents(tiny_model):
    """What the tiny model's loop hands the decoder (1, 16, 3, 8, 8)."""
    p = GenerateParams(**SMALL)
    return WanI2VPipeline(tiny_model).generate(p, make_image(64, 64), None).latents


class ConvSpy:
    """Forward pre-hooks on the decoder's convs: the weights' dtype and layout, the input dtype and the cuDNN
    benchmark flag while the decode runs."""

    def __init__(self, vae):
        self.seen = []
        convs = [m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d))]
        self.handles = [m.register_forward_pre_hook(self.hook) for m in convs]

    def hook(self, module, args):
        w = module.weight
        layout = torch.channels_last_3d if w.dim() == 5 else torch.channels_last
        self.seen.append((w.dtype, args[0].dtype, w.is_contiguous(memory_format=layout), w.is_contiguous(),
                          torch.backends.cudnn.benchmark))

    def remove(self):
        for h in self.handles:
            h.remove()


def test_decode_format_per_device():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert decode_format("cuda", "auto") == DecodeFormat(bf16, channels_last=True, cudnn_benchmark=True)
    assert decode_format(torch.device("cuda", 1), "bf16") == DecodeFormat(bf16, True, True)
    assert decode_format("cuda", "fp32") == DecodeFormat(fp32, False, False)  # diffusers' own decode
    assert decode_format("cpu", "auto") == DecodeFormat(fp32, False, False)  # the VAE's dtype (fp32) elsewhere
    assert decode_format("cpu", "auto", own_dtype=bf16) == DecodeFormat(bf16, False, False)
    assert decode_format("cpu", "bf16") == DecodeFormat(bf16, False, False)  # no channels_last off CUDA
    assert decode_format("meta", "fp32") == DecodeFormat(fp32, False, False)
    with pytest.raises(ValueError):
        decode_format("cpu", "fp16")
    with pytest.raises(ValueError):
        WanI2VPipeline(None, backend=object(), vae_dtype="half")


def test_bf16_decode_runs_in_bf16_within_psnr_bound(tiny_model, tiny_latents):
    vae = tiny_model.vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    spy = ConvSpy(vae)
    try:
        ref = decode_uint8(vae, tiny_latents, "fp32")
        n_convs = len(spy.seen)
        assert n_convs and all(s[:2] == (torch.float32, torch.float32) for s in spy.seen)
        spy.seen.clear()
        got = decode_uint8(vae, tiny_latents, "bf16")
    finally:
        spy.remove()
    assert len(spy.seen) == n_convs
    assert all(s[0] == torch.bfloat16 and s[1] == torch.bfloat16 for s in spy.seen)  # weights and inputs
    assert all(s[3] and not s[4] for s in spy.seen)  # on the CPU: default layout, no cudnn.benchmark
    value = psnr(ref, got)
    print(f"tiny VAE, CPU: bf16 vs fp32 frame PSNR {value:.2f} dB")
    assert ref.shape == got.shape == (9, 64, 64, 3)
    assert PSNR_BOUND_DB < value < float("inf"), value  # close, and really another precision
    # the VAE itself is untouched: fp32 weights, same values (the encode path never sees bf16)
    after = vae.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert vae.dtype == torch.float32


def test_channels_last_and_cudnn_benchmark_path(tiny_model, tiny_latents):
    """The CUDA layout forced on the CPU: conv weights channels_last_3d (Conv2d: channels_last) during the
    decode, cudnn.benchmark on during each decoder call and restored, same pixels as the plain fp32 decode."""
    vae, z = tiny_model.vae, tiny_latents[:, :, :2, :4, :4]
    before = torch.backends.cudnn.benchmark
    ref = torch.cat(list(decode_stream(vae, z, "fp32")), dim=2)
    spy = ConvSpy(vae)
    try:
        got = torch.cat(list(decode_stream(vae, z, DecodeFormat(torch.float32, True, True))), dim=2)
    finally:
        spy.remove()
    assert spy.seen and all(s[2] and s[4] for s in spy.seen)
    assert torch.backends.cudnn.benchmark == before
    assert all(p.is_contiguous() for p in vae.decoder.parameters())  # back to the module's own weights
    assert torch.allclose(got.float(), ref, atol=1e-4)


def test_bf16_decode_with_a_shuttled_vae(tiny_model, tiny_latents):
    """A non-resident VAE (a memory tier's Shuttle brings it per session): the bf16 copy is made from the
    weights the Shuttle brought, counted in the ledger during the decode, and the VAE goes back to its fp32
    host copies after."""
    vae = copy.deepcopy(tiny_model.vae)
    ledger = DeviceLedger(strict=True)
    shuttle = Shuttle("vae", vae, "cpu", ledger)
    attach(vae, VaeMemory(ledger, shuttle))
    host = [t.data_ptr() for t in vae.parameters()]
    z = tiny_latents[:, :, :2, :4, :4]
    ref = decode_uint8(tiny_model.vae, z, "bf16")
    got = decode_uint8(vae, z, "bf16")
    assert np.array_equal(got, ref)
    decoder_fp32 = sum(p.numel() * p.element_size() for p in vae.decoder.parameters())
    assert ledger.part_peaks["vae_decode_cast"] == decoder_fp32 // 2 and ledger.part_peaks["vae"] == shuttle.nbytes
    assert ledger.now == 0 and shuttle.trips == 1 and not shuttle.on_device
    assert [t.data_ptr() for t in vae.parameters()] == host and vae.dtype == torch.float32


def _mp4_threads():
    return [t for t in threading.enumerate() if t.name == "wanrt-mp4" and t.is_alive()]


def test_writer_thread_same_video_as_sync_and_bf16_pipeline(tiny_model, tmp_path):
    image = make_image(32, 32)
    p = GenerateParams(**QUICK)
    sync = WanI2VPipeline(tiny_model)
    sync.mp4_queue = 0
    a = sync.generate(p, image, tmp_path / "sync.mp4")
    b = WanI2VPipeline(tiny_model).generate(p, image, tmp_path / "thread.mp4")
    assert a.path.read_bytes() == b.path.read_bytes()  # same inputs + seed => same video, threaded or not
    assert a.frames_written == b.frames_written == 5
    for r in (a, b):
        assert r.timings["vae_decode_s"] > 0 and r.timings["mp4_encode_s"] > 0
    spy = ConvSpy(tiny_model.vae)
    try:
        c = WanI2VPipeline(tiny_model, vae_dtype="bf16").generate(p, image, tmp_path / "bf16.mp4")
    finally:
        spy.remove()
    assert spy.seen and all(s[0] == torch.bfloat16 for s in spy.seen)
    assert probe_mp4(c.path)["frames"] == 5 and c.path.read_bytes() != a.path.read_bytes()
    assert not _mp4_threads()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bf16.mp4", "sync.mp4", "thread.mp4"]


@pytest.mark.parametrize("queue_chunks", [2, 0])
def test_cancel_during_decode(tiny_model, tmp_path, queue_chunks):
    """Cancelled after the first decoded chunk: no video, no .part file, no writer thread, and the decode's
    session ended at once (the causal cache cleared, not left to the garbage collector)."""
    decoding = []
    pipe = WanI2VPipeline(tiny_model)
    pipe.mp4_queue = queue_chunks
    timings = {}
    with pytest.raises(Cancelled):
        pipe.generate(GenerateParams(**QUICK), make_image(32, 32), tmp_path / "v.mp4", timings=timings,
                      progress=lambda v, stage: decoding.append(stage == "vae_decode"),
                      should_cancel=lambda: any(decoding))
    assert sum(decoding) == 1  # exactly one chunk was decoded and handed over
    assert list(tmp_path.iterdir()) == [] and not _mp4_threads()
    assert all(f is None for f in tiny_model.vae._feat_map)
    assert timings["vae_decode_s"] > 0 and "mp4_encode_s" in timings

"""Memory tiers on the tiny model (fp32, CPU): each tier, forced by the budget it is given, produces the resident
latents bit for bit while the device-memory ledger (the runtime's own, not a double) stays under that budget;
block streaming keeps its window and frees every block; a memory-mapped expert is never read whole; cond/uncond
one after the other, VAE tiles, the out-of-memory retry, the capacity the API checks, and `wanrt plan`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import weakref

import pytest
import torch

from wanrt.config import Settings
from wanrt.model import keymaps, sizes
from wanrt.params import GenerateParams
from wanrt.runtime.factory import build_runtime
from wanrt.runtime.memory import (
    BLOCKS_AHEAD,
    ModelBytes,
    Options,
    fits,
    phase_bytes,
    run_within_memory,
    tiered,
    worker_memory_info,
)
from wanrt.runtime.pipeline import WanI2VPipeline
from wanrt.runtime.streaming import BlockStreamer, DeviceLedger

P = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=4)
BUCKET = ("64x64x9",)  # the planning bucket = the request
LEAN = Options(text_encoder="streamed", vae_resident=False)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from conftest import make_image

    return WanI2VPipeline(tiny_model).generate(P, make_image(64, 64), None).latents


@pytest.fixture(scope="module")
def mb(tiny_model):
    return ModelBytes.measure(tiny_model)


def lean_need(mb, tier) -> int:
    """The budget that forces `tier`: its leanest structure's largest phase (every richer tier needs more)."""
    return max(phase_bytes(mb, tier, LEAN, sizes.bucket_tokens(BUCKET[0]), 64, 64).values())


@pytest.fixture(scope="module")
def tiny_files(tiny_model, tmp_path_factory):
    from wanrt.model.loading import save_single_files

    root = tmp_path_factory.mktemp("tiny_files")
    save_single_files(tiny_model, root)
    return root


@pytest.fixture(scope="module")
def tiny_fp8_files(tiny_model, tiny_files, tmp_path_factory):
    """The tiny model as ComfyUI fp8_scaled files (per-tensor scales), the rest as in tiny_files."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_fp8")
    for f in tiny_files.iterdir():
        if "noise" not in f.name:
            (shutil.copytree if f.is_dir() else shutil.copy)(f, root / f.name)
    for name, expert in (("high", tiny_model.transformer_high), ("low", tiny_model.transformer_low)):
        sd = keymaps.transformer_to_original(expert.state_dict(), prefix=keymaps.COMFY_PREFIX)
        out = {}
        for k, v in sd.items():
            if k.endswith(".weight") and v.ndim == 2:
                scale = v.abs().max() / 448.0
                out[k], out[k[:-len("weight")] + "scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale.reshape(1)
            else:
                out[k] = v
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
        save_file({k: v.contiguous() for k, v in out.items()}, str(root / f"wan2.2_i2v_{name}_noise_14B_fp8_scaled.safetensors"))
    return root


# ----------------------------------------------------------------------------------------------- every tier
@pytest.mark.parametrize("tier", ["resident", "swap", "stream", "mmap"])
def test_each_tier_forced_by_its_budget_matches_resident_and_stays_under_it(tier, mb, reference, tiny_files, image64,
                                                                             tmp_path):
    ledger_budget = lean_need(mb, "stream" if tier == "mmap" else tier) if tier != "resident" else None
    if tier == "resident":
        ledger_budget = max(phase_bytes(mb, "resident", Options(), 48, 64, 64).values())
    host = None
    model = "tiny"
    if tier == "mmap":  # host RAM that holds the stems, not both experts: mapped files instead
        model = str(tiny_files)
        host = 2 * mb.stem + mb.text_encoder + mb.vae
    settings = Settings(device="cpu", model=model, warmup=BUCKET)
    pipe = build_runtime(settings, free_bytes=ledger_budget, host_bytes=host)
    t = tiered(pipe.backend)
    assert t.tier == tier and t.plan.fits, t.plan.table()
    assert t.ledger.peak <= ledger_budget  # weights placed at start-up
    result = pipe.generate(P, image64, tmp_path / "out.mp4", keep_latents=True)  # through the decode and MP4
    assert torch.equal(result.latents, reference) and result.frames_written == 9
    assert t.ledger.peak <= ledger_budget, t.ledger.summary()
    assert t.ledger.budget == ledger_budget and not t.ledger.summary()["over_budget"] and t.ledger.errors == 0
    if tier != "resident":  # the lean structure: the text encoder streamed, the VAE visiting
        assert t.options.text_encoder == "streamed" and not t.options.vae_resident
        assert t._text_stem.trips == 1 and t._vae_shuttle.trips == 2  # encode + decode
        assert t.ledger.parts["text_stem"] == t.ledger.parts["vae"] == 0  # gone again
    # only the weights the tier keeps are still counted: nothing leaked
    kept = {"resident": {"expert_high", "expert_low", "text_encoder", "vae"}, "swap": {"expert"},
            "stream": {"expert_stem"}, "mmap": {"expert_stem"}}[tier]
    assert {k for k, v in t.ledger.parts.items() if v} <= kept | {"overhead"}


def test_the_budget_between_two_tiers_picks_the_richer_that_fits(mb):
    from wanrt.runtime.memory import decide

    tokens = sizes.bucket_tokens(BUCKET[0])
    needs = [lean_need(mb, t) for t in ("resident", "swap", "stream")]
    assert needs[0] > needs[1] > needs[2]
    for budget, tier in ((needs[0] + 1, "resident"), (needs[0] - 1, "swap"), (needs[1] - 1, "stream")):
        plan = decide(mb, budget, bucket=BUCKET[0])
        assert plan.tier == tier and plan.need_bytes <= budget
        assert plan.phases == phase_bytes(mb, tier, plan.options, tokens, 64, 64)
    assert not decide(mb, needs[2] - 1, bucket=BUCKET[0]).fits


# ----------------------------------------------------------------------------------------------- streaming
def test_block_streamer_keeps_the_window_and_frees_every_block():
    """8 blocks, 2 ahead: at most 3 on the device at once (CPU: no lagging block), each freed after use,
    the output bit-identical, the ledger back to the wrap-around prefetch, then to zero."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    x = torch.randn(4, 64)
    ref = blocks(x)
    ledger = DeviceLedger(strict=True)
    s = BlockStreamer("blocks", list(blocks), "cpu", ledger, ahead=2, wrap=True)
    per_block = s.block_bytes[0]
    assert s.nbytes == 8 * per_block and ledger.now == 0  # nothing on the device before the first forward
    placed = []
    for b in blocks:
        b.register_forward_pre_hook(lambda *a: placed.append(len(s.live)))  # after the streamer's own
    with torch.inference_mode():
        out = blocks(x)
    assert torch.equal(out, ref)
    assert s.peak_live == 3 and ledger.peak == 3 * per_block
    assert placed == [3, 3, 3, 3, 3, 3, 3, 3]  # block i, i+1, i+2 (wrapping) while i runs
    assert s.counts["loads"] == 10 and s.counts["drops"] == 8 and s.counts["late"] == 1  # + 0,1 prefetched
    assert sorted(s.live) == [0, 1] and ledger.now == 2 * per_block
    with torch.inference_mode():
        assert torch.equal(blocks(x), ref)
    assert s.counts["late"] == 1  # the second forward found its first blocks prefetched
    s.release_all()
    assert ledger.now == 0 and ledger.events[("blocks", "place")] == ledger.events[("blocks", "free")] == 18
    # every parameter points at its host copy again
    assert all(p.data_ptr() == h.data_ptr() for hc in s.host for (p, h) in hc.pairs)
    s.close()
    no_wrap = BlockStreamer("blocks", list(blocks), "cpu", DeviceLedger(), ahead=1, wrap=False)
    with torch.inference_mode():
        assert torch.equal(blocks(x), ref)
    assert no_wrap.peak_live == 2 and not no_wrap.live


def test_streamers_on_one_gpu_share_one_copy_stream(monkeypatch):
    """Memory freed on a stream is cached for that stream alone: the text encoder's and each expert's streamer
    allocate their windows on one copy stream per device, so each reuses the others' (three streams kept three
    windows reserved, past a 10 GB card's budget)."""
    from wanrt.runtime import streaming

    class FakeStream:
        def __init__(self, device):
            self.device = device

    class NoCopies:  # host copies need CUDA here
        def __init__(self, tensors, cuda, pin=True):
            self.made, self.nbytes = 0, 0

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(streaming, "_HostCopies", NoCopies)
    monkeypatch.setattr(streaming, "_COPY_STREAMS", {})
    made = [BlockStreamer(name, [torch.nn.Linear(4, 4)], device, DeviceLedger())
            for name, device in (("text_blocks", "cuda:0"), ("expert_blocks", "cuda:0"), ("expert_blocks", "cuda:1"))]
    assert made[0]._stream is made[1]._stream and made[2]._stream is not made[0]._stream
    assert made[2]._stream.device == torch.device("cuda:1")


def test_a_loop_that_ends_early_leaves_no_block_on_the_device_and_loras_land_in_the_host_copies(image64, tmp_path):
    """A cancelled loop left its prefetched blocks on the device: unpriced in the next request's text and VAE
    phases, and the next LoRA set was written into those device copies, then dropped with them (the block ran the
    old set). Now a loop that ends early releases them, and settle (before any LoRA write) does too."""
    from safetensors.torch import save_file

    from wanrt.runtime.sampler import Cancelled

    from lora_fixtures import TARGETS, as_format, random_lora

    pipe = build_runtime(Settings(device="cpu", warmup=BUCKET, memory="stream"))
    t = tiered(pipe.backend)
    steps = []
    with pytest.raises(Cancelled):
        pipe.generate(P, image64, None, should_cancel=lambda: steps.append(1) or len(steps) > 2)
    assert not any(s.live for s in t.streamers.values())  # (before: the running expert's next blocks)
    x = torch.randn(2, 36, 3, 8, 8)
    t.denoise("high", x, torch.full((2,), 900.0), torch.randn(2, 512, 32))
    assert t.streamers["high"].live  # its wrap-around prefetch
    t.settle("high")
    assert not any(s.live for s in t.streamers.values())
    from types import SimpleNamespace

    from wanrt.runtime.parallel import ParallelBackend

    t.denoise("high", x, torch.full((2,), 900.0), torch.randn(2, 512, 32))
    ParallelBackend.release(SimpleNamespace(inner=t))  # a worker group's rank 0 (pipeline.backend is the group)
    assert not any(s.live for s in t.streamers.values())
    # end to end: a LoRA job after a cancelled one is the LoRA job of a fresh runtime
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    save_file(as_format(random_lora(pipe.model.transformer_high, rank=4, seed=1, targets=TARGETS), "peft"),
              str(lora_dir / "style.safetensors"))
    style = [{"name": "style", "strength": 1.0, "expert": "both"}]
    settings = Settings(device="cpu", warmup=BUCKET, memory="stream", lora_dir=str(lora_dir), max_lora_rank=8)
    served, fresh = build_runtime(settings), build_runtime(settings)
    calls = []
    with pytest.raises(Cancelled):
        served.generate(P, image64, None, should_cancel=lambda: calls.append(1) or len(calls) > 2)
    got = served.generate(P, image64, None, loras=style).latents
    assert torch.equal(got, fresh.generate(P, image64, None, loras=style).latents)


def test_streamed_expert_with_more_blocks_is_bit_identical():
    from diffusers import WanTransformer3DModel

    from wanrt.model.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    m = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 8}).eval()
    x, t, ctx = torch.randn(2, 36, 3, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 512, 32)
    with torch.inference_mode():
        ref = m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        ledger = DeviceLedger()
        s = BlockStreamer("expert_blocks", m.blocks, "cpu", ledger, ahead=BLOCKS_AHEAD)
        got = m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.equal(got, ref)
    assert ledger.part_peaks["expert_blocks"] == (BLOCKS_AHEAD + 1) * s.block_bytes[0] < s.nbytes / 2


def test_mmap_expert_is_never_read_whole(mb, tiny_files, reference, image64):
    from wanrt.model.loading import is_mapped

    pipe = build_runtime(Settings(device="cpu", model=str(tiny_files), warmup=BUCKET, memory="mmap"),
                         free_bytes=lean_need(mb, "stream"))
    t = tiered(pipe.backend)
    blocks = [p for e in pipe.model.experts.values() for p in e.blocks.parameters()]
    assert t.tier == "mmap" and blocks and all(is_mapped(p) for p in blocks)  # views of the file, not RAM
    assert torch.equal(pipe.generate(P, image64, None).latents, reference)
    assert all(is_mapped(p) for p in blocks)  # and back to the file pages after the run
    s = t.streamers["high"]
    expert_blocks = s.nbytes
    # read from the mapping one window at a time: never the expert's blocks at once
    assert t.ledger.part_peaks["expert_blocks"] <= min(2, BLOCKS_AHEAD + 1) * max(s.block_bytes)
    assert t.ledger.part_peaks["expert_blocks"] < expert_blocks or len(s.blocks) <= BLOCKS_AHEAD + 1
    assert s.counts["loads"] == s.counts["drops"]


# ----------------------------------------------------------------------------------------------- per request
def test_cond_and_uncond_run_one_after_the_other_when_the_batch_does_not_fit(mb):
    """A request whose batch of 2 would not fit the stream budget: two batch-1 forwards (close to the batch,
    not bit-equal: the CPU kernels round a 2-row timestep embedding differently), the ledger under budget."""
    budget = lean_need(mb, "stream")
    pipe = build_runtime(Settings(device="cpu", warmup=BUCKET), free_bytes=budget)
    t = tiered(pipe.backend)
    tokens = 6 * 32 * 32  # 6 latent frames at 512x512: the batch of 2 needs more than the budget
    assert mb.loop_ws(tokens, 2) > budget > mb.loop_ws(tokens, 1) + mb.stem + 2 * mb.block
    assert t.cfg_batch_for(tokens) == 1 and t.cfg_batch_for(48) == 2
    x = torch.randn(2, 36, 6, 64, 64)
    ts, ctx = torch.tensor([900.0, 900.0]), torch.randn(2, 512, 32)
    got = t.denoise("high", x, ts, ctx)
    assert t.stats["sequential_cfg_steps"] == 1 and t.ledger.peak <= budget
    with torch.inference_mode():
        ref = pipe.model.transformer_high(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_vae_tiles_where_the_frame_does_not_fit(mb):
    """The stream budget fits a 64x64 decode whole, not a 256x256 one (20 KB/px): 128 px tiles then. Tiled
    decode and encode: one tile as large as the frame gives the untiled output exactly, small tiles stay close;
    the session counts the tile's workspace in the ledger and brings the VAE in and out."""
    from wanrt.runtime.vae import (
        VaeMemory,
        _decode_frames,
        attach,
        decode_stream,
        decode_tiled,
        encode_first_frame_tiled,
        encode_first_frame_video,
    )

    budget = lean_need(mb, "stream")
    pipe = build_runtime(Settings(device="cpu", warmup=BUCKET), free_bytes=budget)
    t = tiered(pipe.backend)
    assert t.vae_tile_for("decode", 64, 64) is None and t.vae_tile_for("encode", 64, 64) is None
    assert t.vae_tile_for("decode", 256, 256) == 16 and t.vae_tile_for("encode", 256, 256) == 16
    assert mb.vae_ws("decode", 256, 256) + mb.stem + mb.vae > budget >= mb.vae_ws("decode", 256, 256, 16) + mb.stem + mb.vae
    vae = pipe.model.vae
    torch.manual_seed(0)
    z = torch.randn(1, 16, 2, 12, 12)  # 96x96, 5 frames: 2x2 tiles of 64 px, 16 px of overlap
    image = torch.rand(1, 3, 96, 96) * 2 - 1
    policy = vae.wanrt_memory
    ledger = DeviceLedger()
    attach(vae, VaeMemory(ledger, policy.shuttle, mb.vae_ws, tile_for=lambda kind, w, h: 8))  # 64 px tiles
    chunks = list(decode_stream(vae, z))
    assert [c.shape[2] for c in chunks] == [1, 4]
    assert ledger.part_peaks["vae_decode_workspace"] == mb.vae_ws("decode", 96, 96, 8) and ledger.now == 0
    assert t.ledger.part_peaks["vae"] == mb.vae and policy.shuttle.trips == 1  # brought in for the decode only
    assert t.ledger.parts["vae"] == 0
    policy.shuttle.bring()
    with torch.inference_mode():
        plain = torch.cat(list(_decode_frames(vae, z)), dim=2)
        whole = torch.cat(list(decode_tiled(vae, z, 12)), dim=2)  # one tile = the frame
        enc_whole = encode_first_frame_video(vae, image, 5)
        enc_tiled = encode_first_frame_tiled(vae, image, 5, 8)
    policy.shuttle.send_back()
    attach(vae, policy)
    tiled = torch.cat(chunks, dim=2)
    assert torch.allclose(whole, plain, atol=1e-6)

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()

    # 64 px tiles are small next to the VAE's receptive field (the runtime's smallest is 128 px): close, not equal
    assert tiled.shape == plain.shape and cosine(tiled, plain) > 0.85
    assert enc_tiled.shape == enc_whole.shape and cosine(enc_tiled, enc_whole) > 0.9


# ----------------------------------------------------------------------------------------------- failures
def test_out_of_memory_retries_once_on_the_next_leaner_tier(reference, image64, monkeypatch):
    pipe = build_runtime(Settings(device="cpu", warmup=BUCKET, memory="resident"))
    t = tiered(pipe.backend)
    calls, held, demote = [], [], t.demote

    def demote_once_freed(why):  # the leaner placement needs the memory the failed run held
        assert held[0]() is None
        return demote(why)

    monkeypatch.setattr(t, "demote", demote_once_freed)

    def run():
        calls.append(t.tier)
        if len(calls) == 1:
            activations = torch.zeros(1024)  # what the failed run's frames hold when the OOM is raised
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return pipe.generate(P, image64, None)

    result = run_within_memory(pipe, P, run)
    assert calls == ["resident", "swap"] and t.tier == "swap"
    assert torch.equal(result.latents, reference)  # the weights moved in place: same numbers
    assert worker_memory_info(pipe)["tier_changes"][0]["tier"] == "swap"

    def always():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # swap -> stream, then it ends (error_type out_of_memory)
        run_within_memory(pipe, P, always)
    assert t.tier == "stream"
    assert torch.equal(pipe.generate(P, image64, None).latents, reference)
    with pytest.raises(ValueError):  # not a memory error: no retry, no tier change
        run_within_memory(pipe, P, lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert t.tier == "stream"


def test_out_of_memory_midway_leaves_nothing_behind(mb, reference, image64):
    """An OOM inside the streamed text encoder (its stem and a workspace on the device, blocks in flight): the
    retry one step leaner (1 block ahead) finds a clean device and the same latents."""
    pipe = build_runtime(Settings(device="cpu", warmup=BUCKET), free_bytes=lean_need(mb, "stream"))
    t = tiered(pipe.backend)
    assert t.tier == "stream" and t.options.text_encoder == "streamed" and t.options.ahead == BLOCKS_AHEAD
    fired = []

    def boom(module, args):
        if not fired:
            fired.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = pipe.model.text_encoder.encoder.block[1].register_forward_pre_hook(boom)
    result = run_within_memory(pipe, P, lambda: pipe.generate(P, image64, None))
    handle.remove()
    assert fired and t.tier == "stream" and t.options.ahead == 1 and t.history
    assert torch.equal(result.latents, reference)
    assert t.ledger.errors == 0 and t.ledger.parts["text_stem"] == t.ledger.parts["text_workspace"] == 0
    assert t.ledger.parts["text_blocks"] == 0 and t.ledger.peak <= t.plan.free_bytes


def test_capacity_and_the_check_the_api_makes(mb):
    budget = lean_need(mb, "stream")
    pipe = build_runtime(Settings(device="cpu", warmup=BUCKET), free_bytes=budget)
    info = worker_memory_info(pipe)
    cap = info["capacity"]
    assert info["tier"] == "stream" and cap["tier"] == "stream" and cap["max_tokens"] > 0
    small = dict(width=64, height=64, frames=9)
    assert fits(small, cap) is None
    big = dict(width=1024, height=1024, frames=121)
    msg = fits(big, cap)
    assert msg and str(cap["max_tokens"]) in msg and "1024x1024x121" in msg
    assert fits(big, {"max_tokens": None}) is None  # no budget known: nothing refused
    # the same numbers the API computes without torch (routes.py): tokens from width, height and frames
    p = GenerateParams(prompt="x", **big)
    tokens = ((p.frames_generated - 1) // 4 + 1) * (p.height // 16) * (p.width // 16)
    assert tokens == sizes.latent_tokens(p.frames, p.height, p.width) == 126_976
    # a resident runtime demotes before a request that only a leaner tier fits
    rich = build_runtime(Settings(device="cpu", warmup=BUCKET),
                         free_bytes=max(phase_bytes(mb, "resident", Options(), 48, 64, 64).values()))
    t = tiered(rich.backend)
    assert t.tier == "resident"
    limit = t.capacity()["max_tokens"]
    side = next(s for s in range(1024, 63, -32) if sizes.latent_tokens(9, s, s) <= limit)
    assert t.prepare(side, side, 9) is not None and t.tier in ("swap", "stream")


def test_the_api_prices_a_request_against_live_workers_first():
    """A killed worker's report lingers in the store: its bigger GPU must not keep a request the live workers
    cannot run from being refused. With no worker live, the last reports of those that did not stop count."""
    import time

    from wanrt.api.routes import request_over_capacity

    now = time.time()
    p = GenerateParams(prompt="x", width=640, height=640, frames=81)  # 33,600 tokens
    big = {"state": "idle", "updated_at": now - 600, "memory": {"capacity": {"max_tokens": 200_000}}}
    small = {"state": "idle", "updated_at": now, "memory": {"capacity": {"max_tokens": 10_000}}}
    assert "33600" in request_over_capacity([big, small], p)
    assert request_over_capacity([big, small | {"updated_at": now - 600}], p) is None  # none live: both count
    assert "33600" in request_over_capacity([big | {"state": "stopped"}, small | {"updated_at": now - 600}], p)
    assert request_over_capacity([big | {"updated_at": now}, small], p) is None


# ----------------------------------------------------------------------------------------------- FP8 storage
def test_fp8_checkpoint_runs_weight_only_from_the_stream(tiny_fp8_files, image64):
    """An fp8_scaled checkpoint keeps its e4m3 weights (half the bytes on the host and over the bus); the
    weight-only layer upcasts one layer at a time and equals the same file loaded dequantized."""
    from wanrt.model.loading import checkpoint_info, load_model
    from wanrt.runtime.fp8 import Fp8Linear

    assert checkpoint_info(str(tiny_fp8_files))["fp8"]
    ref_model = load_model(str(tiny_fp8_files), "cpu", torch.float32)  # dequantized at load (the old path)
    ref = WanI2VPipeline(ref_model).generate(P, image64, None).latents
    pipe = build_runtime(Settings(device="cpu", model=str(tiny_fp8_files), memory="stream", warmup=BUCKET))
    lin = pipe.model.transformer_high.blocks[0].attn1.to_q
    assert isinstance(lin, Fp8Linear) and lin.mode == "weight_only" and lin.weight_fp8.dtype == torch.float8_e4m3fn
    assert torch.equal(pipe.generate(P, image64, None).latents, ref)
    t = tiered(pipe.backend)
    bf16_block = sum(p.numel() * 4 for p in ref_model.transformer_high.blocks[0].parameters())
    assert t.streamers["high"].block_bytes[0] < 0.5 * bf16_block  # FP8 over the "PCIe"


def test_fp8_weight_only_layer_equals_the_dequantized_weight():
    from wanrt.runtime.fp8 import Fp8Linear, dequantize_weight, fp8_mode

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    f = Fp8Linear(lin, mode="weight_only")
    x = torch.randn(5, 64)
    ref = torch.nn.functional.linear(x, dequantize_weight(f.weight_fp8, f.weight_scale), lin.bias)
    assert torch.equal(f(x), ref)
    assert fp8_mode("cpu") == "emulate"  # CPU tests keep measuring the FP8 GEMM's rounding
    q = Fp8Linear.from_quantized(f.weight_fp8, torch.tensor(0.5), None, torch.float32)
    assert q.weight_scale.shape == (48, 1) and q.weight_fp8 is f.weight_fp8  # adopted, not copied


def test_compiled_backend_under_streaming_quantises_in_place_and_compiles_nothing(image64):
    """The compiled backend's FP8 swap runs before the stream takes its host copies (the blocks stream FP8);
    whole-model compile is off under streaming (it would capture or break at the stream's hooks)."""
    swap = build_runtime(Settings(device="cpu", backend="compiled", memory="swap", compile=False, warmup=BUCKET))
    ref = swap.generate(P, image64, None).latents
    pipe = build_runtime(Settings(device="cpu", backend="compiled", memory="stream", compile=True, warmup=BUCKET))
    d = pipe.backend.describe()
    assert d["tier"] == "stream" and d["fp8_layers"] == {"high": 20, "low": 20} and not d["compiled"]
    assert "block streaming" in d["compile_off"] and pipe.backend.name == "compiled+stream"
    assert torch.equal(pipe.generate(P, image64, None).latents, ref)



def test_the_compiled_backend_on_every_tier_and_after_a_demotion(tiny_files, reference, image64):
    """The default backend on CUDA (compiled) under each tier, from single files: FP8 on resident, swap and stream
    (the same quantised weights: the same latents), none on mmap (the files run as stored: said in describe, not
    silently), and an OOM-demoted compiled runtime keeps its FP8 weights and latents."""
    got = {}
    for tier in ("resident", "swap", "stream", "mmap"):
        pipe = build_runtime(Settings(device="cpu", model=str(tiny_files), backend="compiled", memory=tier,
                                      compile=False, warmup=BUCKET))
        d = pipe.backend.describe()
        assert d["tier"] == tier and d["fp8_layers"] == ({} if tier == "mmap" else {"high": 20, "low": 20}), d
        assert ("mmap tier" in d.get("fp8_off", "")) == (tier == "mmap")
        got[tier] = pipe.generate(P, image64, None).latents
    assert torch.equal(got["swap"], got["resident"]) and torch.equal(got["stream"], got["resident"])
    assert torch.equal(got["mmap"], reference) and not torch.equal(got["resident"], reference)
    pipe = build_runtime(Settings(device="cpu", model=str(tiny_files), backend="compiled", memory="resident",
                                  compile=False, warmup=BUCKET))
    calls = []

    def oom_first():
        calls.append(tiered(pipe.backend).tier)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return pipe.generate(P, image64, None)

    assert torch.equal(run_within_memory(pipe, P, oom_first).latents, got["resident"])
    assert calls == ["resident", "swap"] and pipe.backend.describe()["fp8_layers"] == {"high": 20, "low": 20}
    calls.clear()  # swap quantised the experts in place (as every tier does on CUDA): stream finds them in FP8
    assert torch.equal(run_within_memory(pipe, P, oom_first).latents, got["resident"])
    assert calls == ["swap", "stream"] and pipe.backend.describe()["fp8_layers"] == {"high": 20, "low": 20}

@pytest.mark.parametrize("layout", ["single files", "diffusers dir"])
def test_compiled_stream_quantises_the_experts_from_their_mapped_files(layout, tiny_model, tiny_files, image64,
                                                                       monkeypatch, tmp_path):
    """Experts stored in the load dtype, FP8 swap, streamed tier: read mapped and quantised a layer at a time (the
    host never holds both in full precision), the same latents as a whole load; the linears end in FP8 RAM, not
    file pages. Wan's diffusers dir (what a 4090 user downloads) goes the same way as single files."""
    from wanrt.model import loading
    from wanrt.runtime import factory

    from model_files import save_diffusers_dir

    model = str(tiny_files) if layout == "single files" else str(save_diffusers_dir(tiny_model, tmp_path / "m"))

    seen, deferred, load = [], [], factory.load_model

    def recording(spec, device, *args, **kwargs):
        if device != "meta":  # (the planner measures single files on meta)
            seen.append(kwargs.get("mmap"))
            deferred.append(kwargs.get("defer_cast"))
        return load(spec, device, *args, **kwargs)

    monkeypatch.setattr(factory, "load_model", recording)
    settings = Settings(device="cpu", model=model, backend="compiled", memory="stream", compile=False, warmup=BUCKET)
    pipe = build_runtime(settings)
    assert seen == [True] and pipe.backend.describe()["fp8_layers"] == {"high": 20, "low": 20}
    fp8 = [b for e in pipe.model.experts.values() for b in e.buffers() if b.dtype == torch.float8_e4m3fn]
    assert fp8 and not any(loading.is_mapped(b) for b in fp8)
    got = pipe.generate(P, image64, None).latents
    info = loading.checkpoint_info(model)
    assert info["weights_dtype"] == torch.float32  # the CPU's load dtype: nothing to cast, so mapped
    monkeypatch.setattr(factory, "checkpoint_info", lambda spec: {**info, "weights_dtype": None})  # cast: whole
    whole = build_runtime(settings)
    assert seen == [True, False] and torch.equal(whole.generate(P, image64, None).latents, got)
    assert deferred == [True, False]


@pytest.mark.parametrize("layout", ["single files", "diffusers dir"])
def test_fp32_files_quantise_from_their_mapping_and_end_in_the_run_dtype(layout, tiny_model, tiny_files, image64,
                                                                          monkeypatch, tmp_path):
    """Files in FP32 served in BF16 (Wan's official files on a GPU): on the stream tier the blocks' matrices stay
    mapped FP32 views until the FP8 swap has read them, and the model ends with every tensor in the dtype a whole
    cast gives it, name by name (the run dtype, the fp32 modules, FP8 weights); the video is the same to FP8's
    rounding (quantised from FP32 values, not from their BF16 rounding)."""
    from wanrt.model.loading import is_mapped
    from wanrt.runtime import factory
    from wanrt.runtime.backends import compiled

    at_swap, swap = [], compiled.swap_fp8_linears

    def recording(expert, *args, **kwargs):  # what the FP8 swap reads: the file's FP32, mapped (not a BF16 copy)
        w = expert.blocks[0].attn1.to_q.weight
        at_swap.append((w.dtype, is_mapped(w)))
        return swap(expert, *args, **kwargs)

    monkeypatch.setattr(compiled, "swap_fp8_linears", recording)
    from model_files import save_diffusers_dir

    model = str(tiny_files) if layout == "single files" else str(save_diffusers_dir(tiny_model, tmp_path / "m"))
    settings = Settings(device="cpu", dtype="bf16", model=model, backend="compiled", memory="stream",
                        compile=False, warmup=BUCKET)
    plan, mb, _ = factory.plan_runtime(settings)
    assert mb.load_mapped and plan.tier == "stream"
    pipe = build_runtime(settings)
    assert at_swap == [(torch.float32, True)] * 2
    info = factory.checkpoint_info(model)
    monkeypatch.setattr(factory, "checkpoint_info", lambda spec: {**info, "weights_dtype": None})  # cast whole
    whole = build_runtime(settings)

    def dtypes(p):
        return {f"{n}.{k}": t.dtype for n, e in p.model.experts.items()
                for k, t in [*e.named_parameters(), *e.named_buffers()]}

    assert dtypes(pipe) == dtypes(whole) and torch.float8_e4m3fn in dtypes(pipe).values()
    assert torch.bfloat16 in dtypes(pipe).values() and torch.float32 in dtypes(pipe).values()  # (the fp32 modules)
    a, b = (p.generate(P, image64, None).latents.float().flatten() for p in (pipe, whole))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999

# ----------------------------------------------------------------------------------------------- plan CLI
@pytest.mark.parametrize("gpu", ["h100", "rtx4090", "rtx3080"])
def test_wanrt_plan_answers_for_each_card_and_preset(gpu, capsys):
    from wanrt.cli import main

    assert main(["plan", "--gpu", gpu, "--host-memory", "64", "--preset", "all"]) == 0
    out = capsys.readouterr().out
    for preset in ("fast", "default", "high_quality"):
        assert f"preset {preset}" in out
    assert out.count("tier: ") == 3 and "projected time" in out and "projection" in out
    assert main(["plan", "--gpu", gpu, "--preset", "default", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)[0]
    assert doc["plan"]["tier"] in ("resident", "swap", "stream", "mmap") and doc["projected_s"]["total_s"] > 0


def test_memory_setting_lists_the_tiers():
    import argparse

    from wanrt.config import add_flags

    for command in ("serve", "worker", "generate"):
        parser = argparse.ArgumentParser()
        add_flags(parser, command)
        action = next(a for a in parser._actions if a.dest == "memory")
        assert set(action.choices) == {"auto", "resident", "swap", "offload", "stream", "mmap"}
        assert "stream" in action.help and "mmap" in action.help
    assert dataclasses.replace(Settings(), memory="offload").memory == "offload"


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("tier", ["swap", "stream", "mmap"])
def test_cuda_tiers_pin_once_copy_on_a_side_stream_and_match_resident(tier, tiny_files, image64):
    """The same tiers on a GPU: host copies pinned once (mapped blocks stay file pages), blocks copied on the
    side stream behind events, freed by the allocator after their kernels; latents equal resident's, every
    request; the ledger ends with nothing streamed on the device and no accounting slip."""
    model = str(tiny_files) if tier == "mmap" else "tiny"
    ref = build_runtime(Settings(device="cuda", dtype="fp32", model=model, memory="resident", warmup=BUCKET,
                                 backend="eager"))
    expected = ref.generate(P, image64, None).latents.cpu()
    del ref
    pipe = build_runtime(Settings(device="cuda", dtype="fp32", model=model, memory=tier, warmup=BUCKET,
                                  backend="eager"))
    t = tiered(pipe.backend)
    for _ in range(2):
        assert torch.equal(pipe.generate(P, image64, None).latents.cpu(), expected)
    for s in t.streamers.values():
        s.settle()
        hosts = [h for hc in s.host for _, h in hc.pairs]
        assert all(h.device.type == "cpu" for h in hosts)
        assert all(h.is_pinned() for h in hosts) == (tier == "stream")
        assert s.counts["loads"] == s.counts["drops"] and not s.live
    assert t.ledger.parts["expert_blocks"] == 0 and t.ledger.errors == 0
    if tier == "swap":
        assert t.swapper._pending is not None  # the next request's expert is on its way during the decode


def test_engines_are_counted_under_a_tier_that_is_not_resident(tiny_model, mb):
    """TensorRT under swap: one expert's engine is on the device at a time (the backend drops the other); the
    ledger counted engines only when resident, so a swap plan's ledger said nothing of ~28 GB."""
    import copy

    from wanrt.runtime.backends.eager import EagerBackend
    from wanrt.runtime.memory import TieredBackend

    plan = tiered(build_runtime(Settings(device="cpu", model="tiny", warmup=BUCKET),
                                free_bytes=lean_need(mb, "swap")).backend).plan
    assert plan.tier == "swap"
    model = copy.deepcopy(tiny_model)

    class Engines(EagerBackend):  # reports engine bytes as TensorRTBackend does
        expert_bytes = {"high": 1000, "low": 3000}

    t = TieredBackend(model, "cpu", plan, mb, lambda tier: Engines(model))
    assert t.ledger.parts["expert_engine"] == 3000


def test_concurrency_runs_one_slot_under_a_tier_that_is_not_resident(mb, tmp_path):
    """Swaps, block streams and engine switches are not thread-safe (TieredBackend serves one request at a
    time there): WANRT_CONCURRENCY 2 with a swap plan ran two jobs through one swapper. Now one slot, said."""
    from wanrt.jobs.paths import DataPaths
    from wanrt.jobs.store import SqliteJobStore
    from wanrt.jobs.worker import Worker

    pipe = build_runtime(Settings(device="cpu", model="tiny", warmup=BUCKET), free_bytes=lean_need(mb, "swap"))
    assert tiered(pipe.backend).tier == "swap"
    store = SqliteJobStore(DataPaths(tmp_path).ensure().db)
    worker = Worker(Settings(data_dir=tmp_path, concurrency=2), "w", store=store, pipeline=pipe)
    worker.run(poll_s=0.01, max_jobs=0)
    assert worker.slots == 1 and [r["id"] for r in store.workers()] == ["w"]
    # resident, but CUDA graphs asked for: one slot too (graph-tree generation marks are process-wide)
    resident = build_runtime(Settings(device="cpu", model="tiny", warmup=BUCKET))
    graphs = Worker(Settings(data_dir=tmp_path, concurrency=2, backend="compiled", cudagraphs=True), "g",
                    store=store, pipeline=resident)
    graphs.run(poll_s=0.01, max_jobs=0)
    assert graphs.slots == 1
    plain = Worker(Settings(data_dir=tmp_path, concurrency=2), "p", store=store, pipeline=resident)
    plain.run(poll_s=0.01, max_jobs=0)
    assert plain.slots == 2


def test_the_allocator_setting_is_expandable_segments_unless_the_environment_has_one(monkeypatch):
    """gpus.prefer_expandable_segments (build_runtime's first step): an operator's PYTORCH_ALLOC_CONF (torch >=
    2.9's name) or PYTORCH_CUDA_ALLOC_CONF is kept as given; with neither, growable segments."""
    from wanrt.runtime import gpus

    for name in gpus.ALLOC_CONF_VARS:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a GPU host may have started CUDA already
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")  # set, even empty: torch reads it first
    assert gpus.prefer_expandable_segments() == "" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync")
    assert gpus.prefer_expandable_segments() == "backend:cudaMallocAsync"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    assert gpus.prefer_expandable_segments() == gpus.CUDA_ALLOC_CONF == os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    # CUDA started before (set_device in a worker): the setting is applied to the running allocator
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    applied = []
    monkeypatch.setattr(gpus, "_set_allocator_settings", applied.append)
    assert gpus.prefer_expandable_segments() == gpus.CUDA_ALLOC_CONF and applied == [gpus.CUDA_ALLOC_CONF]
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == gpus.CUDA_ALLOC_CONF  # for the processes it starts

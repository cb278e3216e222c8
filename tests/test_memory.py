"""Memory plan: the byte model per part and phase, the tier it picks for each card, and which expert is
resident when (on CPU the copies are real, host and device are the same)."""

import copy
import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wanrt.model import sizes
from wanrt.params import GenerateParams
from wanrt.runtime.backends.eager import EagerBackend
from wanrt.runtime.memory import (
    HOST_RESERVE_BYTES,
    ExpertSwapper,
    GiB,
    ModelBytes,
    OffloadingBackend,
    Options,
    choose_plan,
    estimate_plan,
    host_bytes_needed,
    model_parts,
    module_bytes,
    phase_bytes,
)
from wanrt.runtime.pipeline import WanI2VPipeline

P = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=4)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the `with` (what a caching allocator must hold):
    views and in-place results share their input's storage and count once; storages made before don't."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _drop(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[key]
                self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.live:
                self.live[key][1] += 1
            elif key in inputs or key == 0:
                continue
            else:
                self.live[key] = [t.untyped_storage().nbytes(), 1]
                self.now += self.live[key][0]
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._drop, key)
        return out


# ----------------------------------------------------------------------------------------------- the plan
def test_plan_choice(tiny_model):
    assert choose_plan(tiny_model, "cpu").mode == "resident"
    small = choose_plan(tiny_model, "cpu", free_bytes=10)
    assert small.tier == "stream" and not small.fits  # the leanest GPU tier, and it says it does not fit
    assert choose_plan(tiny_model, "cpu", free_bytes=8 * GiB).tier == "resident"
    assert estimate_plan("tiny", "cpu", torch.float32).mode == "resident"
    assert estimate_plan("x", "cpu", torch.float32, "offload").tier == "swap"  # the old name still works
    with pytest.raises(ValueError, match="memory must be"):
        estimate_plan("x", "cpu", torch.float32, "everything")


def test_part_bytes_of_the_a14b():
    bf16, fp8 = model_parts(2), model_parts(2, fp8=True)
    assert bf16["expert_high"] == 28_637_218_944  # 14.29 B params, 29 M of them kept in fp32 (28.6 GB)
    # FP8: 14.05 B quantised weights at 1 byte + 2.4 M fp32 row scales; the rest as in BF16
    assert fp8["expert_high"] == 14_050_918_400 + 2_396_160 * 4 + (14_288_901_184 - 14_050_918_400 - 29_184_000) * 2 \
        + 29_184_000 * 4 + 262_144 * 4
    assert fp8["expert_load"] == bf16["expert_high"]  # both arrive in BF16 from today's loaders
    wo = 24 * 10240 * 4096  # UMT5-XXL encoder, embeddings tied; FFN output projections kept in fp32
    assert bf16["text_encoder"] == (5_680_910_336 - wo) * 2 + wo * 4
    assert bf16["vae"] == 126_892_531 * 4
    # block streaming's units: 40 blocks + the stem are the expert, in either precision
    for parts in (bf16, fp8):
        assert 40 * parts["expert_block"] + parts["expert_stem"] == parts["expert_high"]
    assert fp8["expert_block"] == 8 * 5120**2 + 2 * 5120 * 13824 + (8 * 5120 + 13824 + 5120) * 4 \
        + (6 * 5120 + 2 * 5120) * 4 + (12 * 5120 + 13824 + 5120) * 2  # 351 MB: 14 ms over PCIe 4.0
    assert 0.48 * GiB < fp8["expert_stem"] < 0.5 * GiB
    assert 24 * bf16["text_block"] + bf16["text_stem"] == bf16["text_encoder"]
    assert bf16["text_stem"] == (256_384 * 4096 + 4096) * 2  # embedding + final norm
    # 640x640x81 -> 33,600 tokens; one block at batch 2 peaks at 11 hidden states of 2*33600*5120 bf16
    x = 2 * 33_600 * 5120 * 2
    assert sizes.bucket_tokens("640x640x81") == 33_600
    assert 11 * x < bf16["loop_workspace"] < 11 * x + 0.15 * GiB
    assert model_parts(2, bucket="1024x1024x121")["loop_workspace"] > 2.5 * bf16["loop_workspace"]


# The planner table: card memory (GiB; free = that minus 1 GiB of CUDA context), host RAM (GiB), how the experts
# are stored (an FP8 checkpoint or BF16), the seed's preset -> tier, fits, the sacrifices (T: text encoder
# streamed, V: VAE on the GPU only to encode/decode, C: cond and uncond one after the other (or no CFG at all:
# fast), tN: VAE tiles of N latent pixels, a1: one block prefetched), the peak phase (GiB) and the host RAM
# the tier needs (GiB, 4 of them the OS and process reserve). Cards: 80 h100, 48 l40s, 24 rtx4090, 12 and 10
# rtx3080 (no FP8 GEMMs: FP8 weights upcast per layer, one 141 MB layer in BF16).
PLANNER_TABLE = """
    80 128 bf16 fast         resident fits C          75.90   4.0
    80 128 bf16 default      resident fits -          75.90   4.0
    80 128 bf16 high_quality resident fits -          78.84   4.0
    80 128 fp8  fast         resident fits C          49.75   4.0
    80 128 fp8  default      resident fits -          49.75   4.0
    80 128 fp8  high_quality resident fits -          52.68   4.0
    80  64 bf16 fast         resident fits C          75.90   4.0
    80  64 bf16 default      resident fits -          75.90   4.0
    80  64 bf16 high_quality resident fits -          78.84   4.0
    80  64 fp8  fast         resident fits C          49.75   4.0
    80  64 fp8  default      resident fits -          49.75   4.0
    80  64 fp8  high_quality resident fits -          52.68   4.0
    80  32 bf16 fast         resident fits C          75.90   4.0
    80  32 bf16 default      resident fits -          75.90   4.0
    80  32 bf16 high_quality resident fits -          78.84   4.0
    80  32 fp8  fast         resident fits C          49.75   4.0
    80  32 fp8  default      resident fits -          49.75   4.0
    80  32 fp8  high_quality resident fits -          52.68   4.0
    48 128 bf16 fast         swap     fits TC         36.77  69.8
    48 128 bf16 default      swap     fits T          36.77  69.8
    48 128 bf16 high_quality swap     fits T          39.71  69.8
    48 128 fp8  fast         resident fits TC         37.29  16.5
    48 128 fp8  default      resident fits T          37.29  16.5
    48 128 fp8  high_quality resident fits T          40.23  16.5
    48  64 bf16 fast         stream   fits C          23.05  57.3
    48  64 bf16 default      stream   fits -          25.20  57.3
    48  64 bf16 high_quality stream   fits -          28.60  57.3
    48  64 fp8  fast         resident fits TC         37.29  16.5
    48  64 fp8  default      resident fits T          37.29  16.5
    48  64 fp8  high_quality resident fits T          40.23  16.5
    48  32 bf16 fast         mmap     fits C          23.05   5.0
    48  32 bf16 default      mmap     fits -          25.20   5.0
    48  32 bf16 high_quality mmap     fits -          28.60   5.0
    48  32 fp8  fast         resident fits TC         37.29  16.5
    48  32 fp8  default      resident fits T          37.29  16.5
    48  32 fp8  high_quality resident fits T          40.23  16.5
    24 128 bf16 fast         stream   fits TC         10.59  69.8
    24 128 bf16 default      stream   fits T          12.74  69.8
    24 128 bf16 high_quality stream   fits T          16.15  69.8
    24 128 fp8  fast         stream   fits TC         10.59  43.6
    24 128 fp8  default      stream   fits T          11.44  43.6
    24 128 fp8  high_quality stream   fits T          14.84  43.6
    24  64 bf16 fast         mmap     fits TC         10.59  17.4
    24  64 bf16 default      mmap     fits T          12.74  17.4
    24  64 bf16 high_quality mmap     fits T          16.15  17.4
    24  64 fp8  fast         stream   fits TC         10.59  43.6
    24  64 fp8  default      stream   fits T          11.44  43.6
    24  64 fp8  high_quality stream   fits T          14.84  43.6
    24  32 bf16 fast         mmap     fits TC         10.59  17.4
    24  32 bf16 default      mmap     fits T          12.74  17.4
    24  32 bf16 high_quality mmap     fits T          16.15  17.4
    24  32 fp8  fast         mmap     fits TC         10.59  17.4
    24  32 fp8  default      mmap     fits T          11.44  17.4
    24  32 fp8  high_quality mmap     fits T          14.84  17.4
    12 128 bf16 fast         stream   fits TC         10.59  69.8
    12 128 bf16 default      stream   fits TC         10.59  69.8
    12 128 bf16 high_quality stream   fits TC         10.89  69.8
    12 128 fp8  fast         stream   fits TC         10.59  43.6
    12 128 fp8  default      stream   fits TC         10.59  43.6
    12 128 fp8  high_quality stream   fits TC         10.59  43.6
    12  64 bf16 fast         mmap     fits TC         10.59  17.4
    12  64 bf16 default      mmap     fits TC         10.59  17.4
    12  64 bf16 high_quality mmap     fits TC         10.89  17.4
    12  64 fp8  fast         stream   fits TC         10.59  43.6
    12  64 fp8  default      stream   fits TC         10.59  43.6
    12  64 fp8  high_quality stream   fits TC         10.59  43.6
    12  32 bf16 fast         mmap     fits TC         10.59  17.4
    12  32 bf16 default      mmap     fits TC         10.59  17.4
    12  32 bf16 high_quality mmap     fits TC         10.89  17.4
    12  32 fp8  fast         mmap     fits TC         10.59  17.4
    12  32 fp8  default      mmap     fits TC         10.59  17.4
    12  32 fp8  high_quality mmap     fits TC         10.59  17.4
    10 128 bf16 fast         stream   fits TCt64       7.84  69.8
    10 128 bf16 default      stream   fits TCt64a1     8.52  69.8
    10 128 bf16 high_quality mmap     NO   TVCt64a1    9.76  17.9
    10 128 fp8  fast         stream   fits TCt64       7.84  43.6
    10 128 fp8  default      stream   fits TCt64       8.00  43.6
    10 128 fp8  high_quality stream   fits TVCt64a1    8.91  44.1
    10  64 bf16 fast         mmap     fits TCt64       7.84  17.4
    10  64 bf16 default      mmap     fits TCt64a1     8.52  17.4
    10  64 bf16 high_quality mmap     NO   TVCt64a1    9.76  17.9
    10  64 fp8  fast         stream   fits TCt64       7.84  43.6
    10  64 fp8  default      stream   fits TCt64       8.00  43.6
    10  64 fp8  high_quality stream   fits TVCt64a1    8.91  44.1
    10  32 bf16 fast         mmap     fits TCt64       7.84  17.4
    10  32 bf16 default      mmap     fits TCt64a1     8.52  17.4
    10  32 bf16 high_quality mmap     NO   TVCt64a1    9.76  17.9
    10  32 fp8  fast         mmap     fits TCt64       7.84  17.4
    10  32 fp8  default      mmap     fits TCt64       8.00  17.4
    10  32 fp8  high_quality mmap     fits TVCt64a1    8.91  17.9
"""
CARDS = {80: "h100", 48: "l40s", 24: "rtx4090", 12: "rtx3080", 10: "rtx3080"}


def _flags(o) -> str:
    return ("T" if o.text_encoder == "streamed" else "") + ("V" if not o.vae_resident else "") + \
        ("C" if o.cfg_batch == 1 else "") + (f"t{o.vae_tile}" if o.vae_tile else "") + ("a1" if o.ahead == 1 else "")


def test_planner_table():
    from wanrt.runtime.memory import plan_for_card

    rows = [line.split() for line in PLANNER_TABLE.strip().splitlines()]
    assert len(rows) == 5 * 3 * 2 * 3
    for mem, host, weights, preset, tier, fit, flags, need, host_need in rows:
        r = plan_for_card(CARDS[int(mem)], int(mem), int(host), preset, weights)
        plan = r["plan_obj"]
        got = (plan.tier, "fits" if plan.fits else "NO", _flags(plan.options) or "-",
               f"{plan.need_bytes / GiB:.2f}", f"{plan.host_need_bytes / GiB:.1f}")
        assert got == (tier, fit, flags, need, host_need), (mem, host, weights, preset, plan.table())
        assert plan.need_bytes == max(plan.phases.values())
        if plan.fits:
            assert plan.need_bytes <= int(mem) * GiB - GiB and plan.host_need_bytes <= int(host) * GiB


def test_phases_add_up_from_the_parts():
    mb = ModelBytes.from_config(2, fp8=True)
    o = Options()
    for tier in ("resident", "swap", "stream"):
        ph = phase_bytes(mb, tier, o)
        experts = {"resident": 2 * mb.expert, "swap": mb.expert, "stream": mb.stem + 4 * mb.block}[tier]
        assert ph["loop"] == experts + mb.text_encoder + mb.vae + mb.loop_ws(33_600, 2) + mb.overhead
    streamed = phase_bytes(mb, "stream", Options(text_encoder="streamed"))
    assert streamed["text"] == mb.stem + mb.text_stem + 4 * mb.text_block + mb.text_ws(2) + mb.vae + mb.overhead
    assert phase_bytes(mb, "stream", Options(cfg_batch=1))["loop"] < phase_bytes(mb, "stream")["loop"]
    tiled = phase_bytes(mb, "stream", Options(vae_tile=32))
    assert tiled["vae_decode"] == mb.stem + mb.text_encoder + mb.vae + 20_000 * 256 * 256 + mb.overhead
    # host: both experts as they arrive (BF16, before the FP8 swap), then pinned; only the stems for mmap
    assert host_bytes_needed(mb, "stream") == 2 * mb.expert_load + HOST_RESERVE_BYTES
    fp8_file = ModelBytes.from_config(2, fp8=True, load_fp8=True)
    assert host_bytes_needed(fp8_file, "stream") == 2 * fp8_file.expert + HOST_RESERVE_BYTES
    assert host_bytes_needed(fp8_file, "mmap") == 2 * fp8_file.stem + HOST_RESERVE_BYTES


def test_plan_options():
    free, host = 80 * GiB, 512 * GiB
    fp8_loaded = estimate_plan("random-full", "cuda", torch.bfloat16, fp8=True, free_bytes=free, fp8_at_load=True)
    assert fp8_loaded.tier == "resident" and round(fp8_loaded.need_bytes / GiB, 2) == 49.75  # the decode
    # the largest warm-up bucket sets the workspace
    big = estimate_plan("random-full", "cuda", torch.bfloat16, free_bytes=free, warmup=("640x640x81", "1024x1024x121"),
                        host_bytes=host)
    assert big.parts["loop_workspace"] > estimate_plan("random-full", "cuda", torch.bfloat16, free_bytes=free).parts["loop_workspace"]
    assert big.tier == "swap" and big.options.cfg_batch == 2  # a leaner tier before splitting the batch
    # a requested tier is honoured and still priced
    req = estimate_plan("random-full", "cuda", torch.bfloat16, "resident", free_bytes=24 * GiB)
    assert req.tier == "resident" and not req.fits and req.need_bytes > 24 * GiB
    # a 48 GB card reports ~44.5 GiB free: FP8 checkpoint resident once the text encoder streams
    plan = estimate_plan("random-full", "cuda", torch.bfloat16, fp8=True, fp8_at_load=True, free_bytes=int(44.5 * GiB))
    assert plan.tier == "resident" and not plan.text_encoder_resident, plan.table()
    # host RAM decides between pinned copies and mapped files
    short = dict(fp8=True, fp8_at_load=True, free_bytes=23 * GiB, host_bytes=32 * GiB)
    assert estimate_plan("random-full", "cuda", torch.bfloat16, **short, mmap_ok=True).tier == "mmap"
    nothing_to_map = estimate_plan("random-full", "cuda", torch.bfloat16, **short)  # random-full has no files
    # nothing to map: stream, keeping the text encoder on the GPU (its host copy would not fit) and paying for
    # that with cond/uncond one after the other and VAE tiles
    assert nothing_to_map.tier == "stream" and nothing_to_map.fits and nothing_to_map.text_encoder_resident
    assert nothing_to_map.options.cfg_batch == 1 and nothing_to_map.options.vae_tile is not None
    starved = estimate_plan("random-full", "cuda", torch.bfloat16, **{**short, "host_bytes": 16 * GiB})
    assert not starved.fits and "host RAM" in starved.reason
    assert estimate_plan("random-full", "cuda", torch.bfloat16, **{**short, "host_bytes": 64 * GiB}).tier == "stream"


def test_projection_formula():
    """The projected loop time is the FLOP model over the card's peak at the stated efficiency; streamed blocks'
    copies hide behind compute at 33,600 tokens, not at 2,000."""
    from wanrt.model.components import UNIPC_SCHEDULER_CONFIG  # noqa: F401 (the split the planner uses)
    from wanrt.runtime import gpus
    from wanrt.runtime.memory import ASSUMED_EFFICIENCY, plan_for_card, projected_seconds

    r = plan_for_card("rtx4090", 24, 64, "default", "fp8")
    fwd = sizes.forward_flops(81, 640, 640)
    g = gpus.GPUS["rtx4090"]
    eff = ASSUMED_EFFICIENCY["loop"]
    per_forward = fwd.linear / (g.fp8_tflops * 1e12 * eff) + fwd.attention / (g.bf16_tflops * 1e12 * eff)
    assert abs(r["projected_s"]["loop_s"] - 6 * 2 * per_forward) < 0.01  # 6 steps, batch 2
    assert r["projected_s"]["loop_exposed_s"] < 0.1  # only the first blocks of each expert
    plan = r["plan_obj"]
    mb = ModelBytes.from_config(2, True, load_fp8=True)
    small = projected_seconds(plan, mb, g, steps=6, frames=17, width=256, height=256, cfg_high_noise=1.0,
                              cfg_low_noise=1.0, steps_high=3)
    assert small["loop_exposed_s"] > 1.0  # 1,280 tokens: copying a block takes longer than running it
    ampere = plan_for_card("rtx3080", 10, 64, "default", "fp8")
    assert ampere["projected_s"]["linear_precision"] == "bf16"  # FP8 weights, BF16 GEMMs


def test_block_workspace_formula_matches_live_tensors():
    """The 11X / 4X + 2F model of one eager expert forward, against the tensors really alive (bf16, CPU)."""
    from diffusers import WanTransformer3DModel

    from wanrt.model.components import cast_module

    torch.manual_seed(0)
    for heads, ffn, batch in ((2, 352, 2), (4, 96, 1)):
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=64, in_channels=36,
                   out_channels=16, text_dim=64, freq_dim=32, ffn_dim=ffn, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=64)
        m = cast_module(WanTransformer3DModel(**cfg), "cpu", torch.bfloat16).eval()
        x = torch.randn(batch, 36, 3, 32, 32, dtype=torch.bfloat16)
        ctx = torch.randn(batch, 16, 64, dtype=torch.bfloat16)
        with torch.inference_mode(), LiveBytes() as live:
            m(hidden_states=x, timestep=torch.full((batch,), 900.0), encoder_hidden_states=ctx, return_dict=False)
        model = sizes.forward_workspace_bytes(3 * 16 * 16, batch, heads * 64, ffn, head_dim=64, text_len=16)
        assert live.peak <= model <= 1.02 * live.peak, (live.peak, model)


def test_vae_decode_workspace_per_pixel():
    """The real Wan 2.1 VAE (base dim 96), streaming decode at 32x32: the per-pixel constant bounds it."""
    from diffusers import AutoencoderKLWan

    from wanrt.runtime.vae import decode_stream

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()
    with LiveBytes() as live:
        for chunk in decode_stream(vae, torch.randn(1, 16, 2, 4, 4)):
            del chunk
    model = sizes.vae_decode_workspace_bytes(32, 32)
    assert live.peak <= model <= 1.15 * live.peak, (live.peak, model)


# ----------------------------------------------------------------------------------------------- swapping
def _offloaded(tiny_model):
    model = copy.copy(tiny_model)
    model.transformer_high = copy.deepcopy(tiny_model.transformer_high)
    model.transformer_low = copy.deepcopy(tiny_model.transformer_low)
    return model


def test_offloading_swaps_once_per_request_and_prefetches_for_the_next(tiny_model, image64):
    model = _offloaded(tiny_model)
    log = []
    swapper = ExpertSwapper(model.experts, "cpu", log=log)
    assert log == [("host", "high"), ("host", "low")]
    backend = OffloadingBackend(EagerBackend(model), swapper)
    ref = WanI2VPipeline(tiny_model).generate(P, image64, None).latents
    log.clear()
    got = WanI2VPipeline(model, backend).generate(P, image64, None).latents
    assert torch.equal(got, ref)
    # 2 high steps, then one swap to low, 2 low steps, then high comes back for the next request
    assert log == [("load", "high"), ("evict", "high"), ("load", "low"), ("evict", "low"), ("prefetch", "high")]
    log.clear()
    again = WanI2VPipeline(model, backend).generate(P, image64, None).latents
    assert torch.equal(again, ref)
    assert log == [("evict", "high"), ("load", "low"), ("evict", "low"), ("prefetch", "high")]  # high was there
    assert backend.describe()["memory"] == "offload"


def test_host_copies_are_made_once_and_evicting_drops_the_device_copy(tiny_model, image64):
    model = _offloaded(tiny_model)
    swapper = ExpertSwapper(model.experts, "cpu")
    host_ptrs = {name: [h.data_ptr() for _, h in pairs] for name, pairs in swapper._host.items()}
    n_high, n_low = len(swapper._host["high"]), len(swapper._host["low"])
    assert swapper.copies["host"] == 0  # already on the host (CPU): nothing to copy, nothing to pin
    backend = OffloadingBackend(EagerBackend(model), swapper)
    for _ in range(2):
        WanI2VPipeline(model, backend).generate(P, image64, None)
    # request 1: high, low, high (prefetch); request 2: low, high (prefetch); never a copy back to the host
    assert swapper.copies == {"to_device": 3 * n_high + 2 * n_low}
    assert {name: [h.data_ptr() for _, h in pairs] for name, pairs in swapper._host.items()} == host_ptrs
    # the resident expert runs on its own copy; the evicted one points at its host tensors again
    high = dict(model.transformer_high.named_parameters())
    low = dict(model.transformer_low.named_parameters())
    assert swapper.resident == "high"
    assert all(p.data_ptr() not in host_ptrs["high"] for p in high.values())
    assert {p.data_ptr() for p in low.values()} <= set(host_ptrs["low"])
    assert all(torch.equal(high[k], p) for k, p in tiny_model.transformer_high.named_parameters())


@pytest.mark.gpu
def test_cuda_swap_pins_once_prefetches_on_a_side_stream_and_matches_resident(tiny_model, image64):
    device = "cuda"
    resident = copy.deepcopy(tiny_model).to(device, torch.float32)
    ref = WanI2VPipeline(resident, device=device).generate(P, image64, None).latents.cpu()
    model = copy.deepcopy(tiny_model).to(device, torch.float32)
    swapper = ExpertSwapper(model.experts, device)
    n = sum(len(p) for p in swapper._host.values())
    assert swapper.copies["host"] == n
    assert all(h.is_pinned() for pairs in swapper._host.values() for _, h in pairs)
    backend = OffloadingBackend(EagerBackend(model), swapper)
    for _ in range(2):
        got = WanI2VPipeline(model, backend, device=device).generate(P, image64, None).latents.cpu()
        assert torch.equal(got, ref)
    assert swapper.copies["host"] == n  # pinned once, at construction
    assert swapper._pending is not None  # the prefetch for the next request is in flight
    swapper.ensure("high")
    assert swapper._pending is None


def _diffusers_dir_configs(root, **expert):
    """A diffusers dir's configs, no weights: what `plan_runtime` reads before anything is loaded."""
    import json

    for sub, cfg in (("transformer", {**sizes.A14B_EXPERT, **expert}), ("transformer_2", {**sizes.A14B_EXPERT, **expert}),
                     ("text_encoder", sizes.UMT5_XXL)):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(cfg))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    return str(root)


def test_serving_a_diffusers_dir_compiled_on_an_80gb_card_is_resident(tmp_path):
    """`wanrt serve --model <diffusers dir> --backend compiled` on an H100 80 GB: both experts stay resident in
    FP8 (they arrive in BF16 and are swapped one at a time, so the load phase is the largest), and the plan is
    priced from the dir's own configs."""
    from wanrt.config import Settings
    from wanrt.runtime.factory import plan_runtime

    h100 = 80 * GiB - GiB  # the card minus a CUDA context (gpus.CUDA_CONTEXT_BYTES)
    host = 256 * GiB
    a14b = _diffusers_dir_configs(tmp_path / "a14b")
    plan, mb, mapped = plan_runtime(Settings(model=a14b, backend="compiled", device="cuda"), free_bytes=h100,
                                    host_bytes=host)
    assert plan.tier == "resident" and plan.fits and not mapped, plan.table()
    assert mb.fp8 and mb.expert_high == sizes.expert_params().bytes(2, fp8=True)  # FP8 as served
    assert mb.expert_load == sizes.expert_params().bytes(2)  # BF16 as it arrives
    assert plan.need_bytes == max(plan.phases.values()) < h100
    # the eager backend keeps the experts in BF16: resident still, with less room to spare
    eager, mb_bf16, _ = plan_runtime(Settings(model=a14b, backend="eager", device="cuda"), free_bytes=h100,
                                     host_bytes=host)
    assert not mb_bf16.fp8 and mb_bf16.expert_high == mb.expert_load and eager.need_bytes > plan.need_bytes
    # the default backend (auto) is the compiled one on CUDA: priced in FP8 like it; on the CPU it is eager
    default = Settings(model=a14b, device="cuda")
    assert default.backend == "auto" and default.resolved_backend() == "compiled"
    assert plan_runtime(default, free_bytes=h100, host_bytes=host)[1] == mb
    assert Settings(device="cpu").resolved_backend() == "eager" and Settings(device="cpu", backend="tensorrt"
                                                                             ).resolved_backend() == "tensorrt"
    # a dir with half the blocks is priced as such (not as the A14B)
    half, mb_half, _ = plan_runtime(Settings(model=_diffusers_dir_configs(tmp_path / "half", num_layers=20),
                                             backend="compiled", device="cuda"), free_bytes=h100, host_bytes=host)
    assert mb_half.n_blocks == 20 and mb_half.expert_high < 0.55 * mb.expert_high and half.tier == "resident"


def _shard_header(path, dtype: str, second: str | None = None) -> None:
    """A .safetensors file with only its header (two blocks' matrices in `dtype`, the second in `second` when
    given): what checkpoint_info reads."""
    import json
    import struct

    tensors = {f"blocks.{i}.ffn.net.0.proj.weight": {"dtype": d, "shape": [13824, 5120], "data_offsets": [0, 0]}
               for i, d in enumerate((dtype, second or dtype))}
    # diffusers' save_pretrained keeps the time embedder in fp32 (_keep_in_fp32_modules) whatever the rest is
    tensors["condition_embedder.time_embedder.linear_1.weight"] = {"dtype": "F32", "shape": [5120, 256],
                                                                   "data_offsets": [0, 0]}
    header = json.dumps(tensors).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_4090_on_a_64gb_host_streams_fp8_from_a_diffusers_dir(tmp_path):
    """The seed's 24 GB card with 64 GB of host RAM and a diffusers dir in BF16 or FP32: the experts are read
    mapped and quantised a layer at a time, so the host holds both in FP8 (not both in BF16 first, 57 GB, which
    sent this plan to the mmap tier: BF16, no FP8). The mmap tier is offered only for files in the run's precision
    (FP32 files would be cast into RAM, not mapped); blocks of mixed precisions load whole, priced so."""
    from wanrt.config import Settings
    from wanrt.runtime.factory import plan_runtime
    from wanrt.runtime.memory import host_bytes_needed

    plans = {}
    for stored, second in (("BF16", None), ("F32", None), ("BF16", "F16")):
        name = stored + (second or "")
        root = _diffusers_dir_configs(tmp_path / name)
        for sub in ("transformer", "transformer_2"):
            _shard_header(tmp_path / name / sub / "diffusion_pytorch_model.safetensors", stored, second)
        plans[name] = plan_runtime(Settings(model=root, device="cuda"), free_bytes=23 * GiB, host_bytes=64 * GiB)
    for name in ("BF16", "F32"):
        plan, mb, mapped = plans[name]
        assert plan.tier == "stream" and plan.fits and mb.fp8 and mb.load_mapped and not mapped, plan.table()
        assert plan.host_need_bytes == host_bytes_needed(mb, "stream", plan.options) < 64 * GiB
        assert host_bytes_needed(dataclasses.replace(mb, load_mapped=False), "stream", plan.options) > 64 * GiB
        # swap fuses Q/K/V in the load dtype before quantising: it still loads (and is priced) whole
        assert host_bytes_needed(mb, "swap", plan.options) == host_bytes_needed(
            dataclasses.replace(mb, load_mapped=False), "swap", plan.options)
    mixed, mb_mixed, _ = plans["BF16F16"]
    assert not mb_mixed.load_mapped and mixed.tier != "mmap", mixed.table()  # (fits: text encoder kept on the GPU)
    assert mixed.host_need_bytes > plans["BF16"][0].host_need_bytes
    # 32 GB of host RAM: BF16 files are mapped as they are (mmap, before stream's per-request sacrifices); FP32
    # files are not offered mmap (they would be cast into RAM) and stream FP8 from their mapping instead
    bf16, f32 = (plan_runtime(Settings(model=str(tmp_path / name), device="cuda"), free_bytes=23 * GiB,
                              host_bytes=32 * GiB)[0] for name in ("BF16", "F32"))
    assert bf16.tier == "mmap" and bf16.fits and f32.tier == "stream" and f32.fits, (bf16.table(), f32.table())


def test_lora_slots_and_cache_are_planned(tiny_model, tmp_path):
    """The slot buffers the planner counts are the ones install_lora_slots really adds (a built expert, FP32
    norms kept), and a LoRA dir moves a 24 GB plan by the slots of both experts plus the prepared cache."""
    from wanrt.config import Settings
    from wanrt.runtime.factory import plan_runtime
    from wanrt.runtime.lora import install_lora_slots
    from wanrt.runtime.memory import lora_slot_bytes

    expert = copy.deepcopy(tiny_model.transformer_high).float()
    before = {"whole": module_bytes(expert), "block": max(module_bytes(b) for b in expert.blocks)}
    install_lora_slots(expert, 8)
    whole, stem, block = lora_slot_bytes(dict(expert.config), 8, torch.float32)
    assert whole == module_bytes(expert) - before["whole"] > 0
    assert block == max(module_bytes(b) for b in expert.blocks) - before["block"] > 0 and stem > 0
    # the A14B at rank 64 in BF16: 0.59 GiB per expert
    assert round(lora_slot_bytes(None, 64, torch.bfloat16)[0] / GiB, 2) == 0.59

    a14b = _diffusers_dir_configs(tmp_path / "a14b")
    kw = dict(model=a14b, backend="compiled", device="cuda", memory="swap")
    base_plan, base, _ = plan_runtime(Settings(**kw), free_bytes=24 * GiB, host_bytes=128 * GiB)
    plan, mb, _ = plan_runtime(Settings(**kw, lora_dir=str(tmp_path), max_lora_rank=64, lora_cache_gb=2),
                               free_bytes=24 * GiB, host_bytes=128 * GiB)
    slots = lora_slot_bytes(None, 64, torch.bfloat16)[0]
    assert mb.expert_high - base.expert_high == slots and mb.lora_cache == 2 * GiB
    same = base_plan.options  # the same choices cost the slots of the running expert and the cache more
    assert phase_bytes(mb, "swap", same)["loop"] - phase_bytes(base, "swap", same)["loop"] == slots + 2 * GiB
    assert plan.fits and plan.need_bytes <= 24 * GiB and plan.resident_parts()["lora_cache"] == 2 * GiB
    assert plan.options != same  # 2.6 GiB less room: the plan gave something up to fit (it did not before)


def test_host_copies_are_one_exact_pinned_buffer_per_expert_and_block(tiny_model, monkeypatch):
    """On CUDA each tensor used to be pinned alone, and torch's pinned allocator rounds every allocation up to a
    power of two: an FP8 A14B block of 335 MiB took 513 MiB, ~1.5x what host_bytes_needed budgets. Now one
    buffer per expert (swap), stem and block (stream), page-locked at its exact size (CPU: the locking and the
    streams are stand-ins; the tensors' own data is what CPU tiers use)."""
    import wanrt.runtime.streaming as streaming
    from wanrt.model.loading import WAN22_I2V_A14B_TRANSFORMER_CONFIG
    from wanrt.runtime.memory import host_bytes_needed, module_bytes
    from wanrt.runtime.streaming import BlockStreamer, tensors_of

    locked, pinned = [], []
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: None)
    monkeypatch.setattr(streaming, "_page_lock", lambda mapping, buffer: locked.append(buffer.numel()) or True,
                        raising=False)
    monkeypatch.setattr(torch.Tensor, "pin_memory",  # torch's pinned allocator: a power of two per allocation
                        lambda self: pinned.append(1 << (self.nbytes - 1).bit_length()) or self.clone())

    def aligned(tensors):
        return sum(-(-t.nbytes // streaming.ALIGN) * streaming.ALIGN for t in tensors)

    model = _offloaded(tiny_model)
    want = {k: v.clone() for k, v in model.transformer_high.state_dict().items()}
    swapper = ExpertSwapper(model.experts, "cuda")
    assert not pinned and locked == [aligned(tensors_of(e)) for e in model.experts.values()]  # one each, exact
    assert sum(locked) <= host_bytes_needed(ModelBytes.measure(model), "swap") + streaming.ALIGN * swapper.copies["host"]
    assert all(torch.equal(v, want[k]) for k, v in model.transformer_high.state_dict().items())
    assert swapper.copies["host"] == sum(len(tensors_of(e)) for e in model.experts.values())

    locked.clear()
    model = _offloaded(tiny_model)
    expert = model.transformer_high
    ExpertSwapper({"high": expert}, "cuda", exclude=lambda m: list(m.blocks))
    streamer = BlockStreamer("expert_blocks", expert.blocks, "cuda")
    assert not pinned and locked == [aligned(tensors_of(expert, expert.blocks))] + [aligned(tensors_of(b)) for b in expert.blocks]
    streamer.close()

    # At the A14B's sizes (one block at the real widths, on meta) the alignment costs nothing: the locked bytes are
    # the bytes the planner prices, where a power of two per tensor was 1.5x.
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        a14b = WanTransformer3DModel(**{**WAN22_I2V_A14B_TRANSFORMER_CONFIG, "num_layers": 1})
    tensors, priced = tensors_of(a14b), module_bytes(a14b)
    assert aligned(tensors) < 1.0001 * priced
    assert sum(1 << (t.nbytes - 1).bit_length() for t in tensors) > 1.4 * priced

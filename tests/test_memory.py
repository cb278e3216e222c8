"""Memory plan: the byte model per part and phase, the tier it picks for each card, and which expert is
resident when (on CPU the copies are real, host and device are the same)."""

import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wanrt.model import sizes
from wanrt.params import GenerateParams
from wanrt.runtime.backends.eager import EagerBackend
from wanrt.runtime.memory import (
    ExpertSwapper,
    GiB,
    OffloadingBackend,
    choose_plan,
    estimate_plan,
    model_parts,
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
    assert small.mode == "offload" and not small.fits
    assert choose_plan(tiny_model, "cpu", free_bytes=8 * GiB).mode == "resident"
    assert estimate_plan("tiny", "cpu", torch.float32).mode == "resident"
    assert estimate_plan("x", "cpu", torch.float32, "offload").mode == "offload"


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
    # 640x640x81 -> 33,600 tokens; one block at batch 2 peaks at 11 hidden states of 2*33600*5120 bf16
    x = 2 * 33_600 * 5120 * 2
    assert sizes.bucket_tokens("640x640x81") == 33_600
    assert 11 * x < bf16["loop_workspace"] < 11 * x + 0.15 * GiB
    assert model_parts(2, bucket="1024x1024x121")["loop_workspace"] > 2.5 * bf16["loop_workspace"]


# free GiB, fp8 -> mode, fits, text encoder kept, peak GiB (largest phase incl. 2 GiB overhead), phase at the peak.
# A real H100 80GB reports ~78.5 GiB free and a 48 GB card ~44.5 GiB.
PLAN_TABLE = [
    (80, False, "resident", True, True, 75.90, "vae_decode"),
    (80, True, "resident", True, True, 68.27, "load"),  # both experts arrive in BF16, then the FP8 swap
    (78, False, "resident", True, True, 75.90, "vae_decode"),
    (78, True, "resident", True, True, 68.27, "load"),
    (48, False, "offload", True, False, 42.09, "text"),  # one expert + the text encoder while it encodes
    (48, True, "offload", True, True, 36.15, "vae_decode"),  # resident would need 68.3 at load
    (24, False, "offload", False, False, 42.09, "text"),  # one BF16 expert (26.7 GiB) alone is more than the card
    (24, True, "offload", False, False, 29.01, "text"),  # loop 23.2 would fit; expert + text encoder do not
    (12, False, "offload", False, False, 42.09, "text"),
    (12, True, "offload", False, False, 29.01, "text"),
]


@pytest.mark.parametrize("free_gib,fp8,mode,fits,keep_te,need_gib,peak", PLAN_TABLE)
def test_plan_table(free_gib, fp8, mode, fits, keep_te, need_gib, peak):
    plan = estimate_plan("random-full", "cuda", torch.bfloat16, fp8=fp8, free_bytes=free_gib * GiB)
    assert (plan.mode, plan.fits, plan.text_encoder_resident) == (mode, fits, keep_te), plan.table()
    assert round(plan.need_bytes / GiB, 2) == need_gib, plan.table()
    assert plan.need_bytes == max(plan.phases.values()) and max(plan.phases, key=plan.phases.get) == peak
    # the phases add up from the parts
    parts = plan.parts
    experts = parts["expert_high"] + (parts["expert_low"] if mode == "resident" else 0)
    assert plan.phases["loop"] == experts + parts["text_encoder"] * plan.text_encoder_resident + parts["vae"] \
        + parts["loop_workspace"] + parts["overhead"]


def test_plan_options():
    free = 80 * GiB
    fp8_loaded = estimate_plan("random-full", "cuda", torch.bfloat16, fp8=True, free_bytes=free, fp8_at_load=True)
    assert fp8_loaded.mode == "resident" and round(fp8_loaded.need_bytes / GiB, 2) == 49.75  # the decode
    # the largest warm-up bucket sets the workspace
    big = estimate_plan("random-full", "cuda", torch.bfloat16, free_bytes=free, warmup=("640x640x81", "1024x1024x121"))
    assert big.parts["loop_workspace"] > estimate_plan("random-full", "cuda", torch.bfloat16, free_bytes=free).parts["loop_workspace"]
    assert big.mode == "offload"
    # a requested mode is honoured and still priced
    req = estimate_plan("random-full", "cuda", torch.bfloat16, "resident", free_bytes=24 * GiB)
    assert req.mode == "resident" and not req.fits and req.need_bytes > 24 * GiB
    # the text encoder leaves the device when only that makes it fit: a 48 GB card reports ~44.5 GiB free
    parts = model_parts(2, fp8=True)
    keep, drop = phase_bytes(parts, "resident", True, True), phase_bytes(parts, "resident", False, True)
    assert keep["loop"] - drop["loop"] == parts["text_encoder"] and keep["text"] == drop["text"]
    plan = estimate_plan("random-full", "cuda", torch.bfloat16, fp8=True, fp8_at_load=True,
                         free_bytes=int(44.5 * GiB))
    assert plan.mode == "resident" and not plan.text_encoder_resident, plan.table()
    assert max(plan.phases, key=plan.phases.get) == "text"  # both experts + the text encoder, while it runs


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

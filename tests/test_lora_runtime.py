"""LoRAs per request (issue 15): side paths equal build-time fusion, swaps are exact and order-free, compiled
graphs survive swaps, bad files are refused by name; the request field and the worker's pick are pure Python."""

import copy
import hashlib
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from wanrt.engine_build.lora import fuse_lora
from wanrt.lora_request import MAX_LORAS, parse_loras, pick_next, published_loras, request_key
from wanrt.params import GenerateParams, ParamError
from wanrt.runtime import sampler as sampling
from wanrt.runtime.lora import (
    ExpertLayout,
    LoraEntry,
    LoraError,
    LoraLibrary,
    LoraLinear,
    LoraNorm,
    LoraSlotGroup,
    install_lora_slots,
)
from wanrt.runtime.pipeline import WanI2VPipeline

from conftest import make_image, wait_for
from lora_fixtures import TARGETS, as_format, lightx2v_like, random_lora, to_original

MAX_RANK = 16
# cfg > 1 on the high expert (cond + uncond batched), 1 on the low one: both paths run.
PARAMS = GenerateParams(prompt="a cat smiling", steps=4, frames=9, width=64, height=64, cfg_high_noise=3.5,
                        cfg_low_noise=1.0, seed=7)


def copy_model(model):
    out = copy.copy(model)  # text encoder, VAE and tokenizer shared; experts our own
    out.transformer_high, out.transformer_low = copy.deepcopy(model.transformer_high), copy.deepcopy(model.transformer_low)
    return out


def lightning_like(expert, seed=5):
    """Low-rank pairs with alpha plus Lightning-style `.diff_b` (linear bias) and `.diff` (norm weights)."""
    sd = as_format(random_lora(expert, rank=4, seed=seed, alpha=8.0, targets=["blocks.0.attn1.to_k", "proj_out"]), "comfy")
    g = torch.Generator().manual_seed(seed)
    sd["diffusion_model.blocks.0.self_attn.k.diff_b"] = torch.randn(32, generator=g) * 0.1
    sd["diffusion_model.blocks.1.ffn.2.diff_b"] = torch.randn(32, generator=g) * 0.1
    sd[f"diffusion_model.{to_original('blocks.1.attn1.norm_q')}.diff"] = torch.randn(32, generator=g) * 0.1
    sd[f"diffusion_model.{to_original('blocks.0.norm2')}.diff"] = torch.randn(32, generator=g) * 0.1
    sd[f"diffusion_model.{to_original('blocks.0.norm2')}.diff_b"] = torch.randn(32, generator=g) * 0.1
    return sd


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("lora_lib")
    high = tiny_model.transformer_high
    files = {
        "style": as_format(random_lora(high, rank=4, seed=1, alpha=2.0), "comfy"),
        "motion": as_format(random_lora(high, rank=8, seed=2, targets=TARGETS[1:] + ["blocks.1.attn2.to_v"]), "peft"),
        "detail": as_format(random_lora(high, rank=6, seed=3, targets=["blocks.0.attn2.to_q", "blocks.1.ffn.net.2"]),
                            "wan"),
        "kohya": as_format(random_lora(high, rank=4, seed=4, alpha=4.0), "kohya"),
        "lightning": lightning_like(high),
    }
    for name, sd in files.items():
        save_file(sd, str(d / f"{name}.safetensors"))
    return d, files


def test_a_write_that_fails_midway_forgets_the_loaded_set(tiny_model, lora_dir, monkeypatch):
    """Any error while the set is written (not only a refusal before it): the high expert holds the new set, the
    low one the old; the key is forgotten, so the old set asked again is written again, not skipped over the mix."""
    model = copy_model(tiny_model)
    group = LoraSlotGroup.install(model.experts, max_rank=8)
    library = LoraLibrary(lora_dir[0], group.layouts, 8)
    group.apply_request(library, [{"name": "style"}])
    low, apply = group.slots["low"], group.slots["low"].apply

    def fails(*args):
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode (injected)")

    monkeypatch.setattr(low, "apply", fails)
    with pytest.raises(RuntimeError, match="injected"):
        group.apply_request(library, [{"name": "motion"}])
    assert group.loaded_key is None and all(s._anchor is None for s in group.slots.values())  # all rewritten next
    monkeypatch.setattr(low, "apply", apply)
    assert group.apply_request(library, [{"name": "style"}]) == {"high": "swap", "low": "swap"}


def snapshot(d):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def served(tiny_model, lora_dir):
    """A model with slots on both experts and its library; tests leave it with no LoRA loaded."""
    model = copy_model(tiny_model)
    group = LoraSlotGroup.install(model.experts, max_rank=MAX_RANK)
    library = LoraLibrary(lora_dir[0], group.layouts, MAX_RANK)
    return model, group, library, WanI2VPipeline(model)


_INPUTS = {}


def run(pipe, params=PARAMS):
    """The two-expert loop on `pipe`'s backend from fixed inputs (text and first-frame encodings made once: the
    VAE encode is most of a tiny request and the same for every run here)."""
    if params not in _INPUTS:
        embeds = pipe.encode_text([params.prompt, params.negative_prompt])
        _INPUTS[params] = (embeds[:1], embeds[1:], pipe.encode_image(make_image(64, 64), params), pipe.initial_noise(params))
    context, negative, condition, noise = _INPUTS[params]
    scheduler = sampling.make_scheduler(pipe.model.scheduler_config)
    plan = sampling.plan_steps(scheduler, params.steps, pipe.model.boundary_ratio, params.cfg_high_noise,
                               params.cfg_low_noise)
    return sampling.sample(pipe.backend, scheduler, plan, noise.clone(), condition, context, negative, torch.float32)


@pytest.fixture(scope="module")
def base_latents(tiny_model):
    return run(WanI2VPipeline(tiny_model))


def fused_latents(tiny_model, files, loras):
    ref = copy_model(tiny_model)
    for d in loras:
        for expert in ("high", "low"):
            if d["expert"] in ("both", expert):
                fuse_lora(ref.experts[expert], files[d["name"]], d["strength"])
    return run(WanI2VPipeline(ref))


@pytest.mark.parametrize("loras", [
    [{"name": "style", "strength": 0.8, "expert": "both"}],
    [{"name": "kohya", "strength": 1.3, "expert": "high"}, {"name": "motion", "strength": -0.6, "expert": "low"}],
    [{"name": "style", "strength": 0.7, "expert": "both"}, {"name": "detail", "strength": 1.5, "expert": "both"},
     {"name": "motion", "strength": 0.4, "expert": "high"}],  # stacked along the rank: 4 + 8 rows where they meet
    [{"name": "lightning", "strength": 1.0, "expert": "high"}, {"name": "style", "strength": 0.5, "expert": "low"}],
], ids=["one-both", "per-expert", "stacked", "diffs-and-norms"])
def test_request_lora_equals_build_time_fusion(tiny_model, lora_dir, served, base_latents, loras):
    model, group, library, pipe = served
    parsed = parse_loras(loras, library.available())
    actions = group.apply_request(library, parsed)
    assert set(actions.values()) <= {"swap"}
    try:
        got = run(pipe)
    finally:
        group.apply_request(library, [])
    want = fused_latents(tiny_model, lora_dir[1], parsed)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - base_latents).abs().max().item() > 1e-3  # the LoRA really acts
    assert torch.equal(run(pipe), base_latents)  # cleared: the base again, bit for bit
    if len(loras) == 1:  # the whole request path gives the same latents
        group.apply_request(library, parsed)
        try:
            assert torch.equal(pipe.generate(PARAMS, make_image(64, 64), None).latents, got)
        finally:
            group.apply_request(library, [])


def test_order_independence_bit_identical_and_files_untouched(tiny_model, lora_dir, served, base_latents):
    model, group, library, pipe = served
    before = snapshot(lora_dir[0])
    a = [{"name": "style", "strength": 0.9, "expert": "both"}, {"name": "lightning", "strength": 0.5, "expert": "high"}]
    b = [{"name": "motion", "strength": 1.2, "expert": "both"}]
    seq = []
    for loras in (a, b, a):
        group.apply_request(library, loras)
        seq.append(run(pipe))
    group.apply_request(library, [])
    after_clear = run(pipe)

    def alone(loras):  # a model that never saw another set
        fresh = copy_model(tiny_model)
        g = LoraSlotGroup.install(fresh.experts, max_rank=MAX_RANK)
        g.apply_request(LoraLibrary(lora_dir[0], g.layouts, MAX_RANK), loras)
        return run(WanI2VPipeline(fresh))

    assert torch.equal(seq[0], seq[2]) and torch.equal(seq[2], alone(a))
    assert torch.equal(seq[1], alone(b))
    assert torch.equal(after_clear, base_latents)
    assert not torch.equal(seq[0], seq[1])
    assert snapshot(lora_dir[0]) == before  # LoRA files are only read


def test_same_set_skips_and_strength_change_only_rescales(lora_dir, served):
    model, group, library, pipe = served
    high = group.slots["high"]
    s0 = copy.copy(high.stats)
    assert group.apply_request(library, [{"name": "style", "strength": 0.5}]) == {"high": "swap", "low": "swap"}
    assert group.apply_request(library, [{"name": "style", "strength": 0.5}]) == {"high": "skip", "low": "skip"}
    assert group.apply_request(library, [{"name": "style", "strength": 1.5}]) == {"high": "rescale", "low": "rescale"}
    rescaled = run(pipe)
    group.apply_request(library, [{"name": "motion"}])
    group.apply_request(library, [{"name": "style", "strength": 1.5}])  # a full swap to the same set
    assert torch.equal(run(pipe), rescaled)
    assert group.loaded_key == request_key([{"name": "style", "strength": 1.5}])
    assert high.stats.swaps == s0.swaps + 3 and high.stats.skips == s0.skips + 1 and high.stats.rescales == s0.rescales + 1
    assert high.stats.seconds > s0.seconds
    d = group.describe()
    assert d["experts"]["high"]["loaded"][0]["name"] == "style" and d["cache"]["hits"] > 0
    group.apply_request(library, [])


def test_set_over_max_rank_is_refused_and_the_loaded_set_stays(tiny_model, lora_dir):
    model = copy_model(tiny_model)
    group = LoraSlotGroup.install(model.experts, max_rank=8)
    library = LoraLibrary(lora_dir[0], group.layouts, 8)
    group.apply_request(library, [{"name": "style", "strength": 1.0}])
    before = {n: b.clone() for n, b in model.transformer_high.named_buffers()}
    with pytest.raises(LoraError, match="max_lora_rank 8"):  # 4 + 8 rows on the layers both touch
        group.apply_request(library, [{"name": "style"}, {"name": "motion"}])
    assert all(torch.equal(b, before[n]) for n, b in model.transformer_high.named_buffers())
    assert group.apply_request(library, [{"name": "style"}])["high"] == "swap"  # key forgotten: rewritten anyway


def test_swap_does_not_recompile(tiny_model, lora_dir):
    """Dynamo graph and frame counts stay where warm-up left them through swaps, rescales and clears.
    torch.compile(backend="eager"): the guards and graphs are dynamo's, inductor adds neither (the inductor
    variant through CompiledBackend is test_compiled_backend_swap_does_not_recompile, --runslow)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = copy_model(tiny_model)
    group = LoraSlotGroup.install(model.experts, max_rank=MAX_RANK)
    library = LoraLibrary(lora_dir[0], group.layouts, MAX_RANK)

    class Compiled:
        experts = {n: torch.compile(e, backend="eager", dynamic=False) for n, e in model.experts.items()}

        @torch.inference_mode()
        def denoise(self, expert, latents, t, context):
            return self.experts[expert](hidden_states=latents, timestep=t, encoder_hidden_states=context,
                                        return_dict=False)[0]

    pipe = WanI2VPipeline(model, Compiled())
    params = GenerateParams(prompt="a cat", steps=2, frames=9, width=64, height=64, cfg_high_noise=1.0,
                            cfg_low_noise=1.0)  # one step per expert, one shape: the cheapest warm-up
    base = run(pipe, params)  # warm-up
    warm = (counters["stats"]["unique_graphs"], counters["frames"]["total"])
    assert warm[0] >= 1
    outs = []
    for loras in ([{"name": "style", "strength": 0.8}], [{"name": "lightning", "expert": "high"}],
                  [{"name": "lightning", "strength": -2.0, "expert": "high"}], []):
        group.apply_request(library, loras)
        outs.append(run(pipe, params))
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == warm
    assert counters["stats"]["unique_graphs"] == warm[0]
    assert torch.equal(outs[-1], base) and not torch.equal(outs[0], base)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_backend_swap_does_not_recompile(tiny_model, lora_dir):
    from torch._dynamo.utils import counters

    from wanrt.runtime.backends.compiled import CompiledBackend

    torch._dynamo.reset()
    model = copy_model(tiny_model)
    group = LoraSlotGroup.install(model.experts, max_rank=MAX_RANK)  # before the compile wraps the experts
    backend = CompiledBackend(model, fp8=False, compile=True)
    library = LoraLibrary(lora_dir[0], group.layouts, MAX_RANK)
    pipe = WanI2VPipeline(model, backend)
    base = run(pipe)
    warm = (backend.stats.compiles, backend.describe()["dynamo_graphs"], counters["frames"]["total"])
    group.apply_request(library, [{"name": "style"}, {"name": "lightning", "expert": "high"}])
    lora = run(pipe)
    group.apply_request(library, [])
    assert (backend.stats.compiles, backend.describe()["dynamo_graphs"], counters["frames"]["total"]) == warm
    assert torch.equal(run(pipe), base) and not torch.equal(lora, base)
    torch._dynamo.reset()


def test_the_default_cuda_path_serves_sets_without_recompiling(lora_dir):
    """The production path on CUDA, run on the CPU: build_runtime's compiled backend (FP8, emulated here; blocks
    compiled) with slots installed after it, as the factory does. Sets, strengths and a clear change no graph after
    warm-up (buffers are read by address), nothing falls back to eager, a clear gives the base back bit for bit,
    and the compiled side path matches the uncompiled one."""
    from torch._dynamo.utils import counters

    from wanrt.config import Settings
    from wanrt.runtime.factory import build_runtime

    from conftest import make_image

    torch._dynamo.reset()
    params = GenerateParams(prompt="a cat", steps=2, frames=9, width=64, height=64, cfg_high_noise=1.0,
                            cfg_low_noise=1.0)  # one step per expert, one shape: the cheapest warm-up
    image = make_image(64, 64)

    def build(compile):
        return build_runtime(Settings(device="cpu", backend="compiled", compile=compile, lora_dir=str(lora_dir[0]),
                                      max_lora_rank=MAX_RANK, warmup=("64x64x9",)))

    pipe = build(True)
    base = pipe.generate(params, image, None).latents  # warm-up: compiles
    warm = counters["stats"]["unique_graphs"]
    sets = ([{"name": "style", "strength": 0.8}], [{"name": "style", "strength": 1.5}],
            [{"name": "lightning", "expert": "high"}, {"name": "style"}], None)
    outs = [pipe.generate(params, image, None, loras=loras).latents for loras in sets]
    assert counters["stats"]["unique_graphs"] == warm and pipe.backend.describe()["fallbacks"] == 0
    assert torch.equal(outs[-1], base) and not torch.equal(outs[0], base) and not torch.equal(outs[0], outs[1])
    eager = build(False).generate(params, image, None, loras=sets[2]).latents
    assert torch.allclose(outs[2], eager, atol=1e-4), (outs[2] - eager).abs().max()
    torch._dynamo.reset()


def test_fp8_base_is_never_touched(tiny_model, lora_dir):
    """Slots around Fp8Linear (installed after the FP8 swap, as the factory does): the FP8 weights and scales keep
    their bits, the side path adds exactly ((x A^T) * scale) B^T, and a clear gives the FP8 base back."""
    from wanrt.runtime.backends.compiled import CompiledBackend
    from wanrt.runtime.fp8 import Fp8Linear

    backend = CompiledBackend(copy_model(tiny_model), fp8=True, compile=False)  # CPU: emulated FP8, own copies
    group = LoraSlotGroup.install(backend.experts, max_rank=MAX_RANK)
    library = LoraLibrary(lora_dir[0], group.layouts, MAX_RANK)
    q = group.slots["high"].modules["blocks.0.attn1.to_q"]
    assert isinstance(q, LoraLinear) and isinstance(q.base, Fp8Linear)
    fp8_before = {n: t.clone() for e in backend.experts.values() for n, t in e.state_dict().items()}
    pipe = WanI2VPipeline(tiny_model, backend)
    base = run(pipe)
    group.apply_request(library, [{"name": "style", "strength": 0.8}])
    x = torch.randn(2, 5, 32)
    a, b, _ = random_lora(tiny_model.transformer_high, rank=4, seed=1, alpha=2.0)["blocks.0.attn1.to_q"]
    with torch.no_grad():
        assert torch.allclose(q(x), q.base(x) + 0.8 * (2.0 / 4) * (x @ a.t()) @ b.t(), atol=1e-6)
    lora = run(pipe)
    group.apply_request(library, [])
    assert torch.equal(run(pipe), base) and (lora - base).abs().max() > 1e-3
    after = {n: t for e in backend.experts.values() for n, t in e.state_dict().items()}
    assert after.keys() == fp8_before.keys() and all(torch.equal(after[k], fp8_before[k]) for k in after)


def test_moved_buffers_are_rewritten_with_an_expert_swapper(tiny_model, lora_dir, served):
    """An ExpertSwapper evicts by pointing tensors back at their host copies, which never saw a LoRA written while
    the expert was resident: the slots notice the move (storage check) and reload instead of skipping."""
    from wanrt.runtime.backends.eager import EagerBackend
    from wanrt.runtime.memory import ExpertSwapper, OffloadingBackend

    _, _, _, resident_pipe = served
    model = copy_model(tiny_model)
    group = LoraSlotGroup.install(model.experts, max_rank=MAX_RANK)  # before the swapper takes its host copies
    library = LoraLibrary(lora_dir[0], group.layouts, MAX_RANK)
    pipe = WanI2VPipeline(model, OffloadingBackend(EagerBackend(model), ExpertSwapper(model.experts, "cpu")))
    a, b = [{"name": "style", "strength": 0.8}], [{"name": "detail", "expert": "low"}]
    got = []
    for loras in (a, a, b, a):
        group.apply_request(library, loras)
        got.append(run(pipe))
    group.apply_request(library, [])
    served[1].apply_request(served[2], a)
    want = run(resident_pipe)
    served[1].apply_request(served[2], [])
    assert all(torch.equal(g, want) for g in (got[0], got[1], got[3]))
    assert not torch.equal(got[2], want)


def test_bad_files_are_logged_and_the_library_keeps_serving(tiny_model, lora_dir, tmp_path, caplog):
    d = tmp_path / "lib"
    d.mkdir()
    for name in ("style", "motion"):
        (d / f"{name}.safetensors").write_bytes((lora_dir[0] / f"{name}.safetensors").read_bytes())
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + os.urandom(64))
    style = (lora_dir[0] / "style.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(style[: len(style) // 2])  # a copy still in progress
    unmatched = as_format(random_lora(tiny_model.transformer_high, targets=["blocks.0.attn1.to_q"]), "comfy")
    unmatched["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, 32)
    unmatched["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(32, 4)
    save_file(unmatched, str(d / "unmatched.safetensors"))
    save_file(as_format(random_lora(tiny_model.transformer_high, rank=32, targets=["blocks.0.attn1.to_q"]), "peft"),
              str(d / "toobig.safetensors"))
    save_file({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(32, 4)},
              str(d / "wan21_only.safetensors"))
    save_file({"diffusion_model.blocks.0.ffn.2.diff": torch.zeros(32, 64)}, str(d / "fulldiff.safetensors"))
    (d / "notes.txt").write_text("not a LoRA")
    model = copy_model(tiny_model)
    group = LoraSlotGroup.install(model.experts, max_rank=MAX_RANK)
    with caplog.at_level(logging.INFO, logger="wanrt.lora"):
        library = LoraLibrary(d, group.layouts, MAX_RANK)
    warnings = {r.getMessage().split("'")[1]: r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert set(warnings) == {"corrupt", "truncated", "unmatched", "toobig", "wan21_only", "fulldiff"}
    assert "not a readable safetensors file" in warnings["corrupt"] and "not a readable" in warnings["truncated"]
    assert "blocks.7.self_attn.q" in warnings["unmatched"]
    assert "rank 32 exceeds max_lora_rank 16" in warnings["toobig"]
    assert "touches no layer" in warnings["wan21_only"] and "Wan 2.1 image keys" in warnings["wan21_only"]
    assert "wanrt build --lora" in warnings["fulldiff"]
    assert library.available() == {"style", "motion"}
    desc = {e["name"]: e for e in library.describe()}
    assert desc["toobig"]["available"] is False and desc["toobig"]["error"]
    with pytest.raises(LoraError, match="unavailable"):
        library.get("corrupt")
    with pytest.raises(ParamError, match=r"loras\[1\]\.name: unknown LoRA 'toobig'"):
        parse_loras([{"name": "style"}, {"name": "toobig"}], library.available())
    assert group.apply_request(library, [{"name": "style"}, {"name": "motion", "expert": "low"}])["low"] == "swap"


def test_rescan_and_describe(tiny_model, lora_dir, tmp_path):
    d = tmp_path / "lib"
    d.mkdir()
    src = lora_dir[0]
    (d / "style.safetensors").write_bytes((src / "style.safetensors").read_bytes())
    layout = ExpertLayout.of(tiny_model.transformer_high)  # an expert without slots: what install would make
    library = LoraLibrary(d, {"high": layout, "low": layout}, MAX_RANK)
    [style] = library.describe()
    assert style["format"] == "comfy" and style["rank"] == 4 and style["alpha"] == [2.0]
    assert style["experts"] == ["high", "low"] and style["layers"] == {"high": len(TARGETS), "low": len(TARGETS)}
    assert style["sha256"] == hashlib.sha256((d / "style.safetensors").read_bytes()).hexdigest()
    assert library.rescan() == {"added": [], "changed": [], "removed": []}

    (d / "kohya.safetensors").write_bytes((src / "kohya.safetensors").read_bytes())
    (d / "style.safetensors").write_bytes((src / "motion.safetensors").read_bytes())  # new content, same name
    os.utime(d / "style.safetensors", ns=(1, 1))  # a different mtime even on a coarse clock
    assert library.rescan() == {"added": ["kohya"], "changed": ["style"], "removed": []}
    desc = {e["name"]: e for e in library.describe()}
    assert desc["style"]["format"] == "peft" and desc["style"]["rank"] == 8
    assert desc["style"]["sha256"] == hashlib.sha256((src / "motion.safetensors").read_bytes()).hexdigest()
    assert desc["kohya"]["format"] == "kohya"
    (d / "kohya.safetensors").unlink()
    assert library.rescan()["removed"] == ["kohya"] and library.available() == {"style"}
    lightning = {e["name"]: e for e in LoraLibrary(src, {"high": layout}, MAX_RANK).describe()}["lightning"]
    assert lightning["format"] == "comfy+diff" and lightning["layers"] == {"high": 5}


# --------------------------------------------------------------------------------------------- formats from the wild
def expert_out(expert, seed=0):
    """One forward of a tiny expert on fixed inputs: what a side path or a modulation delta changes."""
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 36, 3, 8, 8, generator=g), torch.randn(1, 512, 32, generator=g)
    with torch.no_grad():
        return expert(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=ctx, return_dict=False)[0]


def test_modulation_deltas_and_a_full_head_diff_are_served_as_fused(tiny_model, tmp_path):
    """lightx2v distill LoRAs: `diff_m` / `modulation.diff` land in the scale_shift_tables (in place, bits back on a
    clear), `head.head.diff` is a rank-32 pair with an identity factor; compiled blocks (compile_scope=blocks) see
    the tables they read without a recompile."""
    from torch._dynamo.utils import counters

    sd = lightx2v_like(tiny_model.transformer_high)
    save_file(sd, str(tmp_path / "distill.safetensors"))
    expert = copy.deepcopy(tiny_model.transformer_high)
    group = LoraSlotGroup.install({"high": expert}, max_rank=40, lora_dir=tmp_path)
    [entry] = group.library.describe()
    assert entry["available"], entry["error"]
    assert entry["rank"] == 32 and entry["layers"] == {"high": 6} and group.describe()["experts"]["high"]["tables"] == 3
    fused = copy.deepcopy(tiny_model.transformer_high)
    fuse_lora(fused, sd, 0.7)
    base, want = expert_out(tiny_model.transformer_high), expert_out(fused)
    tables = {n: p.detach().clone() for n, p in expert.named_parameters() if "scale_shift_table" in n}
    torch._dynamo.reset()
    counters.clear()
    for block in expert.blocks:
        block.compile(backend="eager", dynamic=False)
    try:
        assert torch.equal(expert_out(expert), base)
        graphs = counters["stats"]["unique_graphs"]
        group.apply_request(None, [{"name": "distill", "strength": 0.7}])
        assert (expert_out(expert) - want).abs().max().item() <= 1e-5 and (want - base).abs().max().item() > 1e-2
        group.apply_request(None, [])
        assert torch.equal(expert_out(expert), base) and counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(p, tables[n]) for n, p in expert.named_parameters() if n in tables)
    assert set(expert.state_dict()) == set(tiny_model.transformer_high.state_dict())


def test_what_serving_cannot_do_is_refused_with_the_way_out(tiny_model, tmp_path):
    d = tmp_path / "lib"
    d.mkdir()
    save_file({"diffusion_model.head.head.diff": torch.zeros(64, 32)}, str(d / "head.safetensors"))
    save_file({"diffusion_model.patch_embedding.lora_down.weight": torch.zeros(4, 36, 1, 2, 2),
               "diffusion_model.patch_embedding.lora_up.weight": torch.zeros(32, 4, 1, 1, 1)}, str(d / "conv.safetensors"))
    save_file({"diffusion_model.blocks.0.ffn.2.diff": torch.zeros(64, 32)}, str(d / "transposed.safetensors"))
    layout = ExpertLayout.of(tiny_model.transformer_high)
    desc = {e["name"]: e for e in LoraLibrary(d, {"high": layout}, MAX_RANK).describe()}
    head = desc["head"]["error"]  # a full diff on proj_out (64 x 32) is a rank-32 pair: over 16
    assert "proj_out" in head and "needs rank 32" in head and "max_lora_rank 16" in head and "WANRT_MAX_LORA_RANK" in head
    assert desc["conv"]["error"].startswith("patch_embedding: a conv LoRA cannot be served per request")
    assert "`wanrt build --lora` fuses it" in desc["conv"]["error"]
    assert "does not fit the layer (32 x 64)" in desc["transposed"]["error"]
    assert LoraLibrary(d, {"high": layout}, 32).available() == {"head"}  # at rank 32 it is served


def test_library_skips_harmless_keys_by_name_and_unmatched_ones_by_setting(tiny_model, tmp_path, caplog):
    d = tmp_path / "lib"
    d.mkdir()
    high = tiny_model.transformer_high
    plain = as_format(random_lora(high, targets=["blocks.0.attn1.to_q"]), "comfy")
    save_file({**plain, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "transformer.condition_embedder.image_embedder.ff.net.0.proj.lora_A.weight": torch.zeros(4, 32)},
              str(d / "with_te.safetensors"))
    save_file({f"lora_unet__{k[len('lora_unet_'):]}": v for k, v in as_format(random_lora(high), "kohya").items()},
              str(d / "videox_fun.safetensors"))
    save_file({**plain, "diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.zeros(4, 32)}, str(d / "loha.safetensors"))
    save_file({**plain, "diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(4, 32)},
              str(d / "extra.safetensors"))
    layouts = {"high": ExpertLayout.of(high)}
    with caplog.at_level(logging.INFO, logger="wanrt.lora"):
        library = LoraLibrary(d, layouts, MAX_RANK)
    assert library.available() == {"with_te", "videox_fun"}
    lines = [r.getMessage() for r in caplog.records]
    assert any("'with_te': skipped 1 text-encoder keys, 1 Wan 2.1 image keys: lora_te_text_model" in m for m in lines)
    errors = {e["name"]: e["error"] for e in library.describe()}
    assert "loha.safetensors is a LoHa file" in errors["loha"] and "not supported" in errors["loha"]
    assert "blocks.9.self_attn.q" in errors["extra"] and "WANRT_LORA_ALLOW_UNMATCHED=1" in errors["extra"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wanrt.lora"):
        assert "extra" in LoraLibrary(d, layouts, MAX_RANK, allow_unmatched=True).available()
    assert any(r.levelno == logging.WARNING and "'extra': skipped 1 unmatched keys: diffusion_model.blocks.9" in
               r.getMessage() for r in caplog.records)
    group = LoraSlotGroup.install({"high": copy.deepcopy(high)}, max_rank=MAX_RANK, lora_dir=d,
                                  allow_unmatched=True)  # the factory passes settings.lora_allow_unmatched
    assert group.library.available() == {"with_te", "videox_fun", "extra"}
    assert group.apply_request(None, [{"name": "extra"}]) == {"high": "swap"}


def test_adapter_metadata_alpha_and_lora_b_bias_are_served(tiny_model, tmp_path):
    import json

    lora = random_lora(tiny_model.transformer_high, rank=4, seed=6, targets=["blocks.0.attn1.to_q"])
    bias = torch.randn(32) * 0.1
    save_file({**as_format(lora, "peft"), "transformer.blocks.0.attn1.to_q.lora_B.bias": bias},
              str(tmp_path / "saved.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})})
    expert = copy.deepcopy(tiny_model.transformer_high)
    group = LoraSlotGroup.install({"high": expert}, max_rank=MAX_RANK, lora_dir=tmp_path)
    assert group.library.describe()[0]["alpha"] == [8.0]
    group.apply_request(None, [{"name": "saved", "strength": 0.5}])
    q, (a, b, _) = expert.blocks[0].attn1.to_q, lora["blocks.0.attn1.to_q"]
    x = torch.randn(3, 32)
    with torch.no_grad():  # alpha 8 / rank 4 = 2, on the pair and on lora_B's bias
        assert torch.allclose(q(x), q.base(x) + 0.5 * 2 * ((x @ a.t()) @ b.t() + bias), atol=1e-6)


def test_install_wraps_linears_and_norms_and_refuses_twice(tiny_model):
    expert = copy.deepcopy(tiny_model.transformer_high)
    slots = install_lora_slots(expert, max_rank=8, targets=r"^blocks\.0\.", name="high")
    assert set(slots.linears) == {f"blocks.0.{n}" for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                                             "ffn.net.0.proj", "ffn.net.2")}
    assert set(slots.norms) == {"blocks.0.attn1.norm_q", "blocks.0.attn1.norm_k", "blocks.0.attn2.norm_q",
                                "blocks.0.attn2.norm_k", "blocks.0.norm2"}
    assert isinstance(expert.blocks[0].norm2, LoraNorm) and isinstance(expert.blocks[1].attn1.to_q, torch.nn.Linear)
    # state dicts keep the expert's own key names (the wrappers and their zero buffers do not show)
    assert set(expert.state_dict()) == set(tiny_model.transformer_high.state_dict())
    expert.load_state_dict(tiny_model.transformer_high.state_dict(), strict=True)
    with pytest.raises(LoraError, match="already installed"):
        install_lora_slots(expert, 8)
    layout = ExpertLayout.of(expert)
    assert set(slots.tables) == {"blocks.0.scale_shift_table"}  # a modulation table: a parameter, no wrapper
    assert set(layout.slots) == set(slots.modules) | set(slots.tables) and "blocks.0.attn1.to_q" in layout.table
    entry = LoraEntry.from_state_dict("x", as_format(random_lora(tiny_model.transformer_high, targets=TARGETS[:2]), "peft"),
                                      layout, 8, experts=["high"])
    assert entry.available and slots.apply([(entry, 1.0, "both")]) == "swap"
    assert slots.apply([(entry, 1.0, "low")]) == "clear"  # an entry for the other expert only


def test_concurrent_jobs_share_a_set_and_a_switch_waits_for_them(tiny_model, lora_dir):
    """A worker's concurrency slots share the experts: a job of another set waits until the running ones end,
    and a newcomer of the loaded set queues behind that waiting switch (no starvation)."""
    import threading
    import time

    from wanrt.runtime.sampler import Cancelled

    group = LoraSlotGroup.install(copy_model(tiny_model).experts, max_rank=MAX_RANK, lora_dir=lora_dir[0])
    a, b = [{"name": "style"}], [{"name": "motion", "strength": 0.5}]
    log, release = [], {k: threading.Event() for k in ("a1", "a2", "b", "a3")}

    def job(name, loras):
        with group.using(loras):
            log.append((name, "in", group.loaded_key == request_key(loras)))
            release[name].wait(10)
        log.append((name, "out"))

    def start(name, loras, reached):
        t = threading.Thread(target=job, args=(name, loras))
        t.start()
        # it is in, or waiting where the test says (a fixed sleep lost this race on a busy CI)
        wait_for(reached, 10, f"{name} to reach its place", poll_s=0.01)
        return t

    threads = [start("a1", a, lambda: group._users == 1), start("a2", a, lambda: group._users == 2),
               start("b", b, lambda: group._switching == 1)]
    threads.append(start("a3", a, lambda: True))  # whenever it arrives, b is ahead of it
    time.sleep(0.1)
    assert [e[0] for e in log] == ["a1", "a2"]  # a2 shares the loaded set; b waits; a3 queues behind b
    release["a1"].set(), release["a2"].set()
    wait_for(lambda: ("b", "in", True) in log, 10, "b to switch the set", poll_s=0.01)
    assert not any(e[0] == "a3" for e in log)
    release["b"].set()
    for t in threads:
        release["a3"].set()
        t.join(10)
    assert log[-2:] == [("a3", "in", True), ("a3", "out")] and group.loaded_key == request_key(a)
    with group.using(b):  # a cancelled job stops waiting
        t0 = time.perf_counter()
        with pytest.raises(Cancelled):
            with group.using(a, should_cancel=lambda: time.perf_counter() - t0 > 0.2):
                pass
    assert group._users == 0 and group._switching == 0


def test_bench_lora_runs(tmp_path, capsys):
    """benchmarks/bench_lora.py in-process, its cheap sections: the FLOP model at A14B and swaps at the A14B
    layer count (rank 4 here); the timed sections run in the benchmark itself."""
    import json
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_lora

    out = tmp_path / "bench_lora.json"
    assert bench_lora.main(["--skip", "linear,step", "--repeats", "1", "--swap-rank", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    share = {row["rank"]: row["share_of_forward_pct"] for row in res["flops"]["rows"]}
    assert 0.9 < share[64] < 1.1 and share[16] < share[64] < share[128]  # about 1 % at rank 64
    assert res["flops"]["linears"] == 406 and res["swap"]["linears"] == 406 and res["swap"]["norms"] == 200
    assert res["swap"]["skip_ms"] < res["swap"]["swap_ms"]
    assert "side = 2R" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- request field
def test_parse_loras_defaults_and_errors():
    assert parse_loras(None) == [] and parse_loras([]) == []
    assert parse_loras([{"name": "a"}, {"name": "b", "strength": -2, "expert": "low"}], {"a", "b"}) == [
        {"name": "a", "strength": 1.0, "expert": "both"}, {"name": "b", "strength": -2.0, "expert": "low"}]
    assert parse_loras([{"name": "a", "expert": "high"}, {"name": "a", "expert": "low"}])[1]["expert"] == "low"
    cases = [
        ("x", "loras", "must be a list"),
        ([{"name": f"n{i}"} for i in range(MAX_LORAS + 1)], "loras", f"at most {MAX_LORAS}"),
        (["a"], "loras[0]", "must be an object"),
        ([{"name": "a"}, {"name": ""}], "loras[1].name", "non-empty string"),
        ([{"name": "a"}, {"name": 3}], "loras[1].name", "non-empty string"),
        ([{"name": "a", "expert": "high"}, {"name": "b"}, {"name": "a", "expert": "low", "strength": 4.5}],
         "loras[2].strength", "must be in -4-4, got 4.5"),
        ([{"name": "a", "strength": "1"}], "loras[0].strength", "must be a number in -4-4"),
        ([{"name": "a", "strength": True}], "loras[0].strength", "must be a number"),
        ([{"name": "a", "strength": float("nan")}], "loras[0].strength", "must be a number"),
        ([{"name": "a", "expert": "middle"}], "loras[0].expert", "one of high, low, both"),
        ([{"name": "a", "weight": 1}], "loras[0].weight", "is not a field"),
        ([{"name": "zzz"}], "loras[0].name", "unknown LoRA 'zzz' (available: a, b)"),
        ([{"name": "a"}, {"name": "a", "expert": "high"}], "loras[1].name", "repeats 'a'"),
    ]
    for value, where, message in cases:
        with pytest.raises(ParamError) as e:
            parse_loras(value, {"a", "b"})
        assert e.value.field == where and message in str(e.value) and (where == "loras" or where in str(e.value)), value


def test_request_key_and_pick_next():
    assert request_key(None) == request_key([]) == ""
    assert request_key([{"name": "a"}]) == request_key([{"name": "a", "strength": 1, "expert": "both"}])
    assert request_key([{"name": "a"}, {"name": "b"}]) != request_key([{"name": "b"}, {"name": "a"}])
    A, B = [{"name": "a"}], [{"name": "b", "strength": 0.5}]

    def job(i, loras, created):
        return {"id": i, "params": {"prompt": "p", **({"loras": loras} if loras is not None else {})}, "created_at": created}

    queue = [job(1, B, 100.0), job(2, None, 101.0), job(3, A, 102.0), job(4, A, 103.0)]
    ka = request_key(A)
    assert pick_next([], ka, 4, 60, 110) is None
    assert pick_next(queue, ka, 4, 60, 110)["id"] == 3  # the first job whose set is loaded
    assert pick_next(queue, ka, 1, 60, 110)["id"] == 1  # job 3 is 2 places back: over the skip bound
    assert pick_next(queue, ka, 4, 60, 160.5)["id"] == 1  # the head waited 60 s: it goes first
    assert pick_next(queue, "", 4, 60, 110)["id"] == 2  # no LoRA loaded: the job without LoRAs
    assert pick_next(queue, None, 4, 60, 110)["id"] == 1  # nothing known: FIFO
    assert pick_next(queue, request_key([{"name": "c"}]), 4, 60, 110)["id"] == 1
    overdue_second = [job(1, B, 150.0), job(2, None, 90.0), job(3, A, 151.0)]  # a re-queued job, older
    assert pick_next(overdue_second, ka, 4, 60, 155)["id"] == 2


def test_published_loras_for_the_api():
    def worker(updated, names, bad=()):
        lib = [{"name": n, "available": True, "rank": 4} for n in names] + [{"name": n, "available": False} for n in bad]
        return {"id": "w", "updated_at": updated, "loras": {"library": lib, "loaded_key": ""}}

    assert published_loras([], 100.0) == ([], None)
    assert published_loras([{"id": "old-style", "updated_at": 99.0}], 100.0) == ([], None)  # serves no LoRAs
    listing, available = published_loras([worker(99.0, ["a", "b"], bad=["c"]), worker(98.0, ["b"]),
                                          worker(-500.0, ["z"])], 100.0, max_age_s=60)
    assert available == {"b"}  # a job may land on either live worker
    assert [(e["name"], e["workers"]) for e in listing] == [("a", 1), ("b", 2), ("c", 0)]
    assert listing[0]["rank"] == 4


def test_rank_problem_sums_published_ranks_per_expert():
    """The API's 422 for a set past max_lora_rank: each LoRA at its published rank, on the experts it targets,
    against every live LoRA-serving worker's rank (a job may land on any); the default rank takes a rank-64
    Lightning LoRA with a rank-64 style LoRA."""
    from wanrt.config import Settings
    from wanrt.lora_request import rank_problem

    def worker(max_rank, updated=99.0):
        lib = [{"name": "lightning", "rank": 64, "layers": {"high": 400, "low": 400}, "available": True},
               {"name": "style", "rank": 64, "layers": {"high": 400, "low": 400}, "available": True},
               {"name": "tiny", "rank": 8, "layers": {"high": 10, "low": 10}, "available": True}]
        experts = {"high": {"max_rank": max_rank}, "low": {"max_rank": max_rank}}
        return {"id": "w", "updated_at": updated, "loras": {"library": lib, "experts": experts}}

    both = parse_loras([{"name": "lightning"}, {"name": "style", "strength": 0.6}])
    assert Settings.from_env({}).max_lora_rank == 128 and rank_problem(both, [worker(128)], 100.0) is None
    problem = rank_problem(both + parse_loras([{"name": "tiny", "expert": "low"}]), [worker(128)], 100.0)
    assert problem == ("loras: the LoRAs on the low-noise expert need rank 136 (lightning 64 + style 64 + tiny 8), "
                       "more than the workers' max_lora_rank 128: use fewer or lower-rank LoRAs on that expert, or "
                       "serve with a larger WANRT_MAX_LORA_RANK")
    assert "high-noise expert need rank 128" in rank_problem(both, [worker(128), worker(64)], 100.0)
    split = parse_loras([{"name": "lightning", "expert": "high"}, {"name": "style", "expert": "low"}])
    assert rank_problem(split, [worker(64)], 100.0) is None  # 64 on each expert
    assert rank_problem(both, [worker(64, updated=-500.0)], 100.0) is None  # a worker gone: nothing to check against
    assert rank_problem(both, [{"id": "plain", "updated_at": 99.0}], 100.0) is None  # no LoRA slots: no ranks


def test_lora_request_imports_no_torch():
    code = "import sys, wanrt.lora_request; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

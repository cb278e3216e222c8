"""The compiled backend's code paths on CPU: emulated FP8 linears, attention switch, torch.compile."""

import copy

import pytest
import torch

from wanrt.params import GenerateParams
from wanrt.runtime.backends.compiled import CompiledBackend, Fp8Linear, fp8_gemm_supported, swap_fp8_linears
from wanrt.runtime.pipeline import WanI2VPipeline

P = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=4)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_fp8_linear_matches_its_definition():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    f = Fp8Linear(lin, emulate=True)
    x = torch.randn(2, 7, 64)
    y = f(x)
    # by hand: per-channel weight scale, per-token activation scale, e4m3 rounding of both
    ws = lin.weight.abs().amax(1, keepdim=True) / 448
    wq = (lin.weight / ws).to(torch.float8_e4m3fn).float() * ws
    xs = x.abs().amax(-1, keepdim=True) / 448
    xq = (x / xs).to(torch.float8_e4m3fn).float() * xs
    assert torch.allclose(y, xq @ wq.t() + lin.bias, atol=1e-5)
    assert cosine(y, lin(x)) > 0.999


def test_per_token_scales_keep_cfg_halves_independent():
    """cond and uncond rows never share a scale: a batch equals its halves run alone."""
    torch.manual_seed(1)
    f = Fp8Linear(torch.nn.Linear(32, 32), emulate=True)
    cond, uncond = torch.randn(1, 5, 32), torch.randn(1, 5, 32) * 100  # very different magnitudes
    both = f(torch.cat([cond, uncond]))
    assert torch.equal(both[:1], f(cond)) and torch.equal(both[1:], f(uncond))


def test_fp8_backend_holds_the_quality_guard(tiny_model, image64):
    ref = WanI2VPipeline(tiny_model).generate(P, image64, None).latents
    backend = CompiledBackend(tiny_model, fp8=True, compile=False)
    got = WanI2VPipeline(tiny_model, backend).generate(P, image64, None).latents
    assert cosine(ref, got) > 0.999 and not torch.equal(ref, got)
    d = backend.describe()
    assert d["fp8"] == ("scaled_mm" if fp8_gemm_supported(torch.device("cpu")) else "emulated")
    assert d["fp8_layers"] == {"high": 20, "low": 20} and d["shape_buckets"] == 2
    # the served model's own experts are untouched on CPU (a copy is swapped)
    assert isinstance(tiny_model.transformer_high.blocks[0].attn1.to_q, torch.nn.Linear)


def test_attention_switch_and_no_fp8_equal_eager(tiny_model, image64):
    ref = WanI2VPipeline(tiny_model).generate(P, image64, None).latents
    for attn in ("math", "sdpa"):
        got = WanI2VPipeline(tiny_model, CompiledBackend(tiny_model, fp8=False, attn=attn, compile=False)).generate(
            P, image64, None).latents
        assert (got - ref).abs().max() < 1e-4
    with pytest.raises(ValueError):
        CompiledBackend(tiny_model, attn="magic")


def test_torch_compile_on_cpu_once_per_bucket(tiny_model, image64):
    backend = CompiledBackend(tiny_model, fp8=True, compile=True)
    pipe = WanI2VPipeline(tiny_model, backend)
    a = pipe.generate(P, image64, None).latents
    graphs = backend.describe()["dynamo_graphs"]
    b = pipe.generate(GenerateParams(**{**P.to_dict(), "seed": 9}), image64, None).latents
    assert backend.describe()["dynamo_graphs"] == graphs  # same shapes, new request: no recompile
    eager = CompiledBackend(tiny_model, fp8=True, compile=False)
    ref = WanI2VPipeline(tiny_model, eager).generate(P, image64, None).latents
    assert cosine(a, ref) > 0.9999 and not torch.equal(a, b)


def test_swap_counts_only_block_linears(tiny_model):
    expert = copy.deepcopy(tiny_model.transformer_high)
    assert swap_fp8_linears(expert, emulate=True) == 20
    assert isinstance(expert.proj_out, torch.nn.Linear)


@pytest.mark.gpu
def test_scaled_mm_matches_emulation_on_gpu():
    if not fp8_gemm_supported(torch.device("cuda")):
        pytest.skip("this GPU has no FP8 tensor cores (needs compute capability 8.9+)")
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256).cuda().bfloat16()
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    fast, slow = Fp8Linear(lin, emulate=False), Fp8Linear(lin, emulate=True)
    assert cosine(fast(x), slow(x)) > 0.9999

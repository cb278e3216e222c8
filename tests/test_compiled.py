"""The compiled backend's code paths on CPU: emulated FP8 linears, attention switch, torch.compile."""

import copy
from types import SimpleNamespace

import pytest
import torch

from wanrt.params import GenerateParams
from wanrt.runtime.backends.compiled import CompiledBackend
from wanrt.runtime.fp8 import Fp8Linear, fp8_gemm_supported, swap_fp8_linears
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
    # the quantised activations and scales are bit-identical; the GEMM may split rows over threads differently
    q, s = Fp8Linear.quantize_activation(torch.cat([cond, uncond]).reshape(10, 32))
    for rows, half in ((slice(0, 5), cond), (slice(5, 10), uncond)):
        qh, sh = Fp8Linear.quantize_activation(half.reshape(5, 32))
        assert torch.equal(q[rows].view(torch.uint8), qh.view(torch.uint8)) and torch.equal(s[rows], sh)
    for got, alone in ((both[:1], f(cond)), (both[1:], f(uncond))):
        assert (got - alone).abs().max() <= 1e-5 * alone.abs().max()


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
    precise = Fp8Linear(lin, emulate=False, use_fast_accum=False)
    assert cosine(precise(x), slow(x)) > 0.9999


def test_backend_refuses_experts_on_another_device(tiny_model):
    """Checked before any copy, quantisation or CUDA call (this torch has no CUDA: a CUDA call would raise)."""
    with pytest.raises(ValueError, match=r"high-noise expert is on cpu but the pipeline runs on cuda:0"):
        CompiledBackend(tiny_model, device="cuda:0", compile=False)
    model = SimpleNamespace(experts={"high": tiny_model.transformer_high, "low": torch.nn.Linear(4, 4, device="meta")})
    with pytest.raises(ValueError, match=r"low-noise expert is on meta but the pipeline runs on cpu"):
        CompiledBackend(model, device="cpu", fp8=False, compile=False)
    with pytest.raises(ValueError, match=r"low-noise expert is on meta but with offload it must wait on the host"):
        CompiledBackend(model, device="cuda:0", fp8=False, compile=False, offload=True)


def test_activation_scale_needs_no_fp32_copy_of_x():
    """amax in x's dtype, only the per-token scale in fp32: no aten op makes an fp32 tensor of x's size."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.outputs += [(str(func), t.dtype, t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    torch.manual_seed(0)
    x = (torch.randn(64, 256) * torch.logspace(-3, 2, 64).unsqueeze(1)).bfloat16()
    with Spy() as spy:
        q, scale = Fp8Linear.quantize_activation(x)
    assert spy.outputs and not [o for o in spy.outputs if o[1] == torch.float32 and o[2] >= x.numel()], spy.outputs
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (64, 1)
    # the same numbers as the fp32 formula
    ref_scale = (x.float().abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
    ref_q = (x.float() / ref_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_factory_offload_quantises_in_place_through_the_swapper(tiny_model, image64):
    """Offload + compiled: the host-side experts are quantised in place (layer by layer on the device), not
    copied, and the swapper built afterwards moves the FP8 weights."""
    from wanrt.config import Settings
    from wanrt.runtime.factory import build_runtime

    pipe = build_runtime(Settings(device="cpu", backend="compiled", memory="offload", compile=False))
    backend = pipe.backend
    assert backend.name == "compiled+offload" and backend.inner.experts["high"] is pipe.model.transformer_high
    assert isinstance(pipe.model.transformer_low.blocks[0].attn1.to_q, Fp8Linear)
    d = backend.describe()
    assert d["memory"] == "offload" and d["fp8_layers"] == {"high": 20, "low": 20} and d["device"] == "cpu"
    ref = WanI2VPipeline(tiny_model).generate(P, image64, None).latents
    got = pipe.generate(P, image64, None).latents
    assert cosine(ref, got) > 0.999

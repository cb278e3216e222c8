"""wanrt.runtime.attention on the CPU: the kernel report, what `auto` resolves to, and the FP8 attention path
(its custom op under tracing and compile, the processor in the experts, the PSNR gate) with the CPU emulation of
cuDNN's FP8 kernel standing in for the kernel; the real kernel's tests are marked gpu."""

import copy

import pytest
import torch

from wanrt.runtime import attention
from wanrt.runtime.attention import AttentionPlan, chosen_kernel, emulate_fp8_attention, resolve


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.fixture
def emulated(monkeypatch):
    """The op runs the emulation (this machine has no cuDNN FP8 kernel)."""
    monkeypatch.setattr(attention, "_IMPL", emulate_fp8_attention)


def test_resolve_named_kernels_and_auto_on_cpu():
    assert resolve("math", "cpu") == AttentionPlan("math", "math", ("MATH",))
    assert resolve("sdpa", "cpu").backends == ()  # PyTorch's choice
    auto = resolve("auto", "cpu")
    assert auto.kernel == "sdpa" and auto.backends == () and "cpu" in auto.reason
    with pytest.raises(ValueError, match="attn must be one of auto, sdpa, flash, efficient, cudnn, math, cudnn_fp8"):
        resolve("magic", "cpu")


def test_auto_measures_cudnn_and_flash_on_hopper_only(monkeypatch):
    """The decision, with the GPU faked: Hopper where cuDNN and flash run -> cuDNN first until measured, both
    measured per shape; cuDNN alone where flash cannot run; Ampere, or Hopper where cuDNN cannot run the head
    dim -> PyTorch's own choice."""
    runs = {"cudnn": (True, ""), "flash": (True, "")}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "_kernel_runs", lambda name, *a: runs[name])
    plan = resolve("auto", "cuda")
    assert plan.kernel == "cudnn" and plan.backends[0] == "CUDNN_ATTENTION" and "Hopper" in plan.reason
    assert plan.measure == ("cudnn", "flash") and "measures faster" in plan.reason
    assert plan.priority == attention._has_set_priority() and set(plan.backends) <= set(attention._AUTO_ORDER)
    runs["flash"] = (False, "no flash here")
    plan = resolve("auto", "cuda")
    assert plan.kernel == "cudnn" and plan.measure == () and plan.backends[0] == "CUDNN_ATTENTION"
    runs["cudnn"] = (False, "head dim 256 unsupported")
    plan = resolve("auto", "cuda")
    assert plan.kernel == "sdpa" and "head dim 256 unsupported" in plan.reason and plan.measure == ()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    plan = resolve("auto", "cuda")
    assert plan.kernel == "sdpa" and "SM 8.0 is not Hopper" in plan.reason


def test_chooser_picks_the_faster_kernel():
    """choose_kernel with injected timings: the faster wins, a tie goes to the first candidate (cuDNN), a kernel
    that cannot run is left out, and nothing timed leaves the first candidate."""
    assert attention.choose_kernel(("cudnn", "flash"), {"cudnn": 0.2, "flash": 0.1}.get).kernel == "flash"
    m = attention.choose_kernel(("cudnn", "flash"), {"cudnn": 0.1, "flash": 0.2}.get)
    assert (m.kernel, m.ms) == ("cudnn", {"cudnn": 100.0, "flash": 200.0})
    assert attention.choose_kernel(("cudnn", "flash"), lambda k: 0.1).kernel == "cudnn"

    def no_flash(name):
        if name == "flash":
            raise RuntimeError("No available kernel.\nmore")
        return 0.3

    m = attention.choose_kernel(("flash", "cudnn"), no_flash)
    assert (m.kernel, m.ms, m.note) == ("cudnn", {"cudnn": 300.0}, "flash: No available kernel.")
    m = attention.choose_kernel(("cudnn", "flash"), lambda k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
    assert (m.kernel, m.ms) == ("cudnn", {}) and "OutOfMemoryError" in m.note


def test_measured_plan_times_each_shape_once(monkeypatch):
    """The plan auto gets on Hopper, timed once per process and shape (the cache), the faster kernel first."""
    monkeypatch.setattr(attention, "_MEASURED", {})
    plan = AttentionPlan("auto", "cudnn", attention._AUTO_ORDER, priority=True, measure=("cudnn", "flash"))
    calls = []

    def timer(name):
        calls.append(name)
        return {"cudnn": 0.012, "flash": 0.010}[name]

    got, m = attention.measured_plan(plan, 2, 40, 1024, 128, torch.bfloat16, "cpu", timer=timer)
    assert got.kernel == "flash" and got.backends[0] == "FLASH_ATTENTION" and got.measure == () and got.priority
    assert set(got.backends) == set(attention._AUTO_ORDER) and "flash 10.00 ms" in got.reason
    assert m.ms == {"cudnn": 12.0, "flash": 10.0} and calls == ["cudnn", "flash"]
    again, _ = attention.measured_plan(plan, 2, 40, 1024, 128, torch.bfloat16, "cpu", timer=timer)
    assert again == got and calls == ["cudnn", "flash"]  # cached
    attention.measured_plan(plan, 1, 40, 1024, 128, torch.bfloat16, "cpu", timer=timer)  # another shape: timed
    assert len(calls) == 4
    single = AttentionPlan("auto", "cudnn", ("CUDNN_ATTENTION",), measure=("cudnn", "flash"))  # torch < 2.6
    assert attention.measured_plan(single, 2, 40, 1024, 128, torch.bfloat16, "cpu")[0].backends == ("FLASH_ATTENTION",)
    fixed = resolve("math", "cpu")
    assert attention.measured_plan(fixed, 2, 40, 1024, 128, torch.bfloat16, "cpu", timer=None) == (fixed, None)


def test_plan_contexts_choose_what_they_say():
    q = torch.randn(1, 2, 16, 32)
    with resolve("math", "cpu").context():
        assert chosen_kernel(q, q, q) == "math"
    with resolve("sdpa", "cpu").context():
        assert chosen_kernel(q, q, q) == "flash"  # PyTorch's CPU flash kernel
    if attention._has_set_priority():  # cuDNN first cannot run on the CPU: the next kernel in order does
        with AttentionPlan("auto", "cudnn", attention._AUTO_ORDER, priority=True).context():
            assert chosen_kernel(q, q, q) == "flash"


def test_kernel_report_at_wan_shapes_on_cpu():
    """Wan's self-attention shape (2.6 GB of Q/K/V, allocated and never written, so no pages are touched)."""
    r = attention.kernel_report(**attention.WAN_SELF_ATTENTION, dtype=torch.bfloat16, device="cpu")
    assert r["shape"] == {"batch": 2, "heads": 40, "tokens": 33_600, "kv_tokens": 33_600, "head_dim": 128}
    assert r["chosen"] == "flash" and r["kernels"]["flash"]["available"] and r["kernels"]["math"]["available"]
    for cuda_only in ("efficient", "cudnn"):
        assert not r["kernels"][cuda_only]["available"] and r["kernels"][cuda_only]["why_not"]
    assert r["auto"]["kernel"] == "sdpa" and "needs a CUDA GPU" in r["cudnn_fp8"] and "CPU" in r["note"]


def test_cudnn_fp8_is_refused_clearly_on_cpu(tiny_model):
    from wanrt.runtime.backends.compiled import CompiledBackend

    with pytest.raises(ValueError, match=r"attn=cudnn_fp8 needs a CUDA GPU with FP8 attention .*the device here is cpu"):
        CompiledBackend(tiny_model, attn="cudnn_fp8", compile=False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        attention.build_fp8_attention("cpu")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):  # the op itself, without the emulation
        torch.ops.wanrt.cudnn_fp8_sdpa(q, q, q, 0.25)


def test_emulation_is_fp8_attention():
    """Per-tensor e4m3 Q/K/V, the softmax tile and the output rounded to e4m3: close to exact attention, not
    equal to it, and exactly the same with inputs that are already on the e4m3 grid at scale 1."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 32) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    exact = exact.transpose(1, 2)
    got = emulate_fp8_attention(q, k, v, 32 ** -0.5)
    assert got.shape == exact.shape and 0.995 < cosine(got, exact) < 1
    x8, descale = attention.quantize_per_tensor(q)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert torch.allclose(x8.float() * descale, q, rtol=2 ** -4, atol=descale.item() * 2 ** -6)


def test_psnr_gate_passes_and_refuses_with_numbers():
    db = attention.check_fp8_attention(emulate_fp8_attention, "cpu", tokens=256, heads=2, head_dim=64,
                                       min_psnr_db=25)
    assert 25 <= db < 80
    with pytest.raises(ValueError, match=rf"PSNR .* is {db:.1f} dB, below the 90 dB threshold"):
        attention.check_fp8_attention(emulate_fp8_attention, "cpu", tokens=256, heads=2, head_dim=64, min_psnr_db=90)
    with pytest.raises(ValueError, match="below the 40 dB threshold"):
        attention.check_fp8_attention(lambda q, k, v, s: torch.zeros_like(q), "cpu", tokens=64, heads=2, head_dim=16)
    assert attention.psnr_db(torch.ones(4), torch.ones(4)) == float("inf")


def test_op_traces_with_its_fake_and_compiles_fullgraph(emulated):
    """The fake implementation gives the shape without running anything, so tracing and torch.compile hold the op
    as one node (fullgraph: no break around it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = torch.randn(2, 24, 2, 16), torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = torch.ops.wanrt.cudnn_fp8_sdpa(fq, fk, fv, 0.25)
        assert out.shape == (2, 24, 2, 16) and out.dtype == q.dtype

    def f(q, k, v):
        return torch.ops.wanrt.cudnn_fp8_sdpa(q * 2, k, v, 0.25) + 1

    graph = make_fx(f, tracing_mode="fake")(q, k, v)
    assert "wanrt.cudnn_fp8_sdpa" in graph.code
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), f(q, k, v))


def test_fp8_processor_matches_the_expert(tiny_model, emulated):
    """The FP8 processor on every block's self-attention (only there) computes what diffusers' processor does, up
    to FP8 rounding; module names are unchanged and a second install wraps nothing twice."""
    expert = copy.deepcopy(tiny_model.transformer_high)
    names = [n for n, _ in expert.named_modules()]
    assert attention.install_fp8_attention(expert) == len(expert.blocks) == 2
    assert attention.install_fp8_attention(expert) == 2
    assert [n for n, _ in expert.named_modules()] == names
    for block in expert.blocks:
        assert isinstance(block.attn1.processor, attention.Fp8SelfAttnProcessor)
        assert not isinstance(block.attn1.processor.inner, attention.Fp8SelfAttnProcessor)
        assert not isinstance(block.attn2.processor, attention.Fp8SelfAttnProcessor)
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 36, 3, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 16, 32)
    with torch.inference_mode():
        ref = tiny_model.transformer_high(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        got = expert(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert cosine(got, ref) > 0.999 and not torch.equal(got, ref)


def test_processors_read_fused_projections(tiny_model, emulated):
    """Fused Q/K/V (one to_qkv GEMM, diffusers' fused path) through the FP8 processor gives what the unfused expert
    gives through it; the row views left under the old names are not called."""
    unfused = copy.deepcopy(tiny_model.transformer_high)
    fused = copy.deepcopy(unfused)
    assert len(attention.fuse_projections(fused)) == 2 * len(fused.blocks)
    for expert in (unfused, fused):
        attention.install_fp8_attention(expert)
    attn = fused.blocks[0].attn1
    assert attn.fused_projections and isinstance(attn.processor, attention.Fp8SelfAttnProcessor)
    called = []
    for name in ("to_q", "to_k", "to_v"):
        getattr(attn, name).register_forward_pre_hook(lambda *a: called.append(a))
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 36, 3, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 16, 32)
    with torch.inference_mode():
        want = unfused(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        got = fused(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-5) and not called


@pytest.mark.gpu
def test_kernel_report_and_auto_on_the_gpu():
    r = attention.kernel_report(**attention.WAN_SELF_ATTENTION, device="cuda")
    assert r["chosen"] in ("flash", "efficient", "cudnn") and r["kernels"]["math"]["available"]
    if r["capability"][0] == 9 and r["kernels"]["cudnn"]["available"]:  # Hopper: cuDNN or flash, measured
        assert r["auto"]["kernel"] in ("cudnn", "flash") and r["auto"]["measured_ms"]
        assert min(r["auto"]["measured_ms"], key=r["auto"]["measured_ms"].get) == r["auto"]["kernel"]


@pytest.mark.gpu
def test_cudnn_fp8_kernel_matches_its_emulation():
    why = attention.fp8_unavailable("cuda")
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = torch.ops.wanrt.cudnn_fp8_sdpa(q, k, v, 128 ** -0.5)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    # the kernel rounds P against each tile's running max (128 keys), the emulation against the row's: models of
    # the kernel give 0.9989-0.9993 here (0.999 failed by a hair); a wrong layout gives ~0
    assert cosine(got, emulate_fp8_attention(q, k, v, 128 ** -0.5)) > 0.995
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert cosine(got, exact) > 0.99
    # cosine cannot see a wrong descale (the output scaled as a whole): the norms must agree (emulation: 0.9989)
    assert abs(got.float().norm() / exact.float().norm() - 1) < 0.02
    compiled = torch.compile(lambda q, k, v: torch.ops.wanrt.cudnn_fp8_sdpa(q, k, v, 128 ** -0.5), fullgraph=True)
    assert cosine(compiled(q, k, v), got) > 0.9999  # the op is opaque to Inductor: the same kernel runs


@pytest.mark.gpu
def test_cudnn_fp8_gate_builds_or_refuses_with_its_psnr():
    why = attention.fp8_unavailable("cuda")
    if why:
        pytest.skip(why)
    try:
        db = attention.build_fp8_attention("cuda")
    except ValueError as e:
        assert "dB, below the 40 dB threshold" in str(e)
    else:
        assert db >= attention.FP8_MIN_PSNR_DB

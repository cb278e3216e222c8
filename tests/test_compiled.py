"""The compiled backend's code paths on CPU: emulated FP8 linears, attention switch, torch.compile."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from wanrt.params import GenerateParams
from wanrt.runtime.backends.compiled import CompiledBackend
from wanrt.runtime.fp8 import Fp8Linear, Fp8LinearRows, LinearRows, fp8_gemm_supported, swap_fp8_linears
from wanrt.runtime.pipeline import WanI2VPipeline

P = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=4)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def copy_model(model):
    """Own experts: the blocks scope compiles blocks in place, and the session's tiny model must stay eager."""
    return dataclasses.replace(model, transformer_high=copy.deepcopy(model.transformer_high),
                               transformer_low=copy.deepcopy(model.transformer_low))


@pytest.fixture
def one_compile_thread(monkeypatch):
    """Inductor compiles in this process: a pool of compile workers costs more than these tiny graphs on 2 cores."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)


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
        model = copy_model(tiny_model)  # without FP8 the projections are fused in the caller's experts
        got = WanI2VPipeline(model, CompiledBackend(model, fp8=False, attn=attn, compile=False)).generate(
            P, image64, None).latents
        assert (got - ref).abs().max() < 1e-4
    with pytest.raises(ValueError):
        CompiledBackend(tiny_model, attn="magic")
    # the default: auto, resolved where the backend runs (PyTorch's own choice off Hopper) and reported
    d = CompiledBackend(copy_model(tiny_model), fp8=False, compile=False).describe()
    assert (d["attention_requested"], d["attention"]) == ("auto", "sdpa") and "cpu" in d["attention_reason"]


def test_torch_compile_on_cpu_once_per_bucket(tiny_model, image64, one_compile_thread):
    backend = CompiledBackend(tiny_model, fp8=True, compile=True)  # the defaults: blocks scope, default mode
    assert backend.describe()["compile_scope"] == "blocks"
    pipe = WanI2VPipeline(tiny_model, backend)
    a = pipe.generate(P, image64, None).latents
    graphs = backend.describe()["dynamo_graphs"]
    b = pipe.generate(GenerateParams(**{**P.to_dict(), "seed": 9}), image64, None).latents
    assert backend.describe()["dynamo_graphs"] == graphs  # same shapes, new request: no recompile
    eager = CompiledBackend(tiny_model, fp8=True, compile=False)
    ref = WanI2VPipeline(tiny_model, eager).generate(P, image64, None).latents
    assert cosine(a, ref) > 0.9999 and not torch.equal(a, b)


def test_compile_modes():
    from wanrt.runtime.backends.compiled import compile_mode

    assert compile_mode(autotune=False, graphs=False) == "default"
    assert compile_mode(autotune=False, graphs=True) == "reduce-overhead"
    assert compile_mode(autotune=True, graphs=False) == "max-autotune-no-cudagraphs"
    assert compile_mode(autotune=True, graphs=True) == "max-autotune"


def test_blocks_scope_compiles_blocks_in_place(tiny_model):
    """The wiring only (nothing compiles before the first call): blocks compiled in place under their own names,
    dynamo's limit raised over the seed's range, the switches reported."""
    import torch._dynamo.config as dynamo_config

    from wanrt.runtime.backends.compiled import seed_shapes
    from wanrt.runtime.lora import install_lora_slots

    model = copy_model(tiny_model)
    names = [n for n, _ in model.transformer_high.named_modules()]
    backend = CompiledBackend(model, fp8=False, compile=True)
    expert = backend.experts["high"]
    # the old names stay (row views of the fused projections), the fused layers come in beside them
    assert expert is model.transformer_high and set(names) < {n for n, _ in expert.named_modules()}
    assert all(b._compiled_call_impl is not None for b in expert.blocks) and expert._compiled_call_impl is None
    d = backend.describe()
    assert (d["compile_scope"], d["compile_mode"], d["cudagraphs"]) == ("blocks", "default", False)
    assert d["compiles"] == 0 and d["compile_seconds"] == {} and d["fallbacks"] == 0
    # every token count of the seed's range x 2 experts x 2 batch sizes fits under dynamo's (raised) limit
    assert d["recompile_limit"] >= seed_shapes("blocks") * 4 and dynamo_config.recompile_limit >= d["recompile_limit"]
    assert "blocks.0.attn1.to_q" in install_lora_slots(expert, max_rank=4).modules  # slots find layers by name
    # autotune is a switch; CUDA graphs never on the CPU; the model scope wraps the whole expert
    other = CompiledBackend(copy_model(tiny_model), fp8=False, compile_scope="model", autotune=True, cudagraphs=True)
    d = other.describe()
    assert (d["compile_scope"], d["compile_mode"], d["cudagraphs"]) == ("model", "max-autotune-no-cudagraphs", False)
    assert isinstance(other.experts["high"], torch._dynamo.eval_frame.OptimizedModule)
    assert d["recompile_limit"] >= seed_shapes("model") * 4
    with pytest.raises(ValueError, match="compile_scope must be one of blocks, model"):
        CompiledBackend(tiny_model, compile_scope="layers")


def test_compiles_are_counted_per_bucket_and_the_limit_falls_back(tiny_model, one_compile_thread, monkeypatch):
    """Real compiles (dynamo's graph counter), not shape keys: one block graph serves both blocks of both experts,
    a new shape compiles one more, each bucket's first call is timed. At dynamo's recompile limit a bucket runs
    eagerly (counted), with the same numbers."""
    torch._dynamo.reset()  # block graphs cached by earlier tests would be hits
    model, eager = copy_model(tiny_model), copy_model(tiny_model)
    backend = CompiledBackend(model, fp8=False, compile=True)
    torch.manual_seed(0)

    def call(expert, batch, frames):
        x, t, ctx = torch.randn(batch, 36, frames, 8, 8), torch.full((batch,), 900.0), torch.randn(batch, 16, 32)
        out = backend.denoise(expert, x, t, ctx)
        with torch.inference_mode():
            ref = eager.experts[expert](hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        assert torch.allclose(out, ref, atol=1e-4)
        return backend.stats.compiles

    assert call("high", 2, 3) == 1  # one graph for both blocks
    assert call("high", 2, 3) == 1  # the same shape again: no compile
    assert call("low", 2, 3) == 1  # the other expert's identical blocks: the same graph
    assert call("high", 1, 3) == 2  # a new shape: one more
    s = backend.stats
    assert s.compiles < 2 * 2 * 2  # fewer graphs than blocks x experts x shapes
    assert set(s.compile_seconds) == {"high:b2:3x8x8", "low:b2:3x8x8", "high:b1:3x8x8"}
    assert all(v > 0 for v in s.compile_seconds.values())
    assert s.bucket_graphs == {"high:b2:3x8x8": 1, "low:b2:3x8x8": 0, "high:b1:3x8x8": 1}
    # the limit reached (lowered here to the two graphs dynamo holds for the block): eager, counted once
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    assert call("high", 2, 2) == 2 and call("high", 2, 2) == 2
    d = backend.describe()
    assert d["fallbacks"] == 1 and d["shape_buckets"] == 4 and d["compiles"] == 2
    assert d["compile_seconds"].keys() == {*s.bucket_graphs, "high:b2:2x8x8"}
    torch._dynamo.reset()


def test_a_compiler_failure_runs_that_bucket_eagerly(tiny_model, monkeypatch, tmp_path):
    """The compiled backend is the default on CUDA: Inductor failing on a user's card (here: made to fail for real,
    inside dynamo's backend call) costs that bucket its speed, counted and logged, not every job. An OOM from the
    compiler is re-raised for the memory tier to handle."""
    import torch._inductor.compile_fx as compile_fx

    model, eager = copy_model(tiny_model), copy_model(tiny_model)
    backend = CompiledBackend(model, fp8=False, compile=True)
    x, t, ctx = torch.randn(2, 36, 3, 8, 8), torch.full((2,), 900.0), torch.randn(2, 16, 32)
    with torch.inference_mode():
        ref = eager.experts["high"](hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal: unsupported GPU architecture")

    torch._dynamo.reset()
    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    try:
        for _ in range(2):  # the second call goes straight to eager: no retrace, no second failure
            assert torch.allclose(backend.denoise("high", x, t, ctx), ref, atol=1e-4)
        assert backend.describe()["fallbacks"] == 1 and backend.stats.eager_buckets == {"high:b2:3x8x8"}
        from wanrt.api.routes import metrics_text
        from wanrt.jobs.paths import DataPaths
        from wanrt.jobs.store import SqliteJobStore

        store = SqliteJobStore(DataPaths(tmp_path).ensure().db)  # what an operator's alert reads
        store.report_worker("w", {"device": "cuda:0", "backend": backend.describe()})
        assert 'wanrt_worker_compile_fallbacks{worker="w",device="cuda:0"} 1' in metrics_text(store, None, 0.0)

        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory while autotuning")

        monkeypatch.setattr(compile_fx, "compile_fx", oom)
        with pytest.raises(torch.OutOfMemoryError, match="autotuning"):
            backend.denoise("high", torch.randn(1, 36, 3, 8, 8), torch.full((1,), 900.0), torch.randn(1, 16, 32))
    finally:
        torch._dynamo.reset()


def test_compile_caches_live_in_the_data_dir_unless_the_environment_says(tmp_path, monkeypatch):
    """A restarted worker reloads its kernels from the data dir (a volume in the container; /tmp is lost with the
    container) instead of compiling the default preset again; an operator's own cache dirs win."""
    from wanrt.runtime.backends.compiled import COMPILE_CACHE_VARS, persist_compile_caches

    for name in COMPILE_CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "cache"  # the data dir's, as build_runtime passes it
    assert persist_compile_caches(root) == {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
                                            "TRITON_CACHE_DIR": str(root / "triton")}
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    assert cache_dir() == str(root / "inductor")  # where Inductor will write
    # importing torch._dynamo (diffusers does, before the runtime is built) writes torch's default in: not ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert persist_compile_caches(root)["TORCHINDUCTOR_CACHE_DIR"] == str(root / "inductor")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine/too")
    assert persist_compile_caches(root) == {"TORCHINDUCTOR_CACHE_DIR": "/mine/too", "TRITON_CACHE_DIR": "/mine"}
    for name in COMPILE_CACHE_VARS:  # a data dir it cannot write to: torch's defaults stay
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "file").write_text("")
    assert persist_compile_caches(tmp_path / "file" / "cache") == {"TORCHINDUCTOR_CACHE_DIR": "", "TRITON_CACHE_DIR": ""}


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


@pytest.mark.gpu
def test_blocks_compile_with_cuda_graphs_on_gpu(tiny_model, monkeypatch):
    import torch._inductor.config as inductor_config

    # a skipped graph raises with Inductor's reason (the backend's fallback logs it) instead of a bare counter
    monkeypatch.setattr(inductor_config.triton, "cudagraph_or_error", True)
    high, low = (copy.deepcopy(m).cuda() for m in (tiny_model.transformer_high, tiny_model.transformer_low))
    ref = copy.deepcopy(high)
    model = SimpleNamespace(transformer_high=high, transformer_low=low, experts={"high": high, "low": low})
    backend = CompiledBackend(model, device="cuda", fp8=False, cudagraphs=True)
    d = backend.describe()
    assert (d["compile_mode"], d["cudagraphs"], d["compile_scope"]) == ("reduce-overhead", True, "model")
    x, t = torch.randn(2, 36, 3, 8, 8, device="cuda"), torch.full((2,), 900.0, device="cuda")
    ctx = torch.randn(2, 16, 32, device="cuda")
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    for _ in range(3):  # warm-up, capture, replay
        out = backend.denoise("high", x, t, ctx).clone()
    assert counters["inductor"]["cudagraph_skips"] == skips  # Inductor really ran graphs (it skips them quietly)
    with torch.inference_mode():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.allclose(out, want, atol=1e-3)
    assert backend.stats.compiles >= 1 and list(backend.stats.compile_seconds) == ["high:b2:3x8x8"]
    assert backend.describe()["fallbacks"] == 0  # compiled, not the eager fallback


def test_cuda_graphs_compile_each_expert_whole():
    """Blocks compiled one by one cannot chain CUDA graphs (cudagraph trees overwrite block i's output when block
    i+1, the same compiled code, starts a new generation: pytorch#152887); the first GPU run's `pytest -m gpu`
    exited 1, and the test above is the likely failure. Graphs take the model scope; without graphs the scope is
    as asked."""
    from wanrt.runtime.backends.compiled import graph_scope

    assert graph_scope("blocks", graphs=True) == graph_scope("model", graphs=True) == "model"
    assert graph_scope("blocks", graphs=False) == "blocks" and graph_scope("model", graphs=False) == "model"


def test_weight_only_fp8_upcast_stays_out_of_compiled_graphs(monkeypatch):
    """SM < 8.9 (an RTX 3090 here) runs FP8 weights weight-only, and Triton has no e4m3 there (pytorch#167082): the
    graph dynamo hands the compiler under fullgraph (as the blocks are compiled) converts no float8 tensor; the
    upcast is one opaque op, for a layer and for a row view of a fused layer (what a LoRA'd part runs)."""
    from wanrt.runtime.fp8 import fp8_mode, fuse_linears, row_views

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert fp8_mode("cuda") == "weight_only"
    fp8s = (torch.float8_e4m3fn, torch.float8_e5m2)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    layer = Fp8Linear(torch.nn.Linear(64, 48).bfloat16(), mode="weight_only")
    fused = fuse_linears([Fp8Linear(torch.nn.Linear(64, 16).bfloat16(), mode="weight_only") for _ in range(2)])
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for m in (layer, row_views(fused, [16, 16])[1]):
        with torch.inference_mode():
            assert torch.equal(torch.compile(m, backend=record, fullgraph=True)(x), m(x))
    assert len(graphs) == 2
    for gm in graphs:
        casts, opaque = [], 0
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            reads_fp8 = any(getattr(a.meta.get("example_value"), "dtype", None) in fp8s for a in node.all_input_nodes)
            if getattr(node.target, "namespace", "") == "wanrt":  # wanrt::fp8_upcast
                opaque += 1
            elif reads_fp8 and isinstance(value, torch.Tensor) and value.dtype not in fp8s:
                casts.append(node.format_node())
        assert not casts and opaque == 1, gm.code


class _Replay(torch.nn.Module):
    """An expert whose output lives in one static buffer, rewritten by each call: what a CUDA graph replays into."""

    def __init__(self):
        super().__init__()
        self.static = torch.zeros(1, 16, 3, 8, 8)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.static.copy_(hidden_states[:, :16])
        return (self.static,)
    # the fake (what compile sees) has the real op's shape, dtype and strides, a transposed weight's too
    from torch.library import opcheck

    w8 = torch.randn(12, 16).to(torch.float8_e4m3fn)
    for w, scale in ((w8, torch.rand(12, 1)), (w8.t(), torch.rand(16, 1))):
        assert opcheck(torch.ops.wanrt.fp8_upcast.default, (w, scale, torch.bfloat16),
                       test_utils=("test_faketensor",)) == {"test_faketensor": "SUCCESS"}


def test_cudagraph_outputs_survive_the_next_call_and_threads_are_counted(tiny_model, caplog):
    """cudagraphs=True is a no-op off CUDA (reported off). Where graphs run, each denoise returns a copy: the cond
    half of a sequential CFG step (TieredBackend) survives the uncond replay. cudagraph trees are thread-local: a
    second thread's first call is logged and counted."""
    import threading

    backend = CompiledBackend(copy_model(tiny_model), fp8=False, compile=False, cudagraphs=True)
    assert not backend.describe()["cudagraphs"]
    backend.stats.cudagraphs = True  # as on a GPU; the expert replays into one buffer as its graph would
    backend.experts["high"] = _Replay()
    t, ctx = torch.full((1,), 900.0), torch.zeros(1, 16, 32)
    cond = backend.denoise("high", torch.ones(1, 36, 3, 8, 8), t, ctx)
    uncond = backend.denoise("high", torch.full((1, 36, 3, 8, 8), 2.0), t, ctx)
    assert torch.equal(cond, torch.ones(1, 16, 3, 8, 8)) and torch.equal(uncond, torch.full_like(uncond, 2.0))
    with caplog.at_level("WARNING", logger="wanrt.compiled"):
        worker = threading.Thread(target=backend.denoise, args=("high", torch.ones(1, 36, 3, 8, 8), t, ctx),
                                  name="slot-0")
        worker.start()
        worker.join()
    assert "recorded per thread" in caplog.text and "'slot-0'" in caplog.text
    assert backend.describe()["cudagraph_threads"] == [threading.current_thread().name, "slot-0"]


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


def _denoise_all(backend, batch=2):
    torch.manual_seed(0)
    x, t, ctx = torch.randn(batch, 36, 3, 8, 8), torch.full((batch,), 900.0), torch.randn(batch, 16, 32)
    return torch.cat([backend.denoise(e, x, t, ctx) for e in ("high", "low")])


def test_fused_projections_match_unfused(tiny_model):
    """fuse_qkv (the default): one to_qkv (self-attention) and one to_kv (cross-attention) linear per block, in FP8
    where the parts were, the parts left as row views that hold nothing and are not called; the same numbers as
    the unfused experts, with and without FP8 (emulated here), and the switch reported."""
    for fp8 in (False, True):
        fused = CompiledBackend(copy_model(tiny_model), fp8=fp8, compile=False)
        plain = CompiledBackend(copy_model(tiny_model), fp8=fp8, compile=False, fuse_qkv=False)
        expert = fused.experts["high"]
        a1, a2 = expert.blocks[0].attn1, expert.blocks[0].attn2
        layer, rows = (Fp8Linear, Fp8LinearRows) if fp8 else (torch.nn.Linear, LinearRows)
        assert type(a1.to_qkv) is layer and type(a2.to_kv) is layer and type(a2.to_q) is layer
        assert all(type(m) is rows for m in (a1.to_q, a1.to_k, a1.to_v, a2.to_k, a2.to_v))
        assert (a1.to_qkv.out_features, a2.to_kv.out_features) == (96, 64) and a1.fused_projections
        keys = set(expert.state_dict())
        assert "blocks.0.attn1.to_qkv.bias" in keys and not [k for k in keys if ".attn1.to_q." in k or ".to_k." in k]
        assert not hasattr(plain.experts["high"].blocks[0].attn1, "to_qkv")
        called = []
        for m in (a1.to_q, a1.to_k, a1.to_v, a2.to_k, a2.to_v):
            m.register_forward_pre_hook(lambda module, args, called=called: called.append(module))
        got, want = _denoise_all(fused), _denoise_all(plain)
        assert not called
        assert torch.allclose(got, want, atol=1e-5), (fp8, (got - want).abs().max())
        d, dp = fused.describe(), plain.describe()
        assert d["fuse_qkv"] and d["fused_projections"] == {"high": 4, "low": 4} and d["fp8_impl"] == "wanrt"
        assert not dp["fuse_qkv"] and "fused_projections" not in dp
        # fp8_layers: the checkpoint's linears in FP8, a fused layer counting its parts
        assert d["fp8_layers"] == dp["fp8_layers"] == ({"high": 20, "low": 20} if fp8 else {})


def _lora_runs(tiny_model, lora_dir, compile=False, fuse_qkv=True):
    """(base, with the LoRA, cleared) through a backend whose LoRA slots are installed after it was built."""
    from wanrt.runtime.lora import LoraLinear, LoraSlotGroup

    backend = CompiledBackend(copy_model(tiny_model), fp8=True, compile=compile, fuse_qkv=fuse_qkv)
    group = LoraSlotGroup.install(backend.experts, max_rank=8, lora_dir=lora_dir)
    q = group.slots["high"].modules["blocks.0.attn1.to_q"]
    assert isinstance(q, LoraLinear) and isinstance(q.base, Fp8Linear)
    base = _denoise_all(backend)
    group.apply_request(None, [{"name": "style", "strength": 0.8}])
    lora = _denoise_all(backend)
    assert not (fuse_qkv and backend.experts["high"].blocks[0].attn1.fused_projections)  # wrapped parts run alone
    group.apply_request(None, [])
    return base, lora, _denoise_all(backend)


@pytest.fixture
def fused_lora_dir(tiny_model, tmp_path):
    from safetensors.torch import save_file

    from lora_fixtures import as_format, random_lora

    targets = ["blocks.0.attn1.to_q", "blocks.0.attn1.to_v", "blocks.1.attn2.to_k", "blocks.1.attn1.to_out.0"]
    lora = as_format(random_lora(tiny_model.transformer_high, rank=4, seed=3, alpha=2.0, targets=targets), "comfy")
    save_file(lora, str(tmp_path / "style.safetensors"))
    return tmp_path


def test_lora_slots_on_fused_projections(tiny_model, fused_lora_dir):
    """LoRA slots installed after the backend fused its projections (as the runtime factory installs them) find
    `attn1.to_q` by name: with a LoRA loaded the wrapped parts run one by one, the same numbers as the unfused
    experts with the same LoRA; cleared, the output is the backend's own again."""
    fused, plain = (_lora_runs(tiny_model, fused_lora_dir, fuse_qkv=f) for f in (True, False))
    for base, lora, cleared in (fused, plain):
        assert torch.equal(cleared, base) and (lora - base).abs().max() > 1e-3
    assert torch.allclose(fused[1], plain[1], atol=1e-5) and torch.allclose(fused[0], plain[0], atol=1e-5)


@pytest.mark.slow
def test_lora_slots_on_fused_projections_compiled(tiny_model, fused_lora_dir, one_compile_thread):
    """The same through Inductor (the row views traced in the block graph; Inductor's fp32 may round an e4m3 step
    differently, hence cosines)."""
    eager, compiled = (_lora_runs(tiny_model, fused_lora_dir, compile=c) for c in (False, True))
    for a, b in zip(eager, compiled, strict=True):
        assert cosine(a, b) > 0.9999, cosine(a, b)


def test_fp8_impl_switch_refuses_torchao_without_its_gpu(tiny_model):
    """fp8_impl=torchao needs CUDA SM >= 8.9 and torchao: refused clearly here, before any weight is touched."""
    with pytest.raises(ValueError, match=r"fp8_impl=torchao needs a CUDA GPU with FP8 tensor cores .*device here is "
                                         r"cpu: use fp8_impl=wanrt"):
        CompiledBackend(tiny_model, fp8_impl="torchao", compile=False)
    with pytest.raises(ValueError, match="fp8_impl must be one of wanrt, torchao, not 'magic'"):
        CompiledBackend(tiny_model, fp8_impl="magic")
    assert isinstance(tiny_model.transformer_high.blocks[0].attn1.to_q, torch.nn.Linear)
    assert not hasattr(tiny_model.transformer_high.blocks[0].attn1, "to_qkv")
    assert CompiledBackend(tiny_model, compile=False, fuse_qkv=False).describe()["fp8_impl"] == "wanrt"


@pytest.mark.gpu
def test_torchao_fp8_matches_ours_on_gpu(tiny_model):
    pytest.importorskip("torchao")
    if not fp8_gemm_supported(torch.device("cuda")):
        pytest.skip("this GPU has no FP8 tensor cores (needs compute capability 8.9+)")

    def on_gpu():
        high, low = (copy.deepcopy(m).cuda().bfloat16() for m in (tiny_model.transformer_high, tiny_model.transformer_low))
        return SimpleNamespace(transformer_high=high, transformer_low=low, experts={"high": high, "low": low})

    ao = CompiledBackend(on_gpu(), device="cuda", fp8_impl="torchao", compile=False)
    ours = CompiledBackend(on_gpu(), device="cuda", compile=False)
    d = ao.describe()
    assert (d["fp8"], d["fp8_impl"], d["fp8_layers"]) == ("torchao", "torchao", {"high": 20, "low": 20})
    x, t = torch.randn(2, 36, 3, 8, 8, device="cuda", dtype=torch.bfloat16), torch.full((2,), 900.0, device="cuda")
    ctx = torch.randn(2, 16, 32, device="cuda", dtype=torch.bfloat16)
    assert cosine(ao.denoise("high", x, t, ctx), ours.denoise("high", x, t, ctx)) > 0.999


@pytest.mark.gpu
def test_auto_attention_is_measured_per_shape_on_hopper(tiny_model):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("attn=auto measures on Hopper only")
    high, low = (copy.deepcopy(m).cuda().bfloat16() for m in (tiny_model.transformer_high, tiny_model.transformer_low))
    model = SimpleNamespace(transformer_high=high, transformer_low=low, experts={"high": high, "low": low})
    backend = CompiledBackend(model, device="cuda", fp8=False, compile=False)
    if not backend.attention.measure:
        pytest.skip(f"auto measures nothing here: {backend.attention.reason}")
    x, t = torch.randn(2, 36, 3, 8, 8, device="cuda", dtype=torch.bfloat16), torch.full((2,), 900.0, device="cuda")
    ctx = torch.randn(2, 16, 32, device="cuda", dtype=torch.bfloat16)
    for expert in ("high", "low", "high"):
        backend.denoise(expert, x, t, ctx)
    (entry,) = backend.describe()["attention_measured"].values()  # one shape: measured once
    assert entry["kernel"] in ("cudnn", "flash") and entry["ms"] and min(entry["ms"], key=entry["ms"].get) == entry["kernel"]


def test_factory_fuses_projections_unless_loras_are_served(tmp_path):
    """The runtime factory passes fuse_qkv through, and turns it off where LoRA slots will wrap each projection
    (fused, a LoRA'd part runs unfused anyway and the fused layer would carry idle slot buffers)."""
    from wanrt.config import Settings
    from wanrt.runtime.factory import build_runtime

    base = dict(device="cpu", backend="compiled", compile=False)
    plain = build_runtime(Settings(**base)).backend.describe()
    assert plain["fuse_qkv"] and plain["fused_projections"] == {"high": 4, "low": 4}  # 2 blocks x (attn1, attn2)
    served = build_runtime(Settings(**base, lora_dir=str(tmp_path), max_lora_rank=4))
    d = served.backend.describe()
    assert not d["fuse_qkv"] and served.loras is not None
    assert not any(hasattr(m, "to_qkv") for m in served.backend.inner.experts["high"].modules())
    assert not build_runtime(Settings(**base, fuse_qkv=False)).backend.describe()["fuse_qkv"]

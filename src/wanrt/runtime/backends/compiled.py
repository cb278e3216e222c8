"""The fast backend: FP8 linear layers, a chosen attention kernel, torch.compile per shape bucket, CUDA graphs.

Every optimisation is a switch (gpt-fast style), applied in this order so the benchmark can show what each
buys: `fuse_qkv` (each self-attention's Q/K/V projections, and each cross-attention's K/V, as one linear: one
GEMM instead of three), `fp8` (e4m3 weights, per-output-channel scales, per-token dynamic activation scales;
`fp8_impl`: ours, `wanrt`, or torchao's Float8DynamicActivationFloat8WeightConfig(PerRow), `torchao`, the same
recipe, SM >= 8.9 only), `attn` (wanrt.runtime.attention: `auto` = on Hopper the faster of cuDNN and flash
attention, measured per shape, and PyTorch's choice elsewhere, a named SDPA kernel, or `cudnn_fp8`, FP8
self-attention behind a PSNR gate), `compile` (torch.compile, one graph per shape bucket,
compiled at warm-up and counted), `compile_scope` (`blocks`: each transformer block compiled in place, so the 40
identical blocks share one graph per shape and compile in seconds, as diffusers' compile_repeated_blocks;
`model`: the whole expert in one graph), `autotune` (Inductor's max-autotune GEMM search: minutes per bucket),
`cudagraphs` (opt-in; CUDA only, never with offload; each expert compiled whole then, see graph_scope).

CUDA graphs: each graph replays into the same output memory, so every denoise call returns a copy (TieredBackend
holds the cond half of a CFG step while the uncond half replays the same graph), a latent's bytes per call.
cudagraph trees are thread-local: a thread that did not warm the backend up records its own graphs (its first
calls per shape, and a memory pool of its own); the first call from each new thread is logged, and the
threads are counted in describe().

Compiles are counted from dynamo's own graph counter around each denoise call (`compiles`), with the seconds of
each shape bucket's first call (`compile_seconds`). Dynamo keeps at most `recompile_limit` graphs per code object
and then runs new shapes eagerly (or, under fullgraph, raises): the limit is raised to cover every shape the
seed's request range can produce, and hitting it anyway is counted (`fallbacks`) and logged.

FP8 primitives (Fp8Linear, per-token activation scales, emulation where FP8 GEMMs are missing) live in
wanrt.runtime.fp8. The backend is told its device and refuses experts that are not where the memory plan
puts them (an expert left on the host would be quantised for emulation and run with host weights against
device inputs). On the GPU path experts are quantised (and their blocks compiled) in place, never copied (a 14B
expert is 28.6 GB).

Fused projections and LoRA: the backend cannot know whether LoRA slots will be installed on its experts (the
runtime factory installs them after building it), so the old projection names stay, as row views of the fused
layer that hold no tensors (fp8.Fp8LinearRows). LoRA slots then wrap those views (and the fused layer), and
before each forward `attention.sync_fused_projections` turns the fused path off wherever a view is wrapped:
the parts run one by one with their side paths, the unfused model's FP8 GEMMs, without the fusion's gain. A
runtime that serves LoRAs should pass fuse_qkv=False (no idle slots on the fused layers then). Under block
streaming nothing is fused (the forward waits on transfers; a mapped expert's weights would be copied to RAM).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanrt.model.sizes import sequence_length
from wanrt.runtime import attention
from wanrt.runtime.fp8 import (
    FP8_IMPLS,
    adopt_fp8_linears,
    fp8_layer_count,
    fp8_mode,
    quantize_torchao,
    set_fp8_mode,
    swap_fp8_linears,
    torchao_unavailable,
)

log = logging.getLogger("wanrt.compiled")

SCOPES = ("blocks", "model")
BATCH_SIZES = 2  # CFG (cond + uncond) and cfg = 1
RECOMPILE_MARGIN = 64  # shapes outside the seed's range (tests, odd warm-up buckets), LoRA slot installs


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False  # decided without touching CUDA
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()  # "cuda" means the current device
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index


def check_expert_device(name: str, expert: torch.nn.Module, device: torch.device, expected: str = "") -> None:
    """ValueError naming the expert and both devices when any of its tensors is not on `device`."""
    expected = expected or (f"the pipeline runs on {device}: move it there first, or build the backend with "
                            "offload=True for experts that wait on the host (the runtime factory does so for an "
                            "offload plan)")
    for t in list(expert.parameters()) + list(expert.buffers()):
        if not _same_device(t.device, device):
            raise ValueError(f"compiled backend: the {name}-noise expert is on {t.device} but {expected}")


def graph_scope(compile_scope: str, graphs: bool) -> str:
    """The scope compiled: CUDA graphs need the whole expert in one graph. Under cudagraph trees a compiled block
    fed its own previous output (block i+1 after block i: the same code, as the blocks share one graph) starts a
    new generation, which overwrites that output while it is read ("accessing tensor output of CUDAGraphs that has
    been overwritten by a subsequent run": pytorch#152887 and #160281, open in torch 2.11)."""
    return "model" if graphs else compile_scope


def compile_mode(autotune: bool, graphs: bool) -> str:
    """Inductor's mode for the switches: autotune searches GEMM configs (minutes per bucket); graphs adds CUDA
    graphs (reduce-overhead)."""
    if autotune:
        return "max-autotune" if graphs else "max-autotune-no-cudagraphs"
    return "reduce-overhead" if graphs else "default"


@functools.cache
def seed_shapes(scope: str, vae_scale: int = 8, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Distinct graphs per expert and batch size that the seed's request range (wanrt.params) can need: token
    counts for a block (blocks scope: a block sees (B, tokens, dim)), latent (frames, height, width) for a whole
    expert (model scope)."""
    from wanrt.params import FIELDS_BY_NAME, frames_to_generate

    w, h, f = (FIELDS_BY_NAME[n] for n in ("width", "height", "frames"))
    shapes = set()
    for width in range(w.lo, w.hi + 1, w.multiple_of or 16):
        for height in range(h.lo, h.hi + 1, h.multiple_of or 16):
            for frames in range(f.lo, f.hi + 1):
                lat = ((frames_to_generate(frames) - 1) // 4 + 1, height // vae_scale, width // vae_scale)
                shapes.add(lat if scope == "model" else
                           (lat[0] // patch[0]) * (lat[1] // patch[1]) * (lat[2] // patch[2]))
    return len(shapes)


def _dynamo_config():
    import torch._dynamo.config as dc

    return dc


def _inlines_modules() -> bool:
    """Parameters are graph inputs, so every block (and both experts) shares one graph per shape."""
    import warnings

    with warnings.catch_warnings():  # deprecated (always True) since torch 2.8
        warnings.simplefilter("ignore")
        return bool(getattr(_dynamo_config(), "inline_inbuilt_nn_modules", True))


def raise_recompile_limit(needed: int) -> int:
    """Dynamo's per-code-object and accumulated recompile limits raised to at least `needed` (never lowered;
    torch < 2.6 calls them cache_size_limit). Returns the per-code limit in force."""
    dc = _dynamo_config()
    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    total = "accumulated_" + name
    setattr(dc, name, max(getattr(dc, name), needed))
    if hasattr(dc, total):
        setattr(dc, total, max(getattr(dc, total), needed))
    return getattr(dc, name)


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _limit_hits() -> int:
    """Times dynamo gave up compiling a frame at its recompile limit (it then runs that code eagerly)."""
    from torch._dynamo.utils import counters

    return sum(n for k, n in counters["unimplemented"].items() if "recompile limit" in k.lower()
               or "cache size limit" in k.lower())


def _recompile_limit_error() -> type[Exception]:
    import torch._dynamo.exc as exc

    return getattr(exc, "FailOnRecompileLimitHit", None) or getattr(exc, "FailOnCacheLimitHit", RuntimeError)


COMPILE_CACHE_VARS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def persist_compile_caches(root: Path) -> dict[str, str]:
    """Inductor's FX-graph and autotuning caches and Triton's kernels under `root` (the data dir's cache/, a
    volume in the container) instead of /tmp or ~/.triton, which a container restart loses: a restarted worker
    then reloads the default preset's kernels instead of compiling them again (33.9 s on the H200, FP8
    quantisation included). A variable the operator set is kept; importing torch._dynamo (diffusers does) writes
    Inductor's own default into the environment, which is not theirs. An unwritable root changes nothing.
    Returns what applies."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root, torch_default = Path(root), os.path.abspath(default_cache_dir())
    try:
        root.mkdir(parents=True, exist_ok=True)
        writable = os.access(root, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        log.warning("compile caches stay where torch puts them: %s is not writable", root)
    for name, sub in COMPILE_CACHE_VARS.items():
        value = os.environ.get(name)
        ours = value is None or (name == "TORCHINDUCTOR_CACHE_DIR" and os.path.abspath(value) == torch_default)
        if writable and ours:
            os.environ[name] = str(root / sub)
    return {name: os.environ.get(name, "") for name in COMPILE_CACHE_VARS}


def _compile_errors() -> tuple[type[Exception], ...]:
    """What dynamo raises when it cannot trace a bucket (fullgraph) or Inductor cannot build it: the model is
    fine, the compiler is not (a Triton/driver mismatch on the user's card, a compiler bug at one shape)."""
    import torch._dynamo.exc as exc

    return tuple(getattr(exc, n) for n in ("BackendCompilerFailed", "Unsupported") if hasattr(exc, n))


def _out_of_memory(e: BaseException | None) -> BaseException | None:
    """The OOM inside a compiler error (autotuning benchmarks kernels on the device): the memory tier's business
    (its own test: a CUDA 'out of memory' RuntimeError counts too)."""
    from wanrt.runtime.memory import is_out_of_memory

    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = getattr(e, "inner_exception", None) or e.__cause__
    found = [c for c in chain if is_out_of_memory(c)]  # the wrapper's message quotes the inner one's
    return next((c for c in found if isinstance(c, torch.OutOfMemoryError)), found[-1] if found else None)


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The expert's repeated transformer blocks (diffusers' `_repeated_blocks` class names, else `.blocks`)."""
    names = set(getattr(module, "_repeated_blocks", None) or ())
    found = [m for m in module.modules() if type(m).__name__ in names]
    return found or list(getattr(module, "blocks", []))


def _uncompile_blocks(module: torch.nn.Module) -> None:
    """Blocks a previous backend compiled in place (a memory-tier change rebuilds the backend) run eagerly again."""
    for block in repeated_blocks(module):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None


@dataclass
class CompiledStats:
    fp8_layers: dict = field(default_factory=dict)  # the checkpoint's linears now in FP8 (fused ones count parts)
    fp8_mode: str = "off"
    fp8_impl: str = "wanrt"
    fast_accum: bool = False
    fuse_qkv: bool = False
    fuse_off: str = ""  # why fuse_qkv was asked for and not done
    fused_projections: dict = field(default_factory=dict)  # expert -> attention modules whose projections are fused
    attention: str = "sdpa"  # the kernel that runs (`auto` resolved)
    attention_requested: str = "sdpa"
    attention_reason: str = ""
    attention_measured: dict = field(default_factory=dict)  # auto on Hopper: "bB:tokens" -> kernel, ms per kernel
    fp8_attention_psnr_db: float | None = None  # cudnn_fp8: the gate's measurement
    fp8_attention_layers: int = 0
    compiled: bool = False
    compile_scope: str = ""
    compile_mode: str = ""
    compile_off: str = ""  # why compile was asked for and not done
    fp8_off: str = ""  # why the FP8 swap was asked for and not done
    cudagraphs: bool = False
    shapes_seen: set = field(default_factory=set)  # shape buckets: "expert:bB:FxHxW" (latent)
    compiles: int = 0  # graphs dynamo compiled during denoise calls (its unique_graphs counter)
    compile_seconds: dict = field(default_factory=dict)  # bucket -> seconds of its first (compiling) call
    bucket_graphs: dict = field(default_factory=dict)  # bucket -> graphs its first call compiled
    recompile_limit: int = 0
    fallbacks: int = 0  # dynamo hit its recompile limit: that bucket ran eagerly
    eager_buckets: set = field(default_factory=set)
    graph_threads: list = field(default_factory=list)  # cudagraphs: names of the threads that ran (and recorded)


class CompiledBackend:
    """`device`: where the pipeline runs (the runtime factory passes it; left out, where the high-noise expert
    is). Without `offload` every expert must be on `device`. With `offload` (the memory plan's one expert at
    a time) they wait on the host, and an ExpertSwapper built after this backend brings each onto `device`
    for its steps; FP8 quantisation then runs on `device` one layer at a time and the FP8 weights stay on
    the host, so the device never holds more than one layer extra, and no CUDA graphs (every swap moves the
    weights they would capture). `streamed`: block streaming runs the experts (implies offload; no compile).
    `fast_accum`: _scaled_mm's fast FP8 accumulation. `compile_scope="blocks"` compiles the experts' blocks in
    place (module names unchanged, so LoRA slots installed later by name still find `blocks.N.attn1.to_q`): on
    the CPU without FP8 that is the caller's model (pass a copy to keep an eager reference), and so is `fuse_qkv`
    (the projections fused in place). `fp8_impl`: `wanrt` (Fp8Linear: scaled_mm, weight-only or emulated per
    device) or `torchao` (refused, before any weight is touched, without a GPU of SM >= 8.9, torchao, or with
    offload); an FP8 checkpoint's linears stay Fp8Linear either way."""

    name = "compiled"

    def __init__(self, model, device: str | torch.device | None = None, fp8: bool = True, attn: str = "auto",
                 compile: bool = True, compile_scope: str = "blocks", autotune: bool = False,
                 cudagraphs: bool = False, fast_accum: bool = True, offload: bool = False, streamed: bool = False,
                 fp8_attention_min_psnr_db: float = attention.FP8_MIN_PSNR_DB, fuse_qkv: bool = True,
                 fp8_impl: str = "wanrt", mapped: bool = False):
        if attn not in attention.CHOICES:
            raise ValueError(f"attn must be one of {', '.join(attention.CHOICES)}")
        if compile_scope not in SCOPES:
            raise ValueError(f"compile_scope must be one of {', '.join(SCOPES)}")
        if fp8_impl not in FP8_IMPLS:
            raise ValueError(f"fp8_impl must be one of {', '.join(FP8_IMPLS)}, not {fp8_impl!r}")
        device = torch.device(device) if device is not None else next(model.transformer_high.parameters()).device
        offload = offload or streamed
        fp8_off = ""
        if fp8 and mapped:  # (an FP8 checkpoint's linears still run as stored, below)
            fp8, fp8_off = False, "mmap tier: the experts run from their mapped files as stored (an FP8 swap would " \
                "copy them into the RAM this tier lacks)"
        torchao = fp8 and fp8_impl == "torchao"
        if torchao and (why := torchao_unavailable(device, offload)):
            raise ValueError(why)
        self.device, self.offload = device, offload
        self.stats = CompiledStats(attention_requested=attn, fp8_impl=fp8_impl, fp8_off=fp8_off)
        if compile and streamed:
            compile, self.stats.compile_off = False, "block streaming moves each block's weights around its forward"
        if fuse_qkv and streamed:  # PCIe-bound there; and fusing mapped (mmap tier) weights would copy them to RAM
            fuse_qkv, self.stats.fuse_off = False, "block streaming: the forward waits on transfers, not GEMMs"
        for name, module in model.experts.items():  # before any copy, quantisation or CUDA call
            if offload:
                check_expert_device(name, module, torch.device("cpu"),
                                    f"with offload it must wait on the host (cpu); the swapper brings it to {device}")
            else:
                check_expert_device(name, module, device)
        high = model.transformer_high
        heads = getattr(getattr(high, "config", None), "num_attention_heads", 40)
        head_dim = getattr(getattr(high, "config", None), "attention_head_dim", 128)
        patch = tuple(getattr(getattr(high, "config", None), "patch_size", (1, 2, 2)))
        self._heads, self._head_dim, self._patch = heads, head_dim, patch
        self._measured: dict[str, attention.AttentionPlan] = {}  # attn=auto on Hopper: per self-attention shape
        self._graph_threads = weakref.WeakSet()  # cudagraph trees are per thread: those that ran this backend
        self.attention = attention.resolve(attn, device, heads=heads, head_dim=head_dim)
        self.stats.attention, self.stats.attention_reason = self.attention.kernel, self.attention.reason
        if self.attention.measure and torch.are_deterministic_algorithms_enabled():
            self.stats.attention_reason = f"{self.attention.kernel}: not measured (deterministic)"
        if attn == "cudnn_fp8":  # refused here (ValueError) before any weight is touched
            self.stats.fp8_attention_psnr_db = attention.build_fp8_attention(
                device, fp8_attention_min_psnr_db, heads=heads, head_dim=head_dim)
        graphs = cudagraphs and device.type == "cuda" and not offload  # graphs capture weight addresses
        mode = compile_mode(autotune, graphs)
        scope = graph_scope(compile_scope, graphs)
        if compile and scope != compile_scope:
            log.info("compiled backend: CUDA graphs compile each expert whole (compile_scope=model, not %s): "
                     "separately compiled blocks cannot chain their graphs", compile_scope)
        compile_scope = scope
        if compile:
            # torch < 2.5 guards on each block's identity: one cache entry per block and shape
            per_code = len(repeated_blocks(high)) if compile_scope == "blocks" and not _inlines_modules() else 1
            needed = seed_shapes(compile_scope, patch=patch) * len(model.experts) * BATCH_SIZES * per_code
            self.stats.recompile_limit = raise_recompile_limit(needed + RECOMPILE_MARGIN)
            self.stats.compile_scope, self.stats.compile_mode = compile_scope, mode
        mode_fp8 = fp8_mode(device)
        self.experts, self._fused = {}, {}
        for name, module in model.experts.items():
            # An FP8 checkpoint's linears are FP8 whatever `fp8` says: run them the way this device can.
            adopted = adopt_fp8_linears(module, mode_fp8, fast_accum) + set_fp8_mode(module, mode_fp8)
            # CPU (tests, the tiny model): swap a copy, so the served model keeps its full-precision experts
            # for the eager reference. Elsewhere in place: a 14B expert is 28.6 GB, a copy would double it.
            if fp8 and device.type == "cpu" and not offload:
                module = copy.deepcopy(module)
            # Fused before quantising: the fused layer is quantised as one (per-row scales: the same bits as its
            # parts quantised alone), and an FP8 checkpoint's parts are stacked as they are. The row views come
            # after, so no full-precision fused layer outlives its quantisation.
            fused = attention.fuse_projections(module, views=not fp8) if fuse_qkv else \
                attention.fused_attention(module)  # fused by an earlier backend on this model: still synced
            if fp8:
                if torchao:
                    self.stats.fp8_layers[name] = quantize_torchao(module)
                else:  # counted after the swap: a model an earlier backend quantised in place (a demotion) swaps 0
                    swap_fp8_linears(module, mode_fp8 == "emulate", use_fast_accum=fast_accum,
                                     quantize_on=device if offload else None, mode=mode_fp8)
                    self.stats.fp8_layers[name] = fp8_layer_count(module)
                attention.refresh_fused(fused)  # the row views onto the quantised layers
            if fuse_qkv:
                self.stats.fuse_qkv = True
                self.stats.fused_projections[name] = len(fused)
            self._fused[name] = fused
            if torchao:
                self.stats.fp8_mode, self.stats.fast_accum = "torchao", True  # its default mm_config: fast accum
            elif fp8 or adopted:
                self.stats.fp8_mode = {"emulate": "emulated"}.get(mode_fp8, mode_fp8)
                self.stats.fast_accum = fast_accum and mode_fp8 == "scaled_mm"
            if attn == "cudnn_fp8":
                self.stats.fp8_attention_layers += attention.install_fp8_attention(module)
            _uncompile_blocks(module)
            if compile and compile_scope == "blocks":
                # In place (nn.Module.compile): identical blocks share one graph per shape (parameters are graph
                # inputs), and module names stay what LoRA slots and the swapper look up.
                blocks = repeated_blocks(module)
                if not blocks:
                    raise ValueError(f"compile_scope=blocks: the {name}-noise expert has no transformer blocks")
                for block in blocks:
                    block.compile(mode=mode, fullgraph=True, dynamic=False)
            elif compile:
                module = torch.compile(module, mode=mode, dynamic=False, fullgraph=False)
            self.stats.compiled = compile
            self.stats.cudagraphs = compile and graphs
            self.experts[name] = module

    def attention_shape(self, expert: str, latent_input: torch.Tensor) -> tuple[int, int, int]:
        """(batch, heads, tokens) of this input's self-attention as the kernel sees it: in a worker group
        (runtime/parallel.py, Ulysses) each rank attends over every token with its share of the heads."""
        module = self.experts[expert]
        shard = getattr(getattr(module, "_orig_mod", module), "_wanrt_seq_shard", None)
        degree = shard.degree if shard is not None else 1
        return latent_input.shape[0], self._heads // degree, sequence_length(latent_input.shape, self._patch)

    def _attention_plan(self, expert: str, latent_input: torch.Tensor) -> attention.AttentionPlan:
        """The plan for this input's self-attention shape: `auto` on Hopper times its kernels at the first call of
        each shape (once per process, before any compile or capture of it) and runs the faster."""
        if not self.attention.measure or torch.are_deterministic_algorithms_enabled():  # deterministic: no timing
            return self.attention
        b, heads, tokens = self.attention_shape(expert, latent_input)
        key = f"b{b}:{tokens}" if heads == self._heads else f"b{b}:{tokens}:h{heads}"
        plan = self._measured.get(key)
        if plan is None:
            plan, m = attention.measured_plan(self.attention, b, heads, tokens, self._head_dim,
                                              latent_input.dtype, latent_input.device)
            self._measured[key] = plan
            self.stats.attention_measured[key] = {"kernel": m.kernel, "ms": dict(m.ms)} | (
                {"note": m.note} if m.note else {})
            log.info("compiled backend: attn=auto for self-attention %s: %s (%s)", key, plan.kernel, plan.reason)
        return plan

    def _forward(self, expert, latent_input, timestep, context):
        attention.sync_fused_projections(self._fused[expert])  # LoRA slots may wrap the fused parts by now
        with self._attention_plan(expert, latent_input).context():
            return self.experts[expert](hidden_states=latent_input, timestep=timestep,
                                        encoder_hidden_states=context, return_dict=False)[0]

    @torch.inference_mode()
    def denoise(self, expert: str, latent_input: torch.Tensor, timestep: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        if not self.stats.cudagraphs:
            return self._denoise(expert, latent_input, timestep, context)
        self._note_thread()
        # Each call is one generation of the graph tree (nothing from the last call is read: it was copied below)
        torch.compiler.cudagraph_mark_step_begin()
        # The graph's output memory is rewritten by its next replay: a caller may hold this one across calls.
        return self._denoise(expert, latent_input, timestep, context).clone()

    def _note_thread(self) -> None:
        thread = threading.current_thread()
        if thread in self._graph_threads:
            return
        if self._graph_threads:
            log.warning("compiled backend: CUDA graphs are recorded per thread (cudagraph trees are thread-local): "
                        "thread %r runs this backend after %s; its first calls of each shape record graphs again "
                        "(and keep a memory pool of their own)", thread.name, ", ".join(self.stats.graph_threads))
        self._graph_threads.add(thread)
        self.stats.graph_threads.append(thread.name)

    def _denoise(self, expert, latent_input, timestep, context):
        s = self.stats
        b, _, f, h, w = latent_input.shape
        bucket = f"{expert}:b{b}:{f}x{h}x{w}"
        first = bucket not in s.shapes_seen
        s.shapes_seen.add(bucket)
        if not s.compiled:
            return self._forward(expert, latent_input, timestep, context)
        if bucket in s.eager_buckets:
            return self._eager(expert, latent_input, timestep, context)
        graphs, hits, t0 = _dynamo_graphs(), _limit_hits(), time.perf_counter()
        try:
            out = self._forward(expert, latent_input, timestep, context)
        except _recompile_limit_error() as e:  # fullgraph (blocks scope): dynamo raises at the limit
            self._fell_back(bucket, e)
            out = self._eager(expert, latent_input, timestep, context)
        except _compile_errors() as e:
            if (oom := _out_of_memory(e)) is not None:
                raise oom from None  # as the eager path would raise it: the tier moves leaner, runs the job again
            # compiled is the default on CUDA: a compiler that fails on this card must cost speed, not every job;
            # pinned to eager only once eager runs it (an error of the model itself still surfaces, unpinned)
            out = self._eager(expert, latent_input, timestep, context)
            self._fell_back(bucket, e, what="the compiler failed")
        new = _dynamo_graphs() - graphs
        s.compiles += new
        if _limit_hits() > hits and bucket not in s.eager_buckets:  # model scope: dynamo ran it eagerly itself
            self._fell_back(bucket, "recompile limit")
        if first:
            if latent_input.device.type == "cuda":
                torch.cuda.synchronize(latent_input.device)
            s.compile_seconds[bucket] = round(time.perf_counter() - t0, 3)
            s.bucket_graphs[bucket] = new
        return out

    def _fell_back(self, bucket: str, why, what: str | None = None) -> None:
        self.stats.fallbacks += 1
        self.stats.eager_buckets.add(bucket)
        what = what or f"dynamo's recompile limit ({self.stats.recompile_limit}) reached"
        log.warning("compiled backend: %s at %s: that bucket runs eagerly (%s)", what, bucket,
                    (str(why).splitlines() or [type(why).__name__])[0][:200])

    def _eager(self, expert, latent_input, timestep, context):
        if not hasattr(torch.compiler, "set_stance"):  # torch < 2.6
            raise RuntimeError("dynamo's recompile limit was reached and this torch cannot run compiled code eagerly")
        with torch.compiler.set_stance("force_eager"):
            return self._forward(expert, latent_input, timestep, context)

    def describe(self) -> dict:
        s = self.stats
        out = {"backend": "compiled", "device": str(self.device), "fp8": s.fp8_mode, "fp8_layers": s.fp8_layers,
               "fp8_impl": s.fp8_impl, "fp8_fast_accum": s.fast_accum, "fuse_qkv": s.fuse_qkv,
               "attention": s.attention, "attention_requested": s.attention_requested,
               "compiled": s.compiled, "cudagraphs": s.cudagraphs, "shape_buckets": len(s.shapes_seen)}
        if s.cudagraphs:
            out["cudagraph_threads"] = list(s.graph_threads)  # each records its own graphs (thread-local trees)
        if s.fuse_qkv:
            out["fused_projections"] = dict(s.fused_projections)
        if s.fuse_off:
            out["fuse_off"] = s.fuse_off
        if s.attention_reason:
            out["attention_reason"] = s.attention_reason
        if s.attention_measured:
            out["attention_measured"] = {k: dict(v) for k, v in s.attention_measured.items()}
        if s.fp8_attention_psnr_db is not None:
            out.update(fp8_attention_psnr_db=round(s.fp8_attention_psnr_db, 2),
                       fp8_attention_layers=s.fp8_attention_layers)
        if s.compile_off:
            out["compile_off"] = s.compile_off
        if s.fp8_off:
            out["fp8_off"] = s.fp8_off
        if s.compiled:
            out.update(compile_scope=s.compile_scope, compile_mode=s.compile_mode, compiles=s.compiles,
                       compile_seconds=dict(s.compile_seconds), recompile_limit=s.recompile_limit,
                       fallbacks=s.fallbacks)
            out["dynamo_graphs"] = _dynamo_graphs()  # process-wide: recompiles show up here
        return out

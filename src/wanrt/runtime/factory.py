"""Settings -> model, memory plan, backend, pipeline: the one place a runtime is assembled (the worker and
`wanrt generate` call `build_runtime`).

The memory plan (runtime/memory.py) picks the tier from free GPU memory and host RAM before anything is loaded
(loading both experts onto a 24 GB card would fail first), for the experts as the backend will store them (FP8
with the compiled backend's fp8 on, or an FP8 checkpoint) and for the largest warm-up bucket. The tiny model is
planned from its built modules instead (tests pass a budget). The plan is logged.

- resident: the model loads on the device; every backend runs the experts there (the compiled backend swaps
  its FP8 linears in place, on the device).
- swap (offload), stream, mmap: the model loads on the host (mmap: the experts as views of their mapped
  files; FP8 checkpoints stay FP8), and a TieredBackend places it: one expert at a time (swap), or the stems
  resident and the blocks streamed (stream, mmap); the text encoder and the VAE on the device or visiting.

Swap or stream with the compiled backend: the experts are quantised on the GPU before the tier takes its host
copies, one layer at a time. The backend gets the device explicitly and offload=True: each targeted linear's
weight goes to the GPU, is quantised there, and its FP8 weight and scales come back to the host expert. So the
device never holds more than the plan's share plus one layer, no expert is copied whole, the GPU runs
scaled_mm (or weight-only FP8 on Ampere), and CUDA graphs are off (they capture weight addresses, which every
swap changes); under streaming nothing is compiled. Under mmap the experts run in their files' precision (an
FP8 swap would copy mapped BF16 weights into RAM, which is what mmap avoids).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from wanrt.model.components import EULER_SCHEDULER_CONFIG
from wanrt.model.loading import cast_deferred, checkpoint_info, load_model
from wanrt.params import DEFAULT_BUCKET
from wanrt.runtime import gpus
from wanrt.runtime.artifacts import load_artifacts_into
from wanrt.runtime.backends import make_backend
from wanrt.runtime.fp8 import adopt_fp8_linears
from wanrt.runtime.memory import (
    HOST_RESERVE_BYTES,
    OVERHEAD_BYTES,
    MemoryPlan,
    ModelBytes,
    TieredBackend,
    choose_plan,
    decide,
    estimate_plan,
    fp8_upcasts,
    log_plan,
    normalize_tier,
    streams_blocks,
)
from wanrt.runtime.pipeline import WanI2VPipeline

log = logging.getLogger("wanrt.memory")


def make_deterministic() -> None:
    """settings.deterministic, for this process: torch's own switches, which the runtime reads where it would
    otherwise choose a kernel by timing (vae.decode_format: no cudnn.benchmark; the compiled backend: attn=auto
    measures nothing). Call before the first cuBLAS call (the workspace setting is read then)."""
    import torch
    import torch._inductor.config as inductor_config

    if torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        log.warning("deterministic: CUDA was used before the runtime was built; cuBLAS may keep its default "
                    "workspace (set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic reductions
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns, runs
    # deterministic algorithms also fill every torch.empty with NaN: output buffers are written in full anyway
    torch.utils.deterministic.fill_uninitialized_memory = False
    if hasattr(inductor_config, "deterministic"):  # no on-device benchmarking that changes numerics
        inductor_config.deterministic = True
    else:
        log.warning("deterministic: this torch %s has no Inductor deterministic mode: compiled kernels may still be "
                    "chosen by timing (use compile=False or torch >= 2.8)", torch.__version__)


def build_runtime(settings, *, free_bytes: int | None = None, host_bytes: int | None = None,
                  ledger=None) -> WanI2VPipeline:
    """Model + memory plan + backend + pipeline for these settings. free_bytes / host_bytes: the budgets to plan
    for (default: asked from CUDA and the OS; on CPU unbounded). ledger: a DeviceLedger to count into."""
    import torch

    gpus.prefer_expandable_segments()
    if settings.deterministic:
        if settings.autotune:
            raise ValueError("deterministic and autotune do not go together: autotuning picks GEMM kernels by "
                             "timing, and another process may pick others")
        make_deterministic()
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    requested = normalize_tier(settings.memory)
    backend_name = settings.resolved_backend()  # auto: compiled on CUDA, eager elsewhere
    compiled, tensorrt = backend_name == "compiled", backend_name == "tensorrt"
    on_cuda = torch.device(device).type == "cuda"
    if compiled and settings.compile and on_cuda:  # the CPU tests' compiles stay in torch's own temp dirs
        from wanrt.runtime.backends.compiled import persist_compile_caches

        log.info("compile caches: %s", persist_compile_caches(Path(settings.data_dir) / "cache"))
    allowances = dict(overhead=OVERHEAD_BYTES if on_cuda else 0, host_reserve=HOST_RESERVE_BYTES if on_cuda else 0,
                      act_bytes=torch.tensor([], dtype=dtype).element_size())
    bucket = max(settings.resolved_warmup() or (DEFAULT_BUCKET,), key=_tokens)
    info = checkpoint_info(settings.model)
    deferred = False  # the blocks' matrices left in their files' precision for the FP8 swap (plan_runtime)
    if settings.model == "tiny":
        # Built in a second: planned from its measured modules.
        model = load_model("tiny", "cpu", dtype)
        mb = _with_lora(ModelBytes.measure(model, **allowances), settings, dict(model.transformer_high.config), dtype)
        plan = decide(mb, _free(device, free_bytes), host_bytes, requested, bucket, mmap_ok=False) \
            if (free_bytes is not None or on_cuda or requested != "auto") else choose_plan(model, device, bucket=bucket)
        if plan.tier == "resident":
            model.to(device, dtype)
    else:
        plan, mb, mapped = plan_runtime(settings, free_bytes=free_bytes, host_bytes=host_bytes)
        # Non-resident tiers load on the host (loading both experts onto a small GPU would fail first).
        deferred = mb.load_mapped and plan.tier == "stream"
        model = load_model(settings.model, device if plan.tier == "resident" else "cpu", dtype,
                           keep_fp8=info["fp8"], mmap=mapped or deferred, defer_cast=deferred)
        if info["fp8"]:  # FP8 checkpoint: its linears run as stored (the compiled backend re-modes them per device)
            for expert in model.experts.values():
                adopt_fp8_linears(expert, "weight_only")
    gpu = gpus.detect(device) if on_cuda else None
    log_plan(plan, mb, gpu)
    if settings.artifacts:
        load_artifacts_into(model, settings.artifacts, settings.model)
    if settings.scheduler == "euler":
        model.scheduler_config = dict(EULER_SCHEDULER_CONFIG)

    def make_inner(tier: str):
        options = {}
        if compiled:
            options = dict(fp8=settings.fp8, mapped=tier == "mmap", fp8_impl=settings.fp8_impl, attn=settings.attn,
                           fuse_qkv=settings.fuse_qkv and not serves_loras(settings), compile=settings.compile,
                           compile_scope=settings.compile_scope, autotune=settings.autotune,
                           cudagraphs=settings.cudagraphs, offload=tier != "resident", streamed=streams_blocks(tier))
        elif tensorrt:
            options = dict(artifacts=settings.artifacts, one_expert_at_a_time=tier != "resident")
        inner = make_backend(backend_name, model, device=device, **options)
        if deferred:  # the FP8 swap read the blocks' weights as stored: any it left takes the model dtype now
            for expert in model.experts.values():
                cast_deferred(expert, dtype)
        return inner

    loras = _LoraInstaller(settings, model) if serves_loras(settings) else None
    backend = TieredBackend(model, device, plan, mb, make_inner, ledger=ledger, can_demote=not tensorrt, gpu=gpu,
                            on_inner=loras)
    pipeline = WanI2VPipeline(model, backend, device=device, dtype=dtype, vae_dtype=settings.vae_dtype)
    pipeline.loras = loras.group if loras is not None else None
    return pipeline


def plan_runtime(settings, *, free_bytes: int | None = None, host_bytes: int | None = None
                 ) -> tuple[MemoryPlan, ModelBytes, bool]:
    """The memory plan for a checkpoint (not the tiny model) before anything is loaded: (plan, the bytes it
    was priced with, whether the experts run as mapped files). Priced from the checkpoint itself where it can
    be: single files from their headers, a diffusers dir from its configs, else the A14B's."""
    import torch

    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    on_cuda = torch.device(device).type == "cuda"
    act_bytes = torch.tensor([], dtype=dtype).element_size()
    overhead, host_reserve = (OVERHEAD_BYTES, HOST_RESERVE_BYTES) if on_cuda else (0, 0)
    info = checkpoint_info(settings.model)
    configs = _diffusers_configs(settings.model)
    mb = mb_mapped = None
    if info["mmap"] and configs is None:
        # Single files: every part measured from the headers (shapes and dtypes; nothing is read).
        try:
            meta = load_model(settings.model, "meta", dtype, keep_fp8=info["fp8"])
        except Exception as e:  # the A14B's sizes from its config then; loading reports what is wrong
            log.warning("could not measure %s from its headers (%s): planning for the A14B", settings.model, e)
        else:
            for expert in meta.experts.values():
                adopt_fp8_linears(expert, "weight_only")  # as the loaded model will be (below)
            mb_mapped = ModelBytes.measure(meta, overhead=overhead, act_bytes=act_bytes, host_reserve=host_reserve)
            mb = _with_expert_storage(mb_mapped, settings, info["fp8"])
    fp8 = (settings.resolved_backend() == "compiled" and settings.fp8) or info["fp8"]
    if mb is None:
        upcast = fp8_upcasts(device)
        expert_config, text_config = configs or (None, None)
        mb, mb_mapped = (dataclasses.replace(
            ModelBytes.from_config(act_bytes, stored_fp8, expert_config, text_config, upcast=stored_fp8 and upcast,
                                   overhead=overhead, load_fp8=info["fp8"]), host_reserve=host_reserve)
            for stored_fp8 in (fp8, info["fp8"]))
    expert_config = configs[0] if configs else (None if mb_mapped is None else _config_of(mb_mapped))
    mb = _with_lora(mb, settings, expert_config, dtype)
    mb_mapped = _with_lora(mb_mapped, settings, expert_config, dtype)
    # Experts in safetensors files, for the FP8 swap: on a streamed tier they are read mapped, their blocks'
    # matrices in the files' own precision (FP32 or BF16), and quantised a layer at a time, so the host never
    # holds both experts in BF16 (57 GB: a 4090 on a 64 GB host fell to the mmap tier, without FP8). Swap loads
    # them whole (it fuses each expert's Q/K/V, in the load dtype, before quantising).
    mb = dataclasses.replace(mb, load_mapped=bool(
        fp8 and not info["fp8"] and info["mmap"] and info["weights_dtype"] is not None and settings.fp8_impl == "wanrt"))
    plan = estimate_plan(settings.model, device, dtype, normalize_tier(settings.memory), fp8=fp8,
                         warmup=settings.resolved_warmup(), free_bytes=free_bytes, fp8_at_load=info["fp8"], host_bytes=host_bytes,
                         # files in another precision than the run's would be cast into RAM, not mapped
                         mmap_ok=info["mmap"] and (info["fp8"] or info["weights_dtype"] == dtype),
                         checkpoint_fp8=info["fp8"], mb=mb, mb_mapped=mb_mapped)
    mapped = plan.tier == "mmap" and info["mmap"]
    return plan, (mb_mapped if mapped else mb), mapped  # the mapped files run in their own precision


def serves_loras(settings) -> bool:
    """LoRA slots are installed: a LoRA dir, a rank, and a backend that runs torch experts (engines embed weights)."""
    return bool(settings.lora_dir) and settings.max_lora_rank > 0 and settings.resolved_backend() != "tensorrt"


def _with_lora(mb: ModelBytes | None, settings, expert_config: dict | None, dtype) -> ModelBytes | None:
    """mb with the LoRA slots and prepared cache that _LoraInstaller will add (none without a LoRA dir)."""
    if mb is None or not serves_loras(settings):
        return mb
    return mb.with_lora(expert_config, settings.max_lora_rank, int(settings.lora_cache_gb * 2**30), dtype)


def _diffusers_configs(spec: str) -> tuple[dict, dict] | None:
    """(expert config, text encoder config) of a diffusers dir, None for anything else."""
    root = Path(spec)
    if not (root / "transformer" / "config.json").is_file():
        return None
    text = root / "text_encoder" / "config.json"
    return (json.loads((root / "transformer" / "config.json").read_text()),
            json.loads(text.read_text()) if text.is_file() else None)


class _LoraInstaller:
    """LoRA slots on the experts the inner backend runs (its FP8 linears wrapped, before the memory tier takes
    host copies and before the first compiled forward), and the library of `settings.lora_dir`. Called again
    when a tier change rebuilds the inner backend: the slots stay where they are unless the experts are new
    copies (the CPU FP8 emulation runs copies), which then get fresh slots."""

    def __init__(self, settings, model):
        self.settings, self.model, self.group = settings, model, None

    def __call__(self, inner) -> None:
        from wanrt.runtime.lora import LoraLinear, LoraSlotGroup

        experts = {n: getattr(m, "_orig_mod", m) for n, m in getattr(inner, "experts", self.model.experts).items()}
        if self.group is not None and all(any(isinstance(m, LoraLinear) for m in e.modules()) for e in experts.values()):
            return
        s = self.settings
        fresh = LoraSlotGroup.install(experts, s.max_lora_rank, cache_bytes=int(s.lora_cache_gb * 2**30),
                                      lora_dir=None if self.group is not None else s.lora_dir,
                                      allow_unmatched=s.lora_allow_unmatched)
        if self.group is None:
            self.group = fresh
        else:  # same library, new slots (nothing loaded in them yet)
            self.group.slots, self.group.loaded_key = fresh.slots, ""


def _tokens(bucket: str) -> int:
    from wanrt.model.sizes import bucket_tokens

    return bucket_tokens(bucket)


def _free(device, free_bytes):
    import torch

    if free_bytes is None and torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return free_bytes


def _with_expert_storage(mb: ModelBytes, settings, checkpoint_fp8: bool) -> ModelBytes:
    """The experts priced as the backend will store them: an FP8 checkpoint as measured; the compiled backend's
    FP8 swap of a BF16 checkpoint at FP8 sizes for the model's config; weight-only upcast where the GPU has no
    FP8 GEMMs."""
    fp8 = checkpoint_fp8 or (settings.resolved_backend() == "compiled" and settings.fp8)
    if not fp8:
        return mb
    upcast_on = fp8_upcasts(settings.resolved_device())
    q = ModelBytes.from_config(mb.act_bytes, True, expert_config=_config_of(mb), upcast=upcast_on)
    if checkpoint_fp8:
        return dataclasses.replace(mb, upcast=q.upcast, fp8=True)
    return dataclasses.replace(mb, expert_high=q.expert_high, expert_low=q.expert_low, stem=q.stem, block=q.block,
                               upcast=q.upcast, fp8=True)


def _config_of(mb: ModelBytes) -> dict:
    return dict(num_attention_heads=mb.dim // mb.head_dim, attention_head_dim=mb.head_dim, ffn_dim=mb.ffn,
                num_layers=mb.n_blocks)

#!/usr/bin/env python3
"""The GPU proof: on a CUDA host that brings its own torch, install our wheels offline and measure, stage by
stage, in separate processes, what the README claims about full-size WAN 2.2 I2V A14B (random weights).

    make wheelhouse                                  # where pip has network: wheels/ (< 64 MiB)
    python benchmarks/gpu_proof.py                   # on the GPU host: every stage  (= make gpu-proof)
    python benchmarks/gpu_proof.py --stage 3         # one stage alone (after the install, or --no-install)
    python benchmarks/gpu_proof.py --dry-run --out /tmp/proof   # CPU, tiny model: plumbing and schema

Without --stage the script first runs `pip install --no-index --no-deps --target <site> wheels/*.whl` (every
wheel there; it refuses a wheels/ that lacks one of the Makefile's WHEELHOUSE_PKGS or wanrt) and puts <site> first
on PYTHONPATH for the stage processes (torch, transformers, accelerate, ... are the host's).
Stages (each its own process, each bounded to a few minutes at full size on an H100; one warm run):
  1 probe: versions; for Wan's self-attention (B=2, 40 heads, head dim 128, 33,600 tokens, bf16) the attention
    report (wanrt.runtime.attention.kernel_report: which kernels can run it, which one PyTorch picks, what
    attn=auto resolves to) and flash / cuDNN / efficient / cuDNN FP8 timings (FP8: per-tensor scales,
    quantisation included, with its PSNR against BF16 attention); one FFN-shaped linear (33,600x5120 @
    5120x13824) in BF16 vs FP8 (torch._scaled_mm, row-wise scales; and our Fp8Linear, activation
    quantisation included); the VAE decode's bf16 vs fp32 frame PSNR (benchmarks/bench_vae.py on --vae-model,
    default --model; vae_dtype=auto's 40 dB gate: only real weights give the figure that matters);
    `pytest -m gpu` on the test files that have GPU tests.
  2 default preset: diffusers' pipeline (BF16) and our eager backend (BF16; writes the reference latents)
  3 default preset, the serving default: FP8 + torch.compile (Settings: no CUDA graphs, no autotune); then the
    same with CUDA graphs, opt-in (--cudagraphs), a row of its own marked opt_in
  4 default preset: BF16 + torch.compile (the serving default with --no-fp8)
  5 fast preset (4 steps, cfg 1): eager (its reference), diffusers, FP8 + compile
  6 memory modes, default preset: eager BF16 resident vs offload (one expert at a time) on one loaded model,
    and the compiled backend (FP8 + compile) under offload as the runtime builds it (build_runtime; its own
    process on the GPU): seconds per swap, peak memory, the plan's prediction, latents against eager resident's
  7 cold start: a fresh `wanrt generate --backend compiled` process to its first MP4 (compile included)
Rows of stages 2-5 come from benchmarks/bench_e2e.py, one process per row.

Results: benchmarks/results/gpu_<gpu>_<yyyymmdd>.json (or --out), appended by every stage, then regenerated
from it: a README-ready table (.md, same name), a chart (.png, when matplotlib imports) and the block between
<!-- gpu-proof:start --> and <!-- gpu-proof:end --> in README.md (--readme; a dry run writes a copy of README.md
in --out instead, never the tracked file). Schema (version 1):
  top level: schema (1), gpu (device name), torch, cuda (null on CPU), cudnn (null on CPU), dry_run,
    model, probe (stage 1's findings, absent until it runs), rows (list)
  per row: stage (int), preset, config, total_s, text, vae_encode, denoise_high, denoise_low, vae_decode,
    mp4 (seconds per stage; mp4 is null for diffusers, whose pipeline writes no video), loop_tflops,
    pct_bf16_peak, pct_fp8_peak (of the GPU's published dense peak), warmup_s (the warm-up runs: compiles
    included; cold start: imports + load), peak_allocated_gb, peak_reserved_gb, vs_diffusers (diffusers'
    total / ours without the MP4 encode, same preset, any stage), latent_cos, psnr_db (vs our eager BF16
    reference of the same preset); null where not applicable or not measured. Optional extras: error,
    fp8_layers, load_s, swap_s, plan_need_gb, plan_mode, bit_identical, host_copies, opt_in (a configuration
    the server does not run unless asked), note.
A dry run runs every stage on the tiny model on the CPU (no wheel install; GPU-only measurements null;
compiled rows without torch.compile, which takes minutes on CPU; rows in the stage's process).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

import bench_e2e  # noqa: E402
import flops as flop_model  # noqa: E402
from bench_runtime import PRESETS, device_name  # noqa: E402

SCHEMA_VERSION = 1
ROW_FIELDS = ("stage", "preset", "config", "total_s", "text", "vae_encode", "denoise_high", "denoise_low", "vae_decode",
              "mp4", "loop_tflops", "pct_bf16_peak", "pct_fp8_peak", "warmup_s", "peak_allocated_gb",
              "peak_reserved_gb", "vs_diffusers", "latent_cos", "psnr_db")
TOP_FIELDS = ("schema", "gpu", "torch", "cuda", "cudnn", "rows")
STAGE_KEYS = {"text": "text_encode_s", "vae_encode": "vae_encode_s", "denoise_high": "denoise_high_s",
              "denoise_low": "denoise_low_s", "vae_decode": "vae_decode_s", "mp4": "mp4_encode_s"}
FP8_COMPILED = "+fp8 +compile"  # the serving default (Settings: fp8 and compile on, cudagraphs and autotune off)
FP8_GRAPHS = "+fp8 +compile +cudagraphs"
BF16_COMPILED = "bf16 +compile"  # the serving default with --no-fp8
FP8_TORCHAO = "+fp8(torchao) +compile"  # fp8_impl=torchao: the same recipe, kept if it measures faster
OPT_IN = {FP8_GRAPHS, FP8_TORCHAO}  # measured, never the headline: the server runs them only when asked
# stages 2-5: (preset key, bench_e2e configuration, warm-up runs) in table order (the eager reference runs first)
E2E_PLAN = {
    2: [("default", "diffusers", 1), ("default", "eager", 1)],
    3: [("default", FP8_COMPILED, 1), ("default", FP8_GRAPHS, 1), ("default", FP8_TORCHAO, 1)],
    4: [("default", BF16_COMPILED, 1)],
    5: [("fast", "diffusers", 0), ("fast", "eager", 0), ("fast", FP8_COMPILED, 1)],
}
MEMORY_EAGER = ("resident", "offload")  # stage 6, on one loaded model; then MEMORY_COMPILED, built by the runtime
MEMORY_COMPILED = f"offload (compiled {FP8_COMPILED})"
VAE_MIN_PSNR_DB = 40.0  # vae_dtype=auto's gate: bf16 decode frames against fp32 (src/wanrt/runtime/vae.py)
README_START, README_END = "<!-- gpu-proof:start -->", "<!-- gpu-proof:end -->"
STAGE_NAMES = {1: "probe", 2: "default: diffusers + eager", 3: "default: FP8 + compile (+ CUDA graphs, opt-in)",
               4: "default: BF16 + compile", 5: "fast preset", 6: "memory modes", 7: "cold start"}
STAGE_TIMEOUT_S = 900  # a safety net per stage process; each is designed for < 8 minutes at full size
ROW_TIMEOUT_S = 480


# --------------------------------------------------------------------------------------------- context
class Ctx:
    def __init__(self, args):
        self.dry = args.dry_run
        self.model = "tiny" if self.dry else args.model
        self.device = "cpu" if self.dry else args.device
        self.out = Path(args.out)
        self.ref_dir = self.out / "ref"
        self.presets = {"default": "smoke", "fast": "smoke_fast"} if self.dry else {"default": "default", "fast": "fast"}
        self.repeats = 1
        self.row_timeout = ROW_TIMEOUT_S
        self.date = args.date
        self.vae_model = "tiny" if self.dry else (args.vae_model or args.model)
        # a dry run rewrites a copy of the README (tests never touch tracked files)
        self.readme_src = Path(args.readme) if args.readme else ROOT / "README.md"
        self.readme = Path(args.readme) if args.readme else (self.out / "README.md" if self.dry else self.readme_src)

    def e2e_row(self, stage: int, preset_key: str, config: str, warmup: int = 1) -> dict:
        """A bench_e2e row: in its own process on the GPU, in this one in a dry run (CPU, FP8 on copies).
        warmup: runs before the timed one (compiles for the compiled rows, cuDNN/cuBLAS heuristics)."""
        preset = self.presets[preset_key]
        warmup = 0 if self.dry else warmup
        if self.dry:
            row = bench_e2e.run_row(self.model, self.device, preset, config, self.repeats, warmup, self.ref_dir,
                                    compile_off=True)
        else:
            row = bench_e2e.spawn_row(self.model, self.device, preset, config, self.repeats, warmup,
                                      self.ref_dir, timeout=self.row_timeout)
        return from_e2e(stage, row, self.dry)


def empty_row(stage: int, preset: str, config: str) -> dict:
    return {k: None for k in ROW_FIELDS} | {"stage": stage, "preset": preset, "config": config}


def from_e2e(stage: int, e2e: dict, dry: bool = False) -> dict:
    row = empty_row(stage, e2e.get("preset"), e2e.get("config"))
    median = e2e.get("median_s") or {}
    row["total_s"] = median.get("total_s")
    for key, src in STAGE_KEYS.items():
        row[key] = median.get(src)
    pct = e2e.get("loop_pct_of_peak") or {}
    guard = e2e.get("guard") or {}
    row.update(loop_tflops=e2e.get("loop_tflops"), pct_bf16_peak=pct.get("bf16"), pct_fp8_peak=pct.get("fp8"),
               warmup_s=e2e.get("warmup_s"), peak_allocated_gb=e2e.get("peak_memory_gb"),
               peak_reserved_gb=e2e.get("peak_reserved_gb"), latent_cos=guard.get("latent_cosine"),
               psnr_db=guard.get("frames_psnr_db"))
    for extra in ("error", "fp8_layers", "load_s"):
        if e2e.get(extra) is not None:
            row[extra] = e2e[extra]
    if e2e.get("config") in OPT_IN:
        row["opt_in"] = True
    if dry and "compile" in (e2e.get("config") or ""):
        row["note"] = "dry run: torch.compile off" + (" (and CUDA graphs)" if "cudagraphs" in e2e["config"] else "")
    return row


# --------------------------------------------------------------------------------------------- stages
def stage_probe(ctx: Ctx) -> tuple[list[dict], dict]:
    import torch

    from wanrt.runtime import attention

    probe = {"python": sys.version.split()[0], "versions": _versions(), "wanrt_path": _wanrt_path()}
    if ctx.dry or not torch.cuda.is_available():
        # the report's plumbing at Wan's shapes on the CPU (allocated, never written: no pages touched)
        probe.update(attention=attention.kernel_report(**attention.WAN_SELF_ATTENTION, device="cpu"),
                     sdpa_default=None, sdpa=None, fp8_linear=None, vae=_probe_vae(ctx), pytest_gpu=None,
                     note="dry run: no GPU")
        return [], probe
    dev = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(dev)
    probe["device"] = {"name": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
                       "memory_total_gib": total / 2**30, "memory_free_gib": free / 2**30}
    probe["attention"] = attention.kernel_report(**attention.WAN_SELF_ATTENTION, device=dev)
    probe["sdpa_default"], probe["sdpa"] = _probe_sdpa(dev)
    probe["fp8_linear"] = _probe_fp8_linear(dev)
    probe["vae"] = _probe_vae(ctx)
    probe["pytest_gpu"] = _pytest_gpu()
    return [], probe


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "torchao", "nvidia-cudnn-frontend", "av", "ftfy",
                 "numpy", "wanrt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _wanrt_path() -> str:
    import wanrt

    return str(Path(wanrt.__file__).parent)


def _cuda_time(fn, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds of fn() measured with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _probe_sdpa(dev) -> tuple[dict, dict]:
    """Kernel PyTorch picks for Wan's self-attention (its dispatch choice, and the profiler's kernel names as
    evidence), each backend's time, and cuDNN FP8 attention's time and PSNR against BF16 attention."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from wanrt.runtime import attention

    B, H, L, D = 2, 40, 33_600, 128
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * B * H * L * L * D
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}, key=len)
    names = " ".join(kernels).lower()
    profiled = ("cudnn" if "cudnn" in names else "flash" if "flash" in names else
                "efficient" if ("fmha" in names or "efficient" in names) else "math/other")
    default = {"backend": attention.chosen_kernel(q, k, v), "profiled": profiled, "kernels": kernels[:6]}
    timings = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                s = _cuda_time(lambda: F.scaled_dot_product_attention(q, k, v))
            timings[name] = {"ms": s * 1e3, "tflops": flop / s / 1e12}
        except Exception as e:  # a backend that does not support this shape or card says why
            timings[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    timings["cudnn_fp8"] = _probe_fp8_attention(q, k, v, flop)
    return default, timings


def _probe_fp8_attention(q, k, v, flop: float) -> dict:
    """attn=cudnn_fp8's op on the experts' (B, S, H, D) layout: quantisation of Q/K/V included in the time."""
    import torch
    import torch.nn.functional as F

    from wanrt.runtime import attention

    why = attention.fp8_unavailable(q.device)
    if why:
        return {"error": why}
    try:
        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        scale = q.shape[-1] ** -0.5

        def op():
            return torch.ops.wanrt.cudnn_fp8_sdpa(qs, ks, vs, scale)

        s = _cuda_time(op)
        psnr = attention.psnr_db(F.scaled_dot_product_attention(q, k, v).transpose(1, 2), op())
        return {"ms": s * 1e3, "tflops": flop / s / 1e12, "psnr_db": psnr, "gate_db": attention.FP8_MIN_PSNR_DB,
                "note": "per-tensor e4m3 Q/K/V, softmax tile and output; quantisation included"}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _probe_fp8_linear(dev) -> dict:
    import torch

    from wanrt.engine_build.quantize import quantize_weight
    from wanrt.runtime.fp8 import Fp8Linear
    M, K, N = 33_600, 5120, 13_824
    flop = 2 * M * K * N
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    lin = torch.nn.Linear(K, N, bias=True, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    out = {"shape": [M, K, N]}
    with torch.inference_mode():
        y_ref = lin(x)
        s = _cuda_time(lambda: lin(x), warmup=3, reps=10)
        out["bf16"] = {"ms": s * 1e3, "tflops": flop / s / 1e12}
        try:
            wq, ws = quantize_weight(lin.weight, "channel")
            wq, ws = wq.to(dev), ws.to(dev, torch.float32)
            xq, xs = Fp8Linear.quantize_activation(x)

            def mm():
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

            s = _cuda_time(mm, warmup=3, reps=10)
            y = mm()
            out["fp8_scaled_mm"] = {"ms": s * 1e3, "tflops": flop / s / 1e12, "speedup": out["bf16"]["ms"] / (s * 1e3),
                                    "cosine": torch.nn.functional.cosine_similarity(
                                        y.float().flatten(), (y_ref - lin.bias).float().flatten(), dim=0).item()}
            fp8 = Fp8Linear(lin, emulate=False)
            s = _cuda_time(lambda: fp8(x), warmup=3, reps=10)
            out["fp8_linear_module"] = {"ms": s * 1e3, "tflops": flop / s / 1e12,
                                        "speedup": out["bf16"]["ms"] / (s * 1e3),
                                        "note": "activation quantisation + scaled_mm + bias"}
        except Exception as e:
            out["fp8_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out["torchao"] = _probe_torchao_linear(lin, x, y_ref, out["bf16"]["ms"], flop)
    return out


def _probe_torchao_linear(lin, x, y_ref, bf16_ms: float, flop: int) -> dict:
    """fp8_impl=torchao on the same layer (Float8DynamicActivationFloat8WeightConfig, PerRow): the same recipe as
    Fp8Linear, so speed at equal error decides which the compiled backend should default to."""
    import copy

    import torch

    from wanrt.runtime.fp8 import quantize_torchao, torchao_unavailable

    if why := torchao_unavailable(x.device, offload=False):
        return {"error": why}
    try:
        layer = torch.nn.Sequential(copy.deepcopy(lin))
        quantize_torchao(layer, include=".*")
        s = _cuda_time(lambda: layer(x), warmup=3, reps=10)
        y = layer(x)
        return {"ms": s * 1e3, "tflops": flop / s / 1e12, "speedup": bf16_ms / (s * 1e3),
                "cosine": torch.nn.functional.cosine_similarity(y.float().flatten(), y_ref.float().flatten(),
                                                                dim=0).item()}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def _probe_vae(ctx: Ctx) -> dict:
    """benchmarks/bench_vae.py on --vae-model: decode seconds in fp32 and bf16 (on CUDA also bf16 without
    channels_last_3d) and each one's frame PSNR against fp32, the figure vae_dtype=auto is gated on."""
    import bench_vae

    out = ctx.out / f"vae_{Path(ctx.vae_model).name}_{ctx.device}_{ctx.date}.json"
    argv = ["--model", ctx.vae_model, "--device", ctx.device, "--out", str(out), "--repeats", "2"]
    if ctx.dry:  # seconds on two cores; 128x128x17 gives about the same PSNR
        argv += ["--width", "64", "--height", "64", "--frames", "9", "--repeats", "1"]
    try:
        report = bench_vae.main(argv)
    except Exception as e:  # a missing checkpoint or diffusers says why; the probe goes on
        return {"model": ctx.vae_model, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    decode = report["decode"]
    psnr = {name: r["psnr_vs_fp32_db"] for name, r in decode.items() if name != "fp32"}
    return {"model": ctx.vae_model, "real_weights": ctx.vae_model not in ("tiny", "random-full"),
            "size": report["size"], "latents": report["latents"], "gate_db": VAE_MIN_PSNR_DB,
            "psnr_db": psnr, "passes": psnr["bf16"] >= VAE_MIN_PSNR_DB,
            "decode_s": {name: r["median_s"] for name, r in decode.items()}, "auto_format": report["auto_format"],
            "report": str(out)}


def _pytest_gpu() -> dict:
    """`pytest -m gpu` on the test files that carry GPU tests (the others need the CPU suite's extras)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        tail = (r.stdout + r.stderr).strip().splitlines()
        return {"files": files, "returncode": r.returncode, "summary": tail[-1] if tail else "",
                "seconds": time.perf_counter() - t0, "tail": "\n".join(tail[-15:])}
    except subprocess.TimeoutExpired:
        return {"files": files, "returncode": None, "summary": "timed out after 300 s"}


def stage_e2e(ctx: Ctx, n: int):
    """Stages 2-5: E2E_PLAN's rows, each a bench_e2e row."""
    kept = bench_e2e.runnable([c for _, c, _ in E2E_PLAN[n]], ctx.device, f"stage {n}")
    plan = [p for p in E2E_PLAN[n] if p[1] in kept]
    # the eager reference first: every other row of its preset compares against the latents it writes
    order = sorted(plan, key=lambda p: p[1] != bench_e2e.REFERENCE_CONFIG)
    done = {p: ctx.e2e_row(n, *p) for p in order}
    return [done[p] for p in plan], None


def stage_memory(ctx: Ctx):
    """Eager BF16 resident vs offload on one loaded model (the same request, timed and measured), then the
    compiled backend under offload as the runtime builds it. That row runs first, in a process of its own on
    the GPU: the GPU and the host RAM are its alone (the eager offload row pins two BF16 experts, ~57 GB, which
    the pinned-memory cache would keep)."""
    compiled, latents = compiled_offload_row(ctx) if ctx.dry else _spawn_compiled_offload_row(ctx)
    rows, reference = _eager_memory_rows(ctx)
    if latents is not None and reference is not None:
        _compare(compiled, latents, reference)
    return rows + [compiled], None


def _eager_memory_rows(ctx: Ctx):
    """MEMORY_EAGER's rows and the resident row's latents (every memory row's reference)."""
    import torch

    from wanrt.config import Settings
    from wanrt.model.loading import load_model
    from wanrt.runtime.backends.eager import EagerBackend
    from wanrt.runtime.memory import ExpertSwapper, OffloadingBackend, estimate_plan
    from wanrt.runtime.pipeline import WanI2VPipeline

    settings = Settings(model=ctx.model, device=ctx.device)
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    cuda = device.startswith("cuda")
    dtype_name = str(dtype).replace("torch.", "")
    model = load_model(ctx.model, device, dtype)
    rows, reference = [], None
    for mode in MEMORY_EAGER:
        row = empty_row(6, ctx.presets["default"], f"{mode} (eager {dtype_name})")
        try:
            backend, swapper = EagerBackend(model), None
            if mode == "offload":
                t0 = time.perf_counter()
                swapper = ExpertSwapper(model.experts, device)  # pins both host copies, frees the device copies
                row["pin_s"] = time.perf_counter() - t0
                backend = OffloadingBackend(backend, swapper)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()  # after the swapper dropped the device copies
                plan = estimate_plan(ctx.model, device, dtype, mode, free_bytes=torch.cuda.mem_get_info()[0])
                row["plan_need_gb"] = plan.need_bytes / 2**30
                row["plan_phases_gb"] = {k: round(v / 2**30, 2) for k, v in plan.phases.items()}
            row["plan_mode"] = mode
            pipe = WanI2VPipeline(model, backend, device=device, dtype=dtype)
            # offload: a second request shows the steady state (the first expert prefetched during the decode)
            latents = _measure(ctx, row, pipe, swapper, 2 if mode == "offload" and not ctx.dry else 1)
            reference = latents if reference is None else reference
            _compare(row, latents, reference)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    return rows, reference


def compiled_offload_row(ctx: Ctx):
    """The serving default's backend (compiled: FP8 + compile) under memory=offload, built by build_runtime as
    the worker builds it (the model loads on the host, each linear is quantised on the device, the tier's
    swapper pins the FP8 experts): the path that used to crash. (row, latents or None)."""
    import torch

    from wanrt.config import Settings
    from wanrt.runtime.factory import build_runtime

    settings = Settings(model=ctx.model, device=ctx.device, backend="compiled", memory="offload", compile=not ctx.dry)
    row, latents = empty_row(6, ctx.presets["default"], MEMORY_COMPILED), None
    try:
        t0 = time.perf_counter()
        pipe = build_runtime(settings)
        row["load_s"] = time.perf_counter() - t0  # host load + per-layer FP8 quantisation + pinned host copies
        backend = pipe.backend
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["plan_need_gb"] = backend.plan.need_bytes / 2**30
            row["plan_phases_gb"] = {k: round(v / 2**30, 2) for k, v in backend.plan.phases.items()}
        row["plan_mode"] = "offload" if backend.tier == "swap" else backend.tier
        row["fp8_layers"] = bench_e2e.fp8_layer_count(*pipe.model.experts.values(),
                                                      *getattr(backend.inner, "experts", {}).values())
        # the first request compiles (and swaps); the second is the steady state
        latents = _measure(ctx, row, pipe, backend.swapper, 1 if ctx.dry else 2)
        if ctx.dry:
            row["note"] = "dry run: torch.compile off"
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row, latents


def _spawn_compiled_offload_row(ctx: Ctx):
    """compiled_offload_row in a fresh process of this script (`--memory-row`): its row and latents come back
    as files."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(HERE), "--memory-row", tmp, "--out", str(ctx.out), "--model", ctx.model,
               "--device", ctx.device, "--date", ctx.date] + (["--dry-run"] if ctx.dry else [])
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.row_timeout)
        except subprocess.TimeoutExpired:
            r = None
        row_file, latents_file = Path(tmp) / "row.json", Path(tmp) / "latents.pt"
        if r is None or r.returncode != 0 or not row_file.is_file():
            row = empty_row(6, ctx.presets["default"], MEMORY_COMPILED)
            row["error"] = (f"timed out after {ctx.row_timeout} s" if r is None
                            else f"row process exited {r.returncode}: {r.stderr[-600:]}")
            return row, None
        latents = torch.load(latents_file, weights_only=True) if latents_file.is_file() else None
        return json.loads(row_file.read_text()), latents


def _measure(ctx: Ctx, row: dict, pipe, swapper, requests: int):
    """`requests` default requests on `pipe`, the last one timed (the ones before it are the warm-up): stage
    seconds, peak memory since the caller's reset, the loop's TFLOP/s and one synchronised swap of each expert.
    Returns the last request's latents (float32, CPU)."""
    import torch
    from PIL import Image

    from wanrt.params import GenerateParams

    preset = ctx.presets["default"]
    params = GenerateParams(prompt=bench_e2e.PROMPT, **PRESETS[preset])
    image = Image.open(bench_e2e.IMAGE)
    video = ctx.out / "memory.mp4"
    t_warm = time.perf_counter()
    for i in range(requests):
        if i == requests - 1:
            row["warmup_s"] = time.perf_counter() - t_warm
        result = pipe.generate(params, image, video, keep_latents=True)
    video.unlink(missing_ok=True)
    row["total_s"] = result.timings["total_s"]
    for key, src in STAGE_KEYS.items():
        row[key] = result.timings.get(src)
    cuda = pipe.device.type == "cuda"
    if cuda:
        row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    if swapper is not None:
        swaps = []
        for name in ("low", "high"):  # one expert in (the other dropped), synchronised
            t0 = time.perf_counter()
            swapper.ensure(name)
            if cuda:
                torch.cuda.synchronize()
            swaps.append(time.perf_counter() - t0)
        row["swap_s"] = statistics.mean(swaps)
        row["host_copies"] = swapper.copies["host"]
    loop_s = (row["denoise_high"] or 0) + (row["denoise_low"] or 0)
    if loop_s:
        flop = flop_model.request_flops(arch=bench_e2e.arch_of(pipe.model), **PRESETS[preset])["total"]
        row["loop_tflops"] = flop / loop_s / 1e12
        _peak_pct(row, str(pipe.device))
    return result.latents.float().cpu()


def _compare(row: dict, latents, reference) -> None:
    import torch

    row["latent_cos"] = torch.nn.functional.cosine_similarity(latents.flatten(), reference.flatten(), dim=0).item()
    row["bit_identical"] = bool(torch.equal(latents, reference))


def _peak_pct(row: dict, device: str) -> None:
    name = device_name(device)
    key = next((v for k, v in bench_e2e.GPU_PEAK_KEYS.items() if k in name), None)
    if key and row.get("loop_tflops"):
        peaks = flop_model.PEAKS_TFLOPS[key]
        row["pct_bf16_peak"] = 100 * row["loop_tflops"] / peaks["bf16"]
        row["pct_fp8_peak"] = 100 * row["loop_tflops"] / peaks["fp8"] if peaks["fp8"] else None


def stage_cold_start(ctx: Ctx):
    """Process start to the first MP4. GPU: `wanrt generate --backend compiled` with the Settings defaults (the
    serving default: FP8 + compile, no CUDA graphs; the compile happens inside the first request). Dry run: a bench_e2e row process (eager), since the CLI
    refuses sizes under 256 and the tiny VAE needs ~40 s at 256x256 on two CPU cores."""
    preset = ctx.presets["default"]
    if ctx.dry:
        t0 = time.perf_counter()
        e2e = bench_e2e.spawn_row(ctx.model, ctx.device, preset, "eager", 1, 0, ctx.ref_dir, timeout=ctx.row_timeout)
        row = from_e2e(7, e2e, ctx.dry)
        row.update(config="cold start: process -> first MP4 (bench_e2e row, eager)", total_s=time.perf_counter() - t0,
                   latent_cos=None, psnr_db=None, note="dry run: a bench_e2e row process instead of the CLI")
        row["warmup_s"] = row["total_s"] - (e2e.get("median_s") or {}).get("total_s", 0.0)
        return [row], None
    cold = bench_e2e.cold_start(ctx.model, ctx.device, preset, extra=("--backend", "compiled"))
    row = empty_row(7, preset, "cold start: process -> first MP4 (compiled)")
    row["total_s"] = cold["seconds"]
    timings = cold.get("request_timings_s") or {}
    for key, src in STAGE_KEYS.items():
        row[key] = timings.get(src)
    if timings.get("total_s") is not None:
        row["warmup_s"] = cold["seconds"] - timings["total_s"]  # imports + model load before the request
    if cold["returncode"] != 0:
        row["error"] = f"exit {cold['returncode']}: {cold['stderr_tail']}"
    row["note"] = "FP8 + compile (the serving default, no CUDA graphs); the compile happens inside the first request"
    return [row], None


STAGES = {1: stage_probe, **{n: functools.partial(stage_e2e, n=n) for n in E2E_PLAN}, 6: stage_memory,
          7: stage_cold_start}


# --------------------------------------------------------------------------------------------- results
def gpu_slug() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def results_path(out: Path, slug: str, date: str) -> Path:
    return Path(out) / f"gpu_{slug}_{date}.json"


def header(ctx: Ctx) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not ctx.dry
    return {"schema": SCHEMA_VERSION, "gpu": torch.cuda.get_device_name(0) if cuda else device_name("cpu"),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "dry_run": ctx.dry, "model": ctx.model,
            "rows": []}


def validate(doc: dict) -> list[str]:
    """Schema problems in a results document (empty when valid)."""
    problems = [f"missing top-level {k!r}" for k in TOP_FIELDS if k not in doc]
    if doc.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA_VERSION}")
    for i, row in enumerate(doc.get("rows", [])):
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing:
            problems.append(f"row {i}: missing {missing}")
        if not isinstance(row.get("stage"), int) or not 1 <= row["stage"] <= 7:
            problems.append(f"row {i}: stage {row.get('stage')!r}")
        for k in ROW_FIELDS[3:]:
            if row.get(k) is not None and not isinstance(row[k], (int, float)):
                problems.append(f"row {i}: {k} is {type(row[k]).__name__}")
    return problems


def add_vs_diffusers(rows: list[dict]) -> None:
    """diffusers' total / ours without the MP4 encode, per preset (the latest diffusers row of that preset)."""
    base = {}
    for r in rows:
        if r["config"] == "diffusers" and r.get("total_s"):
            base[r["preset"]] = r["total_s"]
    for r in rows:
        ours = (r.get("total_s") or 0) - (r.get("mp4") or 0)
        r["vs_diffusers"] = base[r["preset"]] / ours if r["preset"] in base and ours > 0 and not r.get("error") else None


def _fmt(v, digits=2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.{digits}f}"
    return str(v)


def markdown(doc: dict) -> str:
    lines = [f"GPU proof: {doc['gpu']}, torch {doc['torch']}, CUDA {doc['cuda']}, cuDNN {doc['cudnn']}, "
             f"model {doc.get('model')}{' (dry run)' if doc.get('dry_run') else ''}", "",
             "| stage | preset | config | total s | text | VAE enc | high | low | VAE dec | MP4 | loop TFLOP/s | "
             "% BF16 peak | % FP8 peak | warm-up s | peak alloc GB | peak reserved GB | vs diffusers | latent cos | PSNR dB |",
             "|" + "---|" * 19]
    for r in doc["rows"]:
        if r.get("error"):
            error = " ".join(r["error"].split())[:120].replace("|", "/")
            lines.append(f"| {r['stage']} | {r['preset']} | {r['config']} | error: {error} |"
                         + " |" * 15)
            continue
        vs = r.get("vs_diffusers")
        config = r["config"] + (" (opt-in)" if r.get("opt_in") else "")
        cells = [r["stage"], r["preset"], config, _fmt(r["total_s"]), _fmt(r["text"]), _fmt(r["vae_encode"]),
                 _fmt(r["denoise_high"]), _fmt(r["denoise_low"]), _fmt(r["vae_decode"]), _fmt(r["mp4"]),
                 _fmt(r["loop_tflops"], 1), _fmt(r["pct_bf16_peak"], 1), _fmt(r["pct_fp8_peak"], 1),
                 _fmt(r["warmup_s"], 1), _fmt(r["peak_allocated_gb"], 1), _fmt(r["peak_reserved_gb"], 1),
                 "" if vs is None else f"{vs:.2f}x", _fmt(r["latent_cos"], 5), _fmt(r["psnr_db"], 1)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    probe = doc.get("probe")
    if probe and probe.get("sdpa"):
        lines += ["", f"SDPA default for B=2, 40 heads, 33,600 tokens, head dim 128 (bf16): "
                      f"**{probe['sdpa_default']['backend']}**", ""]
        lines += [f"- {k}: " + (f"{v['ms']:.1f} ms, {v['tflops']:.0f} TFLOP/s" if "ms" in v else v["error"])
                  + (f", PSNR {v['psnr_db']:.1f} dB vs BF16 (gate {v['gate_db']:.0f} dB)" if "psnr_db" in v else "")
                  for k, v in probe["sdpa"].items()]
    if probe and probe.get("attention"):
        a = probe["attention"]
        usable = ", ".join(k for k, v in a["kernels"].items() if v["available"])
        lines += ["", f"Attention report ({a['device']}): PyTorch picks **{a['chosen']}** (can run: {usable}); "
                      f"attn=auto -> {a['auto']['kernel']} ({a['auto']['reason']}); cudnn_fp8: {a['cudnn_fp8']}"]
    if probe and probe.get("fp8_linear"):
        f = probe["fp8_linear"]
        lines += ["", f"FFN linear 33,600x5120 @ 5120x13824: BF16 {f['bf16']['tflops']:.0f} TFLOP/s"
                  + (f", FP8 scaled_mm {f['fp8_scaled_mm']['tflops']:.0f} TFLOP/s ({f['fp8_scaled_mm']['speedup']:.2f}x), "
                     f"Fp8Linear {f['fp8_linear_module']['speedup']:.2f}x" if "fp8_scaled_mm" in f else f", FP8: {f.get('fp8_error')}")
             + (f", torchao {f['torchao']['speedup']:.2f}x" if "speedup" in f.get("torchao", {}) else "")]
    vae = (probe or {}).get("vae")
    if vae and "psnr_db" in vae:
        size = vae["size"]
        lines += ["", f"VAE decode ({vae['model']}{'' if vae['real_weights'] else ', random weights'}, "
                      f"{size['width']}x{size['height']}x{size['frames']}): bf16 vs fp32 frame PSNR "
                      + ", ".join(f"{k} {v:.1f} dB" for k, v in vae["psnr_db"].items())
                      + f" (gate {vae['gate_db']:.0f} dB: {'passes' if vae['passes'] else 'fails'}); decode s "
                      + ", ".join(f"{k} {v:.2f}" for k, v in vae["decode_s"].items())]
    elif vae:
        lines += ["", f"VAE decode ({vae['model']}): {vae.get('error')}"]
    if probe and probe.get("pytest_gpu"):
        lines += ["", f"pytest -m gpu: {probe['pytest_gpu'].get('summary')}"]
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["rows"] if r.get("total_s") and not r.get("error")]
    if not ok:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(ok) + 1.5))
    ax.barh([f"{r['stage']} {r['preset']}: {r['config']}" for r in ok], [r["total_s"] for r in ok])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"wanrt GPU proof, {doc['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def replace_block(text: str, block: str) -> str | None:
    """`text` with what lies between README_START and README_END replaced by `block`; the rest unchanged.
    None when the markers are missing."""
    start = text.find(README_START)
    end = text.find(README_END, start) if start >= 0 else -1
    if end < 0:
        return None
    return text[:start + len(README_START)] + "\n" + block.strip("\n") + "\n" + text[end:]


def readme_block(doc: dict, path: Path, readme: Path, charted: bool) -> str:
    """The README's GPU block: the table and notes of markdown(), linked to the JSON, and the chart."""
    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), readme.resolve().parent)).as_posix()

    lines = [f"Measured by `python benchmarks/gpu_proof.py`, regenerated from [{path.name}]({rel(path)}) after each "
             "stage:", "", markdown(doc).rstrip("\n")]
    if charted:
        lines += ["", f"![GPU proof: seconds per row]({rel(path.with_suffix('.png'))})"]
    return "\n".join(lines)


def update_readme(src: Path, dst: Path, block: str) -> bool:
    """Write `src` to `dst` with its GPU block replaced (bytes outside the markers unchanged); False, and
    nothing written, when `src` has no markers."""
    text = replace_block(src.read_bytes().decode("utf-8"), block)
    if text is None:
        print(f"{src} has no {README_START} ... {README_END} block: README not updated", file=sys.stderr)
        return False
    dst.write_bytes(text.encode("utf-8"))
    return True


def write_results(path: Path, doc: dict, readme: Path | None = None, readme_src: Path | None = None) -> None:
    """The JSON, then what is regenerated from it: the .md table, the .png chart and the README block
    (`readme`, rewritten from `readme_src`, default `readme` itself)."""
    add_vs_diffusers(doc["rows"])
    problems = validate(doc)
    if problems:
        raise ValueError("results do not match the schema: " + "; ".join(problems))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(doc))
    charted = chart(doc, path.with_suffix(".png"))
    if readme is not None:
        update_readme(readme_src or readme, readme, readme_block(doc, path, readme, charted))


def run_stage(ctx: Ctx, n: int) -> Path:
    path = results_path(ctx.out, gpu_slug() if not ctx.dry else "cpu", ctx.date)
    t0 = time.perf_counter()
    rows, probe = STAGES[n](ctx)
    doc = json.loads(path.read_text()) if path.is_file() else header(ctx)
    doc["rows"] = [r for r in doc["rows"] if r["stage"] != n] + rows  # a stage run again replaces its rows
    if probe is not None:
        doc["probe"] = probe
    write_results(path, doc, ctx.readme, ctx.readme_src)
    print(f"stage {n} ({STAGE_NAMES[n]}): {len(rows)} rows in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------- orchestration
def wheelhouse_packages(makefile: Path = ROOT / "Makefile") -> list[str]:
    """The Makefile's WHEELHOUSE_PKGS (`name` or `name==version`): what `make wheelhouse` downloads."""
    for line in makefile.read_text().splitlines():
        if line.startswith("WHEELHOUSE_PKGS"):
            return line.split("=", 1)[1].split()
    raise ValueError(f"no WHEELHOUSE_PKGS in {makefile}")


def missing_wheels(files: list[Path], wanted: list[str]) -> list[str]:
    """The packages of `wanted` (`name` or `name==version`) that none of these wheel files is."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    have = {(norm(p.name.split("-")[0]), p.name.split("-")[1]) for p in files}
    missing = []
    for spec in wanted:
        name, _, version = spec.partition("==")
        if not any(n == norm(name) and version in ("", v) for n, v in have):
            missing.append(spec)
    return missing


def install_wheels(wheels: Path, site: Path) -> None:
    """Every wheel in `wheels` (what `make wheelhouse` put there) into `site`; refuses a wheelhouse that lacks
    one of the Makefile's packages or wanrt (made before a package or a pin was added)."""
    files = sorted(Path(wheels).glob("*.whl"))
    if not files:
        raise SystemExit(f"no wheels in {wheels}: run `make wheelhouse` where pip can reach PyPI, copy wheels/ here")
    missing = missing_wheels(files, [*wheelhouse_packages(), "wanrt"])
    if missing:
        raise SystemExit(f"{wheels} lacks {', '.join(missing)}: run `make wheelhouse` again, copy wheels/ here")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", str(site), *map(str, files)]
    subprocess.run(cmd, check=True)
    print(f"installed {len(files)} wheels into {site}", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=sorted(STAGES), help="run this stage here (no install)")
    ap.add_argument("--stages", default="1,2,3,4,5,6,7", help="stages the orchestrator runs, in order")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: plumbing and schema")
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(HERE.parent / "results"))
    ap.add_argument("--wheels", default=str(ROOT / "wheels"))
    ap.add_argument("--site", default="/tmp/wanrt_gpu_proof_site", help="where the wheels are installed")
    ap.add_argument("--no-install", action="store_true", help="use the packages already importable")
    ap.add_argument("--stage-timeout", type=float, default=STAGE_TIMEOUT_S)
    ap.add_argument("--date", default=datetime.date.today().strftime("%Y%m%d"), help="the results file's date")
    ap.add_argument("--readme", default=None,
                    help="the README whose GPU block is rewritten (default: README.md; a dry run: a copy in --out)")
    ap.add_argument("--vae-model", default=None,
                    help="stage 1's VAE PSNR on this model (default --model): a diffusers dir gives the real figure")
    ap.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)  # internal: stage 6's compiled row, here
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    if args.memory_row:
        import torch

        row, latents = compiled_offload_row(Ctx(args))
        if latents is not None:
            torch.save(latents, Path(args.memory_row) / "latents.pt")
        (Path(args.memory_row) / "row.json").write_text(json.dumps(row, default=str))
        return 0
    if args.stage:
        run_stage(Ctx(args), args.stage)
        return 0

    env = dict(os.environ)
    if not (args.dry_run or args.no_install):
        install_wheels(Path(args.wheels), Path(args.site))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.site, env.get("PYTHONPATH")) if p)
    failed = []
    for n in (int(s) for s in args.stages.split(",")):
        cmd = [sys.executable, str(HERE), "--stage", str(n), "--out", args.out, "--model", args.model,
               "--device", args.device, "--date", args.date] + (["--dry-run"] if args.dry_run else [])
        cmd += [f"--{k.replace('_', '-')}={v}" for k in ("readme", "vae_model") if (v := getattr(args, k))]
        print(f"== stage {n}: {STAGE_NAMES[n]}", flush=True)
        try:
            r = subprocess.run(cmd, env=env, timeout=args.stage_timeout)
            if r.returncode != 0:
                failed.append(f"{n} (exit {r.returncode})")
        except subprocess.TimeoutExpired:
            failed.append(f"{n} (timed out after {args.stage_timeout:.0f} s)")
    path = results_path(Path(args.out), "cpu" if args.dry_run else _slug_in(env), args.date)
    if path.is_file():
        print(path.with_suffix(".md").read_text())
        print(f"results: {path}")
    if failed:
        print(f"stages that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _slug_in(env: dict) -> str:
    """The results file's GPU slug, asked in the stages' environment (this process may lack CUDA's torch)."""
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE.parent)!r}); "
                        "import gpu_proof; print(gpu_proof.gpu_slug())"], env=env, capture_output=True, text=True)
    return r.stdout.strip() or "cpu"


if __name__ == "__main__":
    sys.exit(main())

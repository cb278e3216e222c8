#!/usr/bin/env python3
"""The GPU proof: on a CUDA host that brings its own torch, install our wheels offline and measure what the README
claims about full-size WAN 2.2 I2V A14B (random weights), one unit of work per process, within a budget that fits
one device command (10 minutes), every row written to the JSON the moment it completes.

    make wheelhouse                                        # where pip has network: wheels/ (< 64 MiB with the tree)
    python benchmarks/gpu_proof.py --plan                  # the 15-minute session below
    python benchmarks/gpu_proof.py --step A --copy-to $OUT # on the GPU host: one step (= make gpu-proof STEP=A)
    python benchmarks/gpu_proof.py --stages 5 --configs eager --budget-s 300   # any units, any budget
    python benchmarks/gpu_proof.py --render benchmarks/results/gpu_<gpu>_<date>.json .wanrt/returned/*.json
    python benchmarks/gpu_proof.py --dry-run --out /tmp/proof   # CPU, tiny model: plumbing and schema

The 15-minute device session, what is still unmeasured first (each step is one `run` call; est_s: the units'
seconds on an H200 where they ran, else a guess):

{plan}

Units (--configs names them, within --stages; the reference row of a preset always runs first in its stage):
  1 probe (probe-lite: versions; the attention report (wanrt.runtime.attention.kernel_report) for Wan's
    self-attention (B=2, 40 heads, head dim 128, 33,600 tokens, bf16) and flash / cuDNN / efficient / cuDNN FP8
    timings (FP8: per-tensor scales, quantisation included, with its PSNR against BF16 attention); one FFN-shaped
    linear (33,600x5120 @ 5120x13824) in BF16 vs FP8 (torch._scaled_mm, row-wise scales; our Fp8Linear,
    activation quantisation included; torchao); the VAE decode's bf16 vs fp32 frame PSNR only with --vae-model
    (real weights: random-full's VAE proves nothing), one repeat); `pytest` (optional, named alone: pytest -m gpu)
  2 default preset: eager (BF16; writes the reference latents and frames), diffusers (BF16)
  3 default preset, the headline: +fp8 +compile, the serving default (Settings: no CUDA graphs, no autotune)
  4 default preset: bf16 +compile (the serving default with --no-fp8)
  5 fast preset (4 steps, cfg 1): eager (its reference), diffusers, +fp8 +compile
  6 memory modes, default preset: `eager`: resident vs offload (one expert at a time) on one loaded model (the
    resident row is stage 2's eager row when that row and its reference are here: the same request on the same
    backend, not run again); `compiled`: FP8 + compile under offload as the runtime builds it (build_runtime):
    seconds per swap, peak memory, the plan's prediction, latents against the eager reference
  7 cold start: a fresh `wanrt generate` process (backend auto: FP8 + compile) to its first MP4 (compile
    included), with Inductor's and Triton's caches in empty directories; then a restart on the caches it left
  8 opt-in rows, default preset: +fp8 +compile +cudagraphs; +fp8(torchao) +compile (left out where torchao
    cannot run: the row's process says why)
Rows of stages 2-5 and 8 are bench_e2e rows: one warm-up request of 2 steps at the row's size, frames and
guidance (both experts at the batch sizes the timed run uses: compiles included), then the timed request; the
guard compares the timed request's own frames. Every unit runs in a process of its own (this process never
touches CUDA: the GPU's name comes from NVML, the CUDA stack's versions from a one-off process), in its own
process group, killed as a group when its time is up: min(--row-timeout, what is left of --budget-s). A row that
ran before its preset's reference leaves its latents and frames pending; they are compared (backfilled) when the
reference comes.

Results: .wanrt/proof/gpu_<gpu>_<yyyymmdd>.json (--out; git-ignored, kept between commands while the machine stays
warm), rewritten after every unit with what is regenerated from it: a README-ready table (.md, same name), a chart
(.png, when matplotlib imports) and a copy of README.md with the block between <!-- gpu-proof:start --> and
<!-- gpu-proof:end --> regenerated (README.md in --out; the source is always the checkout's README.md). --copy-to
DIR copies the JSON, .md, .png, README.md and proof.log (each unit's log tail) there after every unit: pass $OUT.
The reference latents and frames (.wanrt/proof/ref, ~108 MB at the default preset) never leave the machine.
--render regenerates all of it here from returned JSONs, README.md included (--readme PATH to write another file).
Schema (version 2):
  top level: schema (2), gpu (device name), torch, cuda (null on CPU), cudnn (null on CPU), dry_run, model,
    probe (stage 1's findings, absent until it runs; keys as they come, any of them may be missing), rows (list)
  per row: stage (int, 1-8), preset, config, total_s, text, vae_encode, denoise_high, denoise_low, vae_decode,
    mp4 (seconds per stage; mp4 is null for diffusers, whose pipeline writes no video), loop_tflops,
    pct_bf16_peak, pct_fp8_peak (of the GPU's published dense peak), warmup_s (the warm-up requests, compiles
    included; cold start: imports + load), peak_allocated_gb, peak_reserved_gb (GiB, over the timed request;
    rows measured before 2026-11-27 include the backend's build and the warm-up), vs_diffusers (the diffusers
    row's seconds / ours over the parts both measure: text + vae_encode + denoise_high + denoise_low +
    vae_decode, never the MP4 encode, which diffusers does not do and ours overlaps with the decode; only bench_e2e
    rows, stages 2-5 and 8, against the diffusers row of the same preset), latent_cos, psnr_db (vs our eager BF16
    reference of the same preset); null where not applicable or not measured. Optional extras: unit (what
    --configs selects), error, fp8_layers, load_s, setup_peak_allocated_gb and setup_peak_reserved_gb (GiB, the
    backend's build and the warm-up), swap_s, pin_s, plan_need_gb, plan_phases_gb, plan_mode,
    bit_identical, host_copies, opt_in (a configuration the server does not run unless asked), warmup_steps,
    pending (latents waiting for their preset's reference), backfilled (compared after the reference came),
    reused (a row taken from another stage's measurement), cache ("cold": empty compile caches), note.
A dry run runs every unit on the tiny model on the CPU, in this process (no wheel install; GPU-only measurements
null; compiled rows without torch.compile, which takes minutes on CPU; the cold start in a process of its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
SITE = Path(os.environ.get("WANRT_PROOF_SITE", "/tmp/wanrt_gpu_proof_site"))  # where wheels/ is installed


def import_paths(site: Path = SITE) -> list[str]:
    """What goes first on sys.path and on the children's PYTHONPATH, in order: this checkout's src/ (the code
    measured, never a wanrt installed earlier), then the offline install of wheels/ (diffusers, av, ftfy, torchao,
    ...) when it exists; the host's own packages (torch, transformers, ...) come after."""
    return [str(ROOT / "src")] + ([str(site)] if Path(site).is_dir() else [])


def use_paths(site: Path = SITE) -> None:
    for p in reversed([*import_paths(site), str(HERE.parent)]):
        while p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    importlib.invalidate_caches()


def proof_env(site: Path = SITE, env: dict | None = None) -> dict:
    """`env` (default os.environ) with import_paths(site) first on PYTHONPATH: every child imports what we do, under
    the allocator setting the server runs with."""
    env = dict(os.environ if env is None else env)
    first = import_paths(site)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
    env["PYTHONPATH"] = os.pathsep.join(first + rest)
    return bench_e2e.with_alloc_conf(env)


use_paths()  # before the imports below: a host without wanrt (and, before the install, without diffusers)

import bench_e2e  # noqa: E402
import flops as flop_model  # noqa: E402
from bench_runtime import PRESETS, device_name  # noqa: E402

SCHEMA_VERSION = 2
ROW_FIELDS = ("stage", "preset", "config", "total_s", "text", "vae_encode", "denoise_high", "denoise_low", "vae_decode",
              "mp4", "loop_tflops", "pct_bf16_peak", "pct_fp8_peak", "warmup_s", "peak_allocated_gb",
              "peak_reserved_gb", "vs_diffusers", "latent_cos", "psnr_db")
TOP_FIELDS = ("schema", "gpu", "torch", "cuda", "cudnn", "rows")
STAGE_KEYS = {"text": "text_encode_s", "vae_encode": "vae_encode_s", "denoise_high": "denoise_high_s",
              "denoise_low": "denoise_low_s", "vae_decode": "vae_decode_s", "mp4": "mp4_encode_s"}
COMPARED = tuple(k for k, src in STAGE_KEYS.items() if src in bench_e2e.COMPARED_PARTS)  # vs_diffusers' parts
VS_DIFFUSERS_STAGES = (2, 3, 4, 5, 8)  # bench_e2e rows; 6 and 7 measure other things (memory modes, a cold process)
FP8_COMPILED = "+fp8 +compile"  # the serving default (Settings: fp8 and compile on, cudagraphs and autotune off)
FP8_GRAPHS = "+fp8 +compile +cudagraphs"
BF16_COMPILED = "bf16 +compile"  # the serving default with --no-fp8
FP8_TORCHAO = "+fp8(torchao) +compile"  # fp8_impl=torchao: the same recipe, kept if it measures faster
FP8_ATTN = "+fp8 +compile +cudnn_fp8"  # attn=cudnn_fp8: FP8 self-attention, gated at 40 dB against BF16
OPT_IN = {FP8_GRAPHS, FP8_TORCHAO, FP8_ATTN}  # measured, never the headline: the server runs them only when asked
MEMORY_EAGER = ("resident", "offload")  # stage 6's `eager` unit, on one loaded model
MEMORY_COMPILED = f"offload (compiled {FP8_COMPILED})"
STREAM_CARD_GIB = 24  # stage 6's `stream24` unit: the seed's RTX 4090, emulated by capping this card's memory
MEMORY_STREAM = f"stream, {STREAM_CARD_GIB} GB card (compiled {FP8_COMPILED})"
COLD_START = "cold start"
RESTART = "restart (warm compile caches)"  # the same process again, its caches where the first one left them
VAE_MIN_PSNR_DB = 40.0  # vae_dtype=auto's gate: bf16 decode frames against fp32 (src/wanrt/runtime/vae.py)
README_START, README_END = "<!-- gpu-proof:start -->", "<!-- gpu-proof:end -->"
STAGE_NAMES = {1: "probe", 2: "default: eager + diffusers", 3: "default: FP8 + compile (the headline)",
               4: "default: BF16 + compile", 5: "fast preset", 6: "memory modes", 7: "cold start",
               8: "default: opt-in (CUDA graphs, torchao, FP8 attention)"}
DEFAULT_BUDGET_S = 540  # one device command runs 600 s at most: install, units and the last copy inside it
ROW_TIMEOUT_S = 480  # a cap on any one unit
PROBE_TIMEOUT_S = 150
PYTEST_TIMEOUT_S = 300
TEARDOWN_S = 15  # kept from the budget for the last write and copy
# A unit does not start with less of the budget left than this (full size; a dry run starts everything): it
# could only be killed, the minutes lost.
MIN_START_S = {"probe": 30, "pytest": 60, "e2e": 110, "e2e compiled": 120, "memory eager": 150,
               "memory compiled": 200, "memory stream": 240, "cold": 200}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One process's work: `name` is what --configs selects (a bench_e2e configuration for e2e units)."""
    stage: int
    preset: str  # preset key: "default" or "fast"
    name: str
    kind: str  # probe, pytest, e2e, memory eager, memory compiled, memory stream, cold
    optional: bool = False  # run only when --configs names it

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.name}"

    @property
    def min_start_s(self) -> int:
        compiled = self.kind == "e2e" and "compile" in self.name
        return MIN_START_S["e2e compiled" if compiled else self.kind]


UNITS = (  # table order; within a stage the preset's reference (eager) runs first
    Unit(1, "default", "probe", "probe"),
    Unit(1, "default", "pytest", "pytest", optional=True),
    Unit(2, "default", "diffusers", "e2e"),
    Unit(2, "default", "eager", "e2e"),
    Unit(3, "default", FP8_COMPILED, "e2e"),
    Unit(4, "default", BF16_COMPILED, "e2e"),
    Unit(5, "fast", "diffusers", "e2e"),
    Unit(5, "fast", "eager", "e2e"),
    Unit(5, "fast", FP8_COMPILED, "e2e"),
    Unit(6, "default", "eager", "memory eager"),
    Unit(6, "default", "compiled", "memory compiled"),
    Unit(6, "default", "stream24", "memory stream"),
    Unit(7, "default", COLD_START, "cold"),
    Unit(8, "default", FP8_ATTN, "e2e"),
    Unit(8, "default", FP8_TORCHAO, "e2e"),
    Unit(8, "default", FP8_GRAPHS, "e2e"),  # last: CUDA graphs compile each expert whole (minutes, unmeasured)
)
UNIT_ORDER = {(u.stage, u.name): i for i, u in enumerate(UNITS)}


@dataclasses.dataclass(frozen=True)
class Step:
    """One `run` call of the plan: `--step NAME` runs these units within budget_s."""
    name: str
    stages: tuple[int, ...]
    configs: tuple[str, ...] | None  # None: every unit of those stages but the optional ones
    budget_s: int
    est_s: int  # seconds: the units' own on an H200 (2026-11-26) where they ran, else a guess
    what: str

    @property
    def timeout_s(self) -> int:  # run's timeout_s: the budget, the interpreter's start and the last copy
        return self.budget_s + 40


PLAN = (  # what is still unmeasured first; est_s from the device sessions (H200, 2026-11-26) where it ran
    Step("A", (7, 2, 8), (COLD_START, "2:eager", FP8_TORCHAO), 480, 470,
         "cold start: `wanrt generate` (backend auto: FP8 + compile) to its first MP4 with empty compile caches "
         "(the serving path: build_runtime, the CLI, the video), then a restart on the caches it left; default "
         "eager (the reference); opt-in: torchao's FP8 + compile (left for a later step if the budget ends)"),
    Step("B", (2, 6), ("2:eager", "stream24"), 480, 400,
         "the seed's RTX 4090: default eager (the reference), then the default request on this card capped to "
         "24 GB, as build_runtime plans it (stream tier: FP8 blocks copied ahead on one copy stream, compile "
         "off; the time is a guess)"),
    Step("C", (2, 8), ("2:eager", FP8_GRAPHS), 480, 300,
         "default eager (the reference); opt-in: FP8 + compile + CUDA graphs (each expert compiled whole: the "
         "compile time is a guess)"),
    Step("D", (1, 2, 3), None, 480, 300,
         "the first session's figures on the other card (an H100 when they came from an H200): probe, eager, "
         "diffusers, the headline (FP8 + compile)"),
    Step("E", (1, 2, 8, 5), ("pytest", "eager", FP8_ATTN, FP8_COMPILED), 480, 340,
         "again, after changes to the GPU path: pytest -m gpu; default eager (the reference, 96 s) then FP8 + "
         "compile + cuDNN FP8 attention against it; fast preset: eager (its reference, 38 s) and FP8 + compile"),
    Step("F", (2, 6, 4), ("2:eager", "compiled", BF16_COMPILED), 480, 370,
         "again: default eager (the reference); memory: FP8 + compile under offload as build_runtime builds it "
         "(swap seconds, peak); default BF16 + compile (the serving default with --no-fp8)"),
)
STEPS = {s.name: s for s in PLAN}


PLAN_RULES = """\
  Each step:  run(command="python benchmarks/gpu_proof.py --step A --copy-to $OUT", carry=["wheels"],
              timeout_s=520)   (or: make gpu-proof STEP=A; COPY_TO defaults to $OUT)
  - On an H200 on 2026-11-26 (benchmarks/results/gpu_nvidia_h200_20261126.json) stages 1-6 and 8 (FP8 attention)
    ran, pytest -m gpu passing (steps E and F, then named A and B, in a second session): a machine start took
    30-60 s and the wheels install 3 s, so a 15-minute session gets two steps. Before each
    call read `status`: run a step only while budget_left_s covers its timeout_s (a fresh machine: ~1 minute
    more; none starts under 4 minutes left); with less, add --budget-s <left - 30> and timeout_s <left - 10>, or
    stop. A unit starts only with its minimum (MIN_START_S) plus 15 s left; the others are listed as not run.
  - Call the next step at once, before reading the last one's output: the machine goes back after 30 s idle. A
    fresh machine re-installs wheels/ and has lost .wanrt/proof (the JSON and the reference latents); each step
    runs its preset's eager reference before the rows compared with it.
  - After each call copy its JSON before the next: mkdir -p .wanrt/returned && cp <files_at>/gpu_*.json
    .wanrt/returned/<step>.json. Here, with no GPU: python benchmarks/gpu_proof.py --render
    benchmarks/results/gpu_<gpu>_<date>.json .wanrt/returned/*.json merges them (a later row replaces an
    earlier one of the same stage, preset and config; an error never replaces a result) and regenerates the .md
    table, the .png chart and README.md's block; commit those four.
  - A real VAE's PSNR (--vae-model DIR, with the probe) is an optional extra."""


def plan_text() -> str:
    """The plan as --plan prints it (filled into the module docstring; benchmarks/README.md carries a copy, tested)."""
    import textwrap

    lines = ["  step  stages  configs               budget_s  timeout_s  est_s  what"]
    for s in PLAN:
        what = textwrap.wrap(s.what, 48)
        configs = textwrap.wrap(", ".join(s.configs) if s.configs else "all", 21)
        for i in range(max(len(what), len(configs))):
            head = (f"  {s.name:<6}{','.join(map(str, s.stages)):<8}" if i == 0 else " " * 16)
            nums = f"{s.budget_s:<10}{s.timeout_s:<11}{s.est_s:<7}" if i == 0 else " " * 28
            cell = configs[i] if i < len(configs) else ""
            lines.append(f"{head}{cell:<22}{nums}{what[i] if i < len(what) else ''}".rstrip())
    return "\n".join(lines) + "\n\n" + PLAN_RULES


if __doc__:  # the plan as --plan prints it, written once (PLAN, PLAN_RULES); None under python -OO
    __doc__ = __doc__.replace("{plan}", plan_text())


# --------------------------------------------------------------------------------------------- context
class Ctx:
    def __init__(self, args, started: float | None = None):
        self.dry = args.dry_run
        self.model = "tiny" if self.dry else args.model
        self.device = "cpu" if self.dry else args.device
        self.out = Path(args.out)
        self.ref_dir = Path(args.ref_dir) if args.ref_dir else self.out / "ref"
        self.logs = self.out / "logs"
        self.presets = {"default": "smoke", "fast": "smoke_fast"} if self.dry else {"default": "default", "fast": "fast"}
        if args.presets:  # e.g. default=cli_min: the plumbing at full model size in seconds, not a figure
            self.presets |= dict(kv.split("=", 1) for kv in args.presets.split(","))
        self.repeats, self.warmup = 1, 1
        self.date = args.date
        self.vae_model = "tiny" if self.dry else args.vae_model
        self.site = Path(args.site)
        self.env = proof_env(self.site)
        self.copy_to = Path(args.copy_to) if args.copy_to else None
        self.readme = Path(args.readme) if args.readme else self.out / "README.md"  # a copy: never the tracked one
        started = time.monotonic() if started is None else started
        self.deadline = started + args.budget_s if args.budget_s else None
        self.row_cap = args.row_timeout
        self.path: Path | None = None  # the results JSON, once the GPU's name is known
        self.info: dict | None = None  # the header's GPU and CUDA stack, asked once

    def left_s(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic() - TEARDOWN_S

    def log(self, unit: Unit) -> Path:
        return self.logs / (re.sub(r"[^A-Za-z0-9]+", "_", unit.key).strip("_") + ".log")


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
    for extra in ("error", "fp8_layers", "load_s", "warmup_steps", "pending"):
        if e2e.get(extra) is not None:
            row[extra] = e2e[extra]
    fallbacks = (e2e.get("describe") or {}).get("fallbacks")
    if fallbacks and not row.get("error"):  # a compiled label over eager seconds would be a false figure
        row["error"] = f"{fallbacks} shape bucket(s) ran eagerly (compiler failure or recompile limit)"
    if e2e.get("setup_peak_memory_gb") is not None:
        row.update(setup_peak_allocated_gb=e2e["setup_peak_memory_gb"], setup_peak_reserved_gb=e2e["setup_peak_reserved_gb"])
    if e2e.get("config") in OPT_IN:
        row["opt_in"] = True
    if dry and "compile" in (e2e.get("config") or ""):
        row["note"] = "dry run: torch.compile off" + (" (and CUDA graphs)" if "cudagraphs" in e2e["config"] else "")
    return row


# --------------------------------------------------------------------------------------------- units
def run_unit(ctx: Ctx, unit: Unit, timeout: float, doc: dict) -> tuple[list[dict], dict | None]:
    """(rows, probe findings or None) of one unit: in a process of its own on the GPU (its process group killed at
    `timeout`), in this one in a dry run (the cold start always in its own)."""
    preset = ctx.presets[unit.preset]
    if unit.kind == "e2e":
        if ctx.dry:
            e2e = bench_e2e.run_row(ctx.model, ctx.device, preset, unit.name, ctx.repeats, ctx.warmup, ctx.ref_dir,
                                    compile_off=True)
        else:
            e2e = bench_e2e.spawn_row(ctx.model, ctx.device, preset, unit.name, ctx.repeats, ctx.warmup, ctx.ref_dir,
                                      timeout=timeout, env=ctx.env, log=ctx.log(unit))
        if e2e.get("skipped"):
            print(f"  left out: {e2e['skipped']}", file=sys.stderr, flush=True)
            return [], None
        return [from_e2e(unit.stage, e2e, ctx.dry)], None
    if unit.kind == "cold":
        return cold_start_rows(ctx, timeout, unit), None
    if unit.kind == "pytest":
        return [], {"pytest_gpu": _pytest_gpu(ctx, timeout, unit)}
    reused = _stage2_eager(doc, preset) if unit.kind == "memory eager" else None
    reuse = reused is not None and bench_e2e.reference_path(ctx.ref_dir, ctx.model, preset).is_file()
    if ctx.dry:
        rows, probe = unit_here(ctx, unit, reuse)
    else:
        rows, probe = _spawn_unit(ctx, unit, timeout, reuse)
    for row in rows:
        if row.get("reused"):
            _fill_from(row, reused)
    return rows, probe


def unit_here(ctx: Ctx, unit: Unit, reuse: bool = False) -> tuple[list[dict], dict | None]:
    """A probe or memory unit in this process."""
    if unit.kind == "probe":
        return [], stage_probe(ctx)
    if unit.kind == "memory eager":
        return memory_eager_rows(ctx, reuse), None
    if unit.kind == "memory compiled":
        return [compiled_tier_row(ctx)], None
    if unit.kind == "memory stream":
        return [compiled_tier_row(ctx, "stream", STREAM_CARD_GIB)], None
    raise ValueError(f"unit {unit.key} does not run in a unit process")


def _spawn_unit(ctx: Ctx, unit: Unit, timeout: float, reuse: bool) -> tuple[list[dict], dict | None]:
    """unit_here in a fresh process of this script (`--unit`): rows and probe come back as a file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "unit.json"
        cmd = [sys.executable, str(HERE), "--unit", unit.key, "--unit-out", str(out), "--out", str(ctx.out),
               "--ref-dir", str(ctx.ref_dir), "--model", ctx.model, "--device", ctx.device, "--date", ctx.date,
               "--site", str(ctx.site)]
        cmd += (["--vae-model", ctx.vae_model] if ctx.vae_model else []) + (["--reuse-resident"] if reuse else [])
        cmd += ["--presets", ",".join(f"{k}={v}" for k, v in ctx.presets.items())]
        rc, _, err = bench_e2e.run_group(cmd, timeout, ctx.env, ctx.log(unit))
        if rc == 0 and out.is_file():
            got = json.loads(out.read_text())
            return got["rows"], got.get("probe")
        why = f"killed after {timeout:.0f} s (its process group)" if rc is None else f"unit process exited {rc}"
    if unit.kind == "probe":
        return [], {"error": f"{why}: {err[-600:]}"}
    config = {"memory eager": "offload (eager)", "memory compiled": MEMORY_COMPILED,
              "memory stream": MEMORY_STREAM}[unit.kind]
    return [empty_row(unit.stage, ctx.presets[unit.preset], config) | {"error": f"{why}: {err[-600:]}"}], None


def _stage2_eager(doc: dict, preset: str) -> dict | None:
    return next((r for r in doc["rows"] if r["stage"] == 2 and r["preset"] == preset and r["config"] == "eager"
                 and not r.get("error")), None)


def _fill_from(row: dict, src: dict) -> None:
    """The resident row from stage 2's eager row: the same request on the same backend, measured there."""
    for k in ("total_s", *STAGE_KEYS, "loop_tflops", "pct_bf16_peak", "pct_fp8_peak", "warmup_s", "peak_allocated_gb",
              "peak_reserved_gb", "latent_cos", "psnr_db"):
        row[k] = src.get(k)
    row["bit_identical"] = True  # stage 2's eager row wrote the reference
    row["note"] = "stage 2's eager row (the same request on the same backend), not run again"


def stage_probe(ctx: Ctx) -> dict:
    import torch

    from wanrt.runtime import attention

    probe = {"python": sys.version.split()[0], "versions": _versions(), "wanrt_path": _wanrt_path(), "error": None}
    if ctx.dry or not torch.cuda.is_available():
        # the report's plumbing at Wan's shapes on the CPU (allocated, never written: no pages touched)
        probe.update(attention=attention.kernel_report(**attention.WAN_SELF_ATTENTION, device="cpu"),
                     sdpa_default=None, sdpa=None, fp8_linear=None, vae=_probe_vae(ctx), note="dry run: no GPU")
        return probe
    dev = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(dev)
    probe["device"] = {"name": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
                       "memory_total_gib": total / 2**30, "memory_free_gib": free / 2**30}
    probe["attention"] = attention.kernel_report(**attention.WAN_SELF_ATTENTION, device=dev)
    probe["sdpa_default"], probe["sdpa"] = _probe_sdpa(dev)
    probe["fp8_linear"] = _probe_fp8_linear(dev)
    probe["vae"] = _probe_vae(ctx)
    return probe


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "torchao", "nvidia-cudnn-frontend", "av", "ftfy",
                 "numpy"):
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
    """BF16, torch._scaled_mm, Fp8Linear and torchao on the FFN's up projection; each part stored as it finishes
    (a part that raises leaves {"error": ...} and the others stand)."""
    import torch

    M, K, N = 33_600, 5120, 13_824
    flop = 2 * M * K * N
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    lin = torch.nn.Linear(K, N, bias=True, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    out = {"shape": [M, K, N]}

    def timed(fn) -> dict:
        s = _cuda_time(fn, warmup=3, reps=10)
        return {"ms": s * 1e3, "tflops": flop / s / 1e12, "speedup": out["bf16"]["ms"] / (s * 1e3)}

    with torch.inference_mode():
        y_ref = lin(x)
        s = _cuda_time(lambda: lin(x), warmup=3, reps=10)
        out["bf16"] = {"ms": s * 1e3, "tflops": flop / s / 1e12}
        try:
            from wanrt.engine_build.quantize import quantize_weight
            from wanrt.runtime.fp8 import Fp8Linear

            wq, ws = quantize_weight(lin.weight, "channel")
            wq, ws = wq.to(dev), ws.to(dev, torch.float32)
            xq, xs = Fp8Linear.quantize_activation(x)

            def mm():
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

            out["fp8_scaled_mm"] = timed(mm) | {"cosine": torch.nn.functional.cosine_similarity(
                mm().float().flatten(), (y_ref - lin.bias).float().flatten(), dim=0).item()}
        except Exception as e:
            out["fp8_scaled_mm"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        try:
            from wanrt.runtime.fp8 import Fp8Linear

            fp8 = Fp8Linear(lin, emulate=False)
            out["fp8_linear_module"] = timed(lambda: fp8(x)) | {"note": "activation quantisation + scaled_mm + bias"}
        except Exception as e:
            out["fp8_linear_module"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
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
    """benchmarks/bench_vae.py on --vae-model, one repeat: decode seconds in fp32 and bf16 (on CUDA also bf16
    without channels_last_3d) and each one's frame PSNR against fp32, the figure vae_dtype=auto is gated on. Only
    real weights give that figure: without --vae-model (or with random-full) nothing is decoded."""
    if ctx.vae_model in (None, "random-full"):
        return {"skipped": "no --vae-model with real weights: a random VAE's PSNR proves nothing"}
    import bench_vae

    out = ctx.out / f"vae_{Path(ctx.vae_model).name}_{ctx.device}_{ctx.date}.json"
    argv = ["--model", ctx.vae_model, "--device", ctx.device, "--out", str(out), "--repeats", "1"]
    if ctx.dry:  # seconds on two cores; 128x128x17 gives about the same PSNR
        argv += ["--width", "64", "--height", "64", "--frames", "9"]
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


def _pytest_gpu(ctx: Ctx, timeout: float, unit: Unit) -> dict:
    """`pytest -m gpu` on the test files that carry GPU tests (the others need the CPU suite's extras)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-m", "gpu", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    log = ctx.log(unit)
    rc, stdout, _ = bench_e2e.run_group(cmd, timeout, ctx.env, log, cwd=ROOT)
    with open(log, "a") as f:  # the report is on stdout; stderr (in the log already) ends in cuDNN's exit noise
        f.write(stdout[-20_000:])
    outcome = pytest_outcome(stdout)
    if rc is None:
        outcome["summary"] = f"killed after {timeout:.0f} s"
    return {"files": files, "returncode": rc, **outcome, "seconds": time.perf_counter() - t0}


def pytest_outcome(stdout: str) -> dict:
    """pytest's own summary line ("2 failed, 14 passed, 3 skipped in 45.1s"), its FAILED/ERROR lines (-rfE) and the
    report's tail, from its stdout alone: a last line of stdout+stderr can be a library's exit message (the first
    device run kept nanobind's leak report from cudnn-frontend as the summary, and lost which tests failed)."""
    lines = stdout.strip().splitlines()
    counts = [ln.strip(" =") for ln in lines if _PYTEST_COUNTS.search(ln)]
    failed = [ln[:300] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return {"summary": counts[-1] if counts else (lines[-1] if lines else ""), "failed": failed[:40],
            "tail": "\n".join(lines[-30:])}


_PYTEST_COUNTS = re.compile(r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s")


def memory_eager_rows(ctx: Ctx, reuse: bool = False) -> list[dict]:
    """Eager BF16 resident vs offload on one loaded model (the same request, timed and measured). reuse: stage 2's
    eager row measured resident already (its reference is here): the resident row gets the plan only, the run
    is not repeated. A resident run writes the preset's reference when there is none (latents only)."""
    import torch

    from wanrt.config import Settings
    from wanrt.model.loading import load_model
    from wanrt.runtime import gpus
    from wanrt.runtime.backends.eager import EagerBackend
    from wanrt.runtime.memory import ExpertSwapper, OffloadingBackend, estimate_plan
    from wanrt.runtime.pipeline import WanI2VPipeline

    settings = Settings(model=ctx.model, device=ctx.device)
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    cuda = device.startswith("cuda")
    dtype_name = str(dtype).replace("torch.", "")
    preset = ctx.presets["default"]
    model = load_model(ctx.model, device, dtype)
    rows = []
    for mode in MEMORY_EAGER:
        row = empty_row(6, preset, f"{mode} (eager {dtype_name})")
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
                # planned for the card as a fresh worker sees it (the first run passed the memory left beside the
                # loaded model, so the plan streamed the text encoder that this measurement keeps resident)
                card = torch.cuda.mem_get_info()[1] - gpus.CUDA_CONTEXT_BYTES
                plan = estimate_plan(ctx.model, device, dtype, mode, free_bytes=card)
                row["plan_text_encoder"] = plan.options.text_encoder
                row["plan_need_gb"] = plan.need_bytes / 2**30
                row["plan_phases_gb"] = {k: round(v / 2**30, 2) for k, v in plan.phases.items()}
            row["plan_mode"] = mode
            if mode == "resident" and reuse:
                row["reused"] = "stage 2: eager"
                rows.append(row)
                continue
            pipe = WanI2VPipeline(model, backend, device=device, dtype=dtype)
            # a warm-up request first (the offload one leaves the steady state: the first expert prefetched)
            latents = _measure(ctx, row, pipe, swapper, 1 if ctx.dry else 2)
            ref = bench_e2e.reference_path(ctx.ref_dir, ctx.model, preset)
            if mode == "resident" and bench_e2e.guard_against(ref, PRESETS[preset], latents) is None:
                ref.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"latents": latents, "frames": None, "params": PRESETS[preset], "device": device}, ref)
            _guard(ctx, row, latents)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def compiled_tier_row(ctx: Ctx, tier: str = "offload", card_gib: int | None = None) -> dict:
    """The serving default's backend (compiled: FP8 + compile) under memory=`tier`, built by build_runtime as
    the worker builds it (the model loads on the host, each linear is quantised on the device, the tier's
    swapper or block streams pin the FP8 experts): offload is the path that used to crash. card_gib: this card
    capped to that much (torch.cuda.set_per_process_memory_fraction) and planned for it, as on the seed's 4090
    (stream: blocks copied a few ahead on the shared copy stream, compile off; host RAM not capped). This unit
    runs in a process of its own on the GPU: the cap ends with it."""
    import torch

    from wanrt.config import Settings
    from wanrt.runtime import gpus
    from wanrt.runtime.factory import build_runtime

    settings = Settings(model=ctx.model, device=ctx.device, backend="compiled", memory=tier, compile=not ctx.dry)
    row = empty_row(6, ctx.presets["default"], MEMORY_COMPILED if card_gib is None else MEMORY_STREAM)
    try:
        free_bytes = None
        if card_gib is not None and torch.device(ctx.device).type == "cuda":
            total = torch.cuda.get_device_properties(torch.device(ctx.device)).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, card_gib * gpus.GiB / total))
            free_bytes = card_gib * gpus.GiB - gpus.CUDA_CONTEXT_BYTES
            row["card_gib"] = card_gib
        t0 = time.perf_counter()
        pipe = build_runtime(settings, free_bytes=free_bytes)
        row["load_s"] = time.perf_counter() - t0  # host load + per-layer FP8 quantisation + pinned host copies
        backend = pipe.backend
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["plan_need_gb"] = backend.plan.need_bytes / 2**30
            row["plan_phases_gb"] = {k: round(v / 2**30, 2) for k, v in backend.plan.phases.items()}
        row["plan_mode"] = "offload" if backend.tier == "swap" else backend.tier
        if backend.tier == "stream":
            row["plan_options"] = dict(vars(backend.plan.options))  # what the 24 GB plan gave up
        row["fp8_layers"] = bench_e2e.fp8_layer_count(*pipe.model.experts.values(),
                                                      *getattr(backend.inner, "experts", {}).values())
        # the first (warm-up) request compiles (and swaps); the second is the steady state
        _guard(ctx, row, _measure(ctx, row, pipe, getattr(backend, "swapper", None), 1 if ctx.dry else 2))
        if ctx.dry:
            row["note"] = "dry run: torch.compile off"
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def _guard(ctx: Ctx, row: dict, latents) -> None:
    """latent_cos and bit_identical against the preset's reference; without one, the latents are left pending."""
    import torch

    preset = row["preset"]
    ref = bench_e2e.reference_path(ctx.ref_dir, ctx.model, preset)
    guard = bench_e2e.guard_against(ref, PRESETS[preset], latents)
    if guard is None:
        pending = bench_e2e.pending_path(ctx.ref_dir, ctx.model, preset, row["config"])
        pending.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"latents": latents, "frames": None, "params": PRESETS[preset]}, pending)
        row["pending"] = str(pending)
        return
    row["latent_cos"], row["bit_identical"] = guard["latent_cosine"], guard["bit_identical"]


def _measure(ctx: Ctx, row: dict, pipe, swapper, requests: int):
    """`requests` requests on `pipe`, the last one the default preset's and timed (the ones before it are the
    warm-up, of bench_e2e.WARMUP_STEPS steps): stage seconds, peak memory since the caller's reset, the loop's
    TFLOP/s and one synchronised swap of each expert. Returns the last request's latents (float32, CPU)."""
    import torch
    from PIL import Image

    from wanrt.params import GenerateParams

    preset = ctx.presets["default"]
    params = GenerateParams(prompt=bench_e2e.PROMPT, **PRESETS[preset])
    warm = GenerateParams(prompt=bench_e2e.PROMPT,
                          **bench_e2e.warmup_params(PRESETS[preset], pipe.model.boundary_ratio))
    image = Image.open(bench_e2e.IMAGE)
    video = ctx.out / "memory.mp4"
    t_warm = time.perf_counter()
    for i in range(requests):
        if i == requests - 1:
            row["warmup_s"] = time.perf_counter() - t_warm
        result = pipe.generate(params if i == requests - 1 else warm, image, video, keep_latents=True)
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


def _peak_pct(row: dict, device: str) -> None:
    name = device_name(device)
    key = next((v for k, v in bench_e2e.GPU_PEAK_KEYS.items() if k in name), None)
    if key and row.get("loop_tflops"):
        peaks = flop_model.PEAKS_TFLOPS[key]
        row["pct_bf16_peak"] = 100 * row["loop_tflops"] / peaks["bf16"]
        row["pct_fp8_peak"] = 100 * row["loop_tflops"] / peaks["fp8"] if peaks["fp8"] else None


def cold_start_rows(ctx: Ctx, timeout: float, unit: Unit) -> list[dict]:
    """Process start to the first MP4. GPU: `wanrt generate` with the Settings defaults (backend auto: FP8 +
    compile, no CUDA graphs; the compile happens inside the first request), Inductor's and Triton's caches empty;
    then, within the unit's time, the same again on the caches it left (a restart). Dry run: a bench_e2e row
    process (eager), since the CLI refuses sizes under 256 and the tiny VAE needs ~40 s at 256x256 on two CPU
    cores."""
    preset = ctx.presets["default"]
    if ctx.dry:
        t0 = time.perf_counter()
        e2e = bench_e2e.spawn_row(ctx.model, ctx.device, preset, "eager", 1, 0, ctx.ref_dir, timeout=timeout,
                                  env=ctx.env, log=ctx.log(unit))
        row = from_e2e(7, e2e, ctx.dry)
        row.update(config=COLD_START, total_s=time.perf_counter() - t0, latent_cos=None, psnr_db=None,
                   note="dry run: a bench_e2e row process (eager) instead of the CLI")
        row.pop("pending", None)
        row["warmup_s"] = row["total_s"] - (e2e.get("median_s") or {}).get("total_s", 0.0)
        return [row]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as caches:  # what a worker's data dir holds (cache/inductor, cache/triton)
        cold = bench_e2e.cold_start(ctx.model, ctx.device, preset, timeout=timeout, env=ctx.env, cache_root=caches,
                                    log=ctx.log(unit))
        rows = [_cold_row(preset, COLD_START, cold, "`wanrt generate` with the Settings defaults (backend auto: "
                          "FP8 + compile on CUDA, no CUDA graphs), the compile inside the first request, Inductor's "
                          "and Triton's caches empty")]
        left = timeout - (time.monotonic() - t0)
        if cold["returncode"] == 0 and left > MIN_START_S["cold"] / 2:
            warm = bench_e2e.cold_start(ctx.model, ctx.device, preset, timeout=left, env=ctx.env, cache_root=caches,
                                        log=ctx.log(unit).with_suffix(".restart.log"))
            rows.append(_cold_row(preset, RESTART, warm, "the same command again with the caches the first left "
                                  "(a restarted worker: its data dir keeps them)"))
    return rows


def _cold_row(preset: str, config: str, run: dict, note: str) -> dict:
    row = empty_row(7, preset, config)
    row["total_s"] = run["seconds"]
    timings = run.get("request_timings_s") or {}
    for key, src in STAGE_KEYS.items():
        row[key] = timings.get(src)
    if timings.get("total_s") is not None:
        row["warmup_s"] = run["seconds"] - timings["total_s"]  # imports + model load before the request
    if run["returncode"] != 0:
        row["error"] = f"exit {run['returncode']}: {run['stderr_tail']}"
    row["cache"], row["note"] = run["cache"], note
    return row


# --------------------------------------------------------------------------------------------- results
def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _gpu_info(env: dict | None = None) -> dict:
    """The GPU's name and the CUDA stack, asked of a one-off process (this one keeps no CUDA context)."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'name': torch.cuda.get_device_name(0) "
            "if c else None, 'torch': torch.__version__, 'cuda': torch.version.cuda if c else None, "
            "'cudnn': torch.backends.cudnn.version() if c else None}))")
    rc, out, err = bench_e2e.run_group([sys.executable, "-c", code], 180, env)
    if rc != 0:
        raise SystemExit(f"could not read the GPU's name and the CUDA stack: {err[-500:]}")
    return json.loads(out.strip().splitlines()[-1])


def gpu_name(env: dict | None = None) -> str:
    """The GPU's name from NVML (nvidia-ml-py: no CUDA context), else from a one-off process."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
        return name.decode() if isinstance(name, bytes) else name
    except Exception:
        return _gpu_info(env).get("name") or "cpu"


def results_path(out: Path, gpu_slug: str, date: str) -> Path:
    return Path(out) / f"gpu_{gpu_slug}_{date}.json"


def header(ctx: Ctx) -> dict:
    if ctx.info is None:
        if ctx.dry:
            import torch

            ctx.info = {"name": device_name("cpu"), "torch": torch.__version__, "cuda": None, "cudnn": None}
        else:
            ctx.info = _gpu_info(ctx.env)
    info = ctx.info
    return {"schema": SCHEMA_VERSION, "gpu": info["name"], "torch": info["torch"], "cuda": info["cuda"],
            "cudnn": info["cudnn"], "dry_run": ctx.dry, "model": ctx.model, "rows": []}


def load_doc(ctx: Ctx) -> dict:
    if ctx.path.is_file():
        doc = json.loads(ctx.path.read_text())
        if doc.get("schema") == SCHEMA_VERSION:
            return doc
        old = ctx.path.with_suffix(f".schema{doc.get('schema')}.json")
        ctx.path.replace(old)
        print(f"{ctx.path} has schema {doc.get('schema')!r}: kept as {old.name}, starting a new one", file=sys.stderr)
    return header(ctx)


def validate(doc: dict) -> list[str]:
    """Schema problems in a results document (empty when valid)."""
    problems = [f"missing top-level {k!r}" for k in TOP_FIELDS if k not in doc]
    if doc.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA_VERSION}")
    for i, row in enumerate(doc.get("rows", [])):
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing:
            problems.append(f"row {i}: missing {missing}")
        if not isinstance(row.get("stage"), int) or row["stage"] not in STAGE_NAMES:
            problems.append(f"row {i}: stage {row.get('stage')!r}")
        for k in ROW_FIELDS[3:]:
            if row.get(k) is not None and not isinstance(row[k], (int, float)):
                problems.append(f"row {i}: {k} is {type(row[k]).__name__}")
    return problems


def _row_key(row: dict) -> tuple:
    return row["stage"], row["preset"], row["config"]


def upsert(doc: dict, row: dict) -> bool:
    """Put `row` in the document: it replaces the row of the same stage, preset and config, unless it is an
    error and that one is not (a failed rerun never wipes a measurement). Rows stay in table order (stage, then
    the unit's place in UNITS). False when the row was not taken."""
    rows = doc["rows"]
    i = next((i for i, r in enumerate(rows) if _row_key(r) == _row_key(row)), None)
    if i is not None and row.get("error") and not rows[i].get("error"):
        return False
    if i is None:
        rows.append(row)
    else:
        rows[i] = row
    rows.sort(key=lambda r: (r["stage"], UNIT_ORDER.get((r["stage"], r.get("unit")), len(UNIT_ORDER))))
    return True


def merge_docs(docs: list[dict]) -> dict:
    """Results documents of one GPU merged in order: later rows replace earlier ones (upsert), probe keys too."""
    doc = json.loads(json.dumps(docs[0]))
    for d in docs[1:]:
        if d.get("gpu") != doc.get("gpu") or d.get("model") != doc.get("model"):
            raise SystemExit(f"cannot merge results of {d.get('gpu')!r} / {d.get('model')!r} into "
                             f"{doc.get('gpu')!r} / {doc.get('model')!r}")
        for row in d["rows"]:
            upsert(doc, row)
        if d.get("probe"):
            doc["probe"] = {**(doc.get("probe") or {}), **d["probe"]}
        for k in ("torch", "cuda", "cudnn"):
            doc[k] = d.get(k) or doc.get(k)
    return doc


def backfill(doc: dict, ref_dir: Path) -> int:
    """Rows that ran before their preset's reference (their latents and frames left pending) compared now that
    it is here: latent_cos, psnr_db (where both have frames), bit_identical for the memory rows. Returns how many."""
    done = 0
    for row in doc["rows"]:
        pending = Path(row["pending"]) if row.get("pending") else None
        if pending is None or not pending.is_file() or row.get("error"):
            continue
        import torch

        saved = torch.load(pending, weights_only=True)
        ref = bench_e2e.reference_path(ref_dir, doc["model"], row["preset"])
        frames = saved["frames"].numpy() if saved.get("frames") is not None else None
        guard = bench_e2e.guard_against(ref, saved["params"], saved["latents"], frames)
        if guard is None:
            continue
        row["latent_cos"], row["psnr_db"] = guard["latent_cosine"], guard["frames_psnr_db"]
        if row["stage"] == 6:
            row["bit_identical"] = guard["bit_identical"]
        row["backfilled"] = True
        del row["pending"]
        pending.unlink()
        done += 1
    return done


def add_vs_diffusers(rows: list[dict]) -> None:
    """vs_diffusers: the diffusers row's seconds / ours over COMPARED (text + vae_encode + denoise_high +
    denoise_low + vae_decode: the parts both measure), for the bench_e2e rows (VS_DIFFUSERS_STAGES) of a preset
    that has a diffusers row; null for every other row."""
    base = {r["preset"]: r for r in rows
            if r["config"] == "diffusers" and r["stage"] in VS_DIFFUSERS_STAGES and not r.get("error")}
    for r in rows:
        b = base.get(r["preset"])
        r["vs_diffusers"] = None
        if b is None or r["stage"] not in VS_DIFFUSERS_STAGES or r.get("error"):
            continue
        keys = [k for k in COMPARED if b.get(k) is not None and r.get(k) is not None]
        ours = sum(r[k] for k in keys)
        r["vs_diffusers"] = sum(b[k] for k in keys) / ours if keys and ours > 0 else None


def _fmt(v, digits=2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.{digits}f}"
    return str(v)


def _timing(v: dict) -> str:
    return f"{v['ms']:.1f} ms, {v['tflops']:.0f} TFLOP/s" if "ms" in v else str(v.get("error", "not measured"))


def _probe_sdpa_lines(probe: dict) -> list[str]:
    if not probe.get("sdpa"):
        return []
    default = (probe.get("sdpa_default") or {}).get("backend", "?")
    lines = ["", f"SDPA default for B=2, 40 heads, 33,600 tokens, head dim 128 (bf16): **{default}**", ""]
    return lines + [f"- {k}: {_timing(v)}" + (f", PSNR {v['psnr_db']:.1f} dB vs BF16 (gate {v.get('gate_db', 40):.0f} dB)"
                                              if "psnr_db" in v else "") for k, v in probe["sdpa"].items()]


def _probe_attention_lines(probe: dict) -> list[str]:
    a = probe.get("attention")
    if not a:
        return []
    usable = ", ".join(k for k, v in (a.get("kernels") or {}).items() if v.get("available"))
    auto = a.get("auto") or {}
    return ["", f"Attention report ({a.get('device')}): PyTorch picks **{a.get('chosen')}** (can run: {usable}); "
                f"attn=auto -> {auto.get('kernel')} ({auto.get('reason')}); cudnn_fp8: {a.get('cudnn_fp8')}"]


def _probe_fp8_lines(probe: dict) -> list[str]:
    f = probe.get("fp8_linear")
    if not f:
        return []
    parts = [f"BF16 {f['bf16']['tflops']:.0f} TFLOP/s"] if "tflops" in (f.get("bf16") or {}) else []
    for key, label in (("fp8_scaled_mm", "FP8 scaled_mm"), ("fp8_linear_module", "Fp8Linear"), ("torchao", "torchao")):
        v = f.get(key) or {}
        if "speedup" in v:
            parts.append(f"{label} {v['tflops']:.0f} TFLOP/s ({v['speedup']:.2f}x)")
        elif "error" in v:
            parts.append(f"{label}: {' '.join(str(v['error']).split())[:160]}")
    if f.get("fp8_error"):
        parts.append(f"FP8: {f['fp8_error']}")
    return ["", "FFN linear 33,600x5120 @ 5120x13824: " + (", ".join(parts) or "not measured")]


def _probe_vae_lines(probe: dict) -> list[str]:
    vae = probe.get("vae")
    if not vae or vae.get("skipped"):
        return []
    if "psnr_db" not in vae:
        return ["", f"VAE decode ({vae.get('model')}): {vae.get('error')}"]
    size = vae["size"]
    return ["", f"VAE decode ({vae['model']}{'' if vae['real_weights'] else ', random weights'}, "
                f"{size['width']}x{size['height']}x{size['frames']}): bf16 vs fp32 frame PSNR "
                + ", ".join(f"{k} {v:.1f} dB" for k, v in vae["psnr_db"].items())
                + f" (gate {vae['gate_db']:.0f} dB: {'passes' if vae['passes'] else 'fails'}); decode s "
                + ", ".join(f"{k} {v:.2f}" for k, v in vae["decode_s"].items())]


def _probe_other_lines(probe: dict) -> list[str]:
    lines = []
    if probe.get("pytest_gpu"):
        lines += ["", f"pytest -m gpu: {probe['pytest_gpu'].get('summary')}"]
        lines += [f"- `{ln}`" for ln in probe["pytest_gpu"].get("failed") or []]
    if probe.get("error"):
        lines += ["", f"probe: {' '.join(str(probe['error']).split())[:300]}"]
    return lines


PROBE_SECTIONS = (("SDPA", _probe_sdpa_lines), ("attention report", _probe_attention_lines),
                  ("FFN linear", _probe_fp8_lines), ("VAE", _probe_vae_lines), ("probe", _probe_other_lines))


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
    bench = [r for r in doc["rows"] if r.get("peak_allocated_gb") is not None and r["stage"] in VS_DIFFUSERS_STAGES]
    if any("setup_peak_allocated_gb" not in r for r in bench):  # bench_e2e's peaks before 2026-11-27
        lines += ["", "Peak alloc/reserved: the timed request's, except rows measured before 2026-11-27 (no "
                      "setup_peak_allocated_gb in the JSON), whose peaks include the backend's build and warm-up."]
    probe = doc.get("probe") or {}
    for name, section in PROBE_SECTIONS:  # a partial probe renders what it has; a malformed part says so
        try:
            lines += section(probe)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            lines += ["", f"{name}: partial probe, not rendered ({type(e).__name__}: {e})"]
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

    lines = [f"Measured by `python benchmarks/gpu_proof.py` (the plan: `--plan`), regenerated from "
             f"[{path.name}]({rel(path)}):", "", markdown(doc).rstrip("\n")]
    if charted:
        lines += ["", f"![GPU proof: seconds per row]({rel(path.with_suffix('.png'))})"]
    return "\n".join(lines)


def update_readme(dst: Path, block: str, src: Path = ROOT / "README.md") -> bool:
    """Write `src` (the checkout's README.md) to `dst` with its GPU block replaced (bytes outside the markers
    unchanged); False, and nothing written, when `src` has no markers."""
    text = replace_block(src.read_bytes().decode("utf-8"), block)
    if text is None:
        print(f"{src} has no {README_START} ... {README_END} block: README not updated", file=sys.stderr)
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(text.encode("utf-8"))
    return True


def write_results(path: Path, doc: dict, readme: Path | None = None) -> None:
    """The JSON, then what is regenerated from it: the .md table, the .png chart and the README block (the
    checkout's README.md rewritten to `readme`)."""
    add_vs_diffusers(doc["rows"])
    problems = validate(doc)
    if problems:
        raise ValueError("results do not match the schema: " + "; ".join(problems))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)  # a command killed mid-write leaves the previous document whole
    path.with_suffix(".md").write_text(markdown(doc))
    charted = chart(doc, path.with_suffix(".png"))
    if readme is not None:
        update_readme(readme, readme_block(doc, path, readme, charted))


def copy_out(ctx: Ctx) -> None:
    """The JSON, .md, .png, the README copy and proof.log into --copy-to ($OUT): what comes back from the device
    (each well under its 16 MiB; the reference latents stay)."""
    if ctx.copy_to is None or ctx.path is None:
        return
    ctx.copy_to.mkdir(parents=True, exist_ok=True)
    for p in (ctx.path, ctx.path.with_suffix(".md"), ctx.path.with_suffix(".png"), ctx.readme, ctx.out / "proof.log"):
        if p.is_file() and p.resolve() != (ctx.copy_to / p.name).resolve():
            shutil.copyfile(p, ctx.copy_to / p.name)


def record(ctx: Ctx, unit: Unit, rows: list[dict], probe: dict | None) -> dict:
    """A unit's rows and probe findings into the JSON at once (then the table, chart, README copy and --copy-to):
    a command killed later keeps them."""
    doc = load_doc(ctx)
    for row in rows:
        row.setdefault("unit", unit.name)
        if not upsert(doc, row):
            print(f"  kept the earlier {row['config']} row: this run failed ({row['error'][:200]})", file=sys.stderr)
    if probe is not None:
        doc["probe"] = {**(doc.get("probe") or {}), **probe}
    if n := backfill(doc, ctx.ref_dir):
        print(f"  compared {n} pending row(s) with their reference", flush=True)
    write_results(ctx.path, doc, ctx.readme)
    copy_out(ctx)
    return doc


def _log_tail(ctx: Ctx, unit: Unit, lines: int = 200) -> None:
    """The unit's log tail into proof.log (it comes back with --copy-to)."""
    log = ctx.log(unit)
    if not log.is_file():
        return
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    with open(ctx.out / "proof.log", "a") as fh:
        fh.write(f"== {unit.key} ({datetime.datetime.now():%H:%M:%S})\n" + "\n".join(tail) + "\n")


def render(files: list[str], readme: Path) -> Path:
    """--render: the documents merged in order into the first path (created when missing), then its .md, .png and
    the README block regenerated. No GPU needed."""
    docs = [json.loads(Path(f).read_text()) for f in files if Path(f).is_file()]
    if not docs:
        raise SystemExit(f"none of {files} exists")
    path = Path(files[0])
    doc = merge_docs(docs)
    write_results(path, doc, readme)
    print(f"rendered {path} ({len(doc['rows'])} rows from {len(docs)} document(s)) -> {path.with_suffix('.md')}, "
          f"{readme}")
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
    """Every wheel in `wheels` (what `make wheelhouse` put there) into `site`, once per machine (a stamp of the
    files); refuses a wheelhouse that lacks one of the Makefile's packages. A wanrt wheel is never installed: the
    proof measures this checkout's src/."""
    files = sorted(p for p in Path(wheels).glob("*.whl") if not p.name.startswith("wanrt-"))
    if not files:
        raise SystemExit(f"no wheels in {wheels}: run `make wheelhouse` where pip can reach PyPI, carry wheels/ here")
    missing = missing_wheels(files, wheelhouse_packages())
    if missing:
        raise SystemExit(f"{wheels} lacks {', '.join(missing)}: run `make wheelhouse` again, carry wheels/ here")
    stamp = "".join(f"{p.name} {p.stat().st_size}\n" for p in files)
    marker = Path(site) / ".wanrt-proof-installed"
    if marker.is_file() and marker.read_text() == stamp:
        print(f"wheels already installed in {site}", flush=True)
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", str(site), *map(str, files)]
    subprocess.run(cmd, check=True)
    marker.write_text(stamp)
    print(f"installed {len(files)} wheels into {site}", flush=True)


def _named(unit: Unit, configs) -> bool:
    """`configs` names this unit: by its name in any stage, or as "stage:name" (stage 2's and stage 6's units are
    both `eager`)."""
    return unit.name in configs or unit.key in configs


def select_units(stages: list[int], configs: list[str] | None) -> list[Unit]:
    """The units of `stages` (in that order) named by `configs` (None: all but the optional ones); in a stage the
    preset's reference (eager) first, then table order."""
    chosen = []
    for n in stages:
        units = [u for u in UNITS if u.stage == n and (_named(u, configs) if configs else not u.optional)]
        chosen += sorted(units, key=lambda u: not (u.kind == "e2e" and u.name == bench_e2e.REFERENCE_CONFIG))
    if configs:
        unknown = [c for c in configs if not any(_named(u, [c]) for u in chosen)]
        if unknown:
            names = "; ".join(f"{u.stage}: {u.name}" for u in UNITS if u.stage in stages)
            raise SystemExit(f"no unit {unknown} in stages {stages} (there: {names})")
    return chosen


def main(argv=None) -> int:
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true", help="print the 15-minute session's steps and exit")
    ap.add_argument("--step", choices=sorted(STEPS), help="run a plan step: its stages, configs and budget")
    ap.add_argument("--stages", default=None, help="comma list, in the order run (default: the plan's order)")
    ap.add_argument("--stage", type=int, choices=sorted(STAGE_NAMES), help="one stage (= --stages N)")
    ap.add_argument("--configs", default=None,
                    help="comma list of unit names within the stages (e.g. eager, diffusers, '+fp8 +compile'), or "
                         "stage:name for one stage's (2:eager)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"this command's seconds, install included (default: the step's, else {DEFAULT_BUDGET_S}; 0: "
                         "no limit): a unit starts only with its minimum left and is killed when the budget ends")
    ap.add_argument("--row-timeout", type=float, default=ROW_TIMEOUT_S, help="a cap on any one unit's seconds")
    ap.add_argument("--copy-to", default=None, help="after every unit: JSON, .md, .png, README.md, proof.log here ($OUT)")
    ap.add_argument("--render", nargs="+", metavar="JSON", default=None,
                    help="no GPU: merge these results documents into the first and regenerate its .md, .png and the "
                         "README block")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: plumbing and schema")
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(ROOT / ".wanrt" / "proof"), help="the work dir (git-ignored)")
    ap.add_argument("--ref-dir", default=None, help="reference and pending latents (default: <out>/ref)")
    ap.add_argument("--wheels", default=str(ROOT / "wheels"))
    ap.add_argument("--site", default=str(SITE), help="where the wheels are installed (env WANRT_PROOF_SITE)")
    ap.add_argument("--no-install", action="store_true", help="use the packages already importable")
    ap.add_argument("--date", default=datetime.date.today().strftime("%Y%m%d"), help="the results file's date")
    ap.add_argument("--readme", default=None,
                    help="where the README with its GPU block regenerated goes (runs: <out>/README.md; --render: "
                         "README.md); the source is always the checkout's README.md")
    ap.add_argument("--presets", default=None,
                    help="what the stages' presets mean, e.g. default=cli_min,fast=cli_min (bench_runtime.PRESETS; "
                         "default: default=default,fast=fast, a dry run smoke and smoke_fast)")
    ap.add_argument("--vae-model", default=None,
                    help="stage 1's VAE PSNR on this model: a diffusers dir with real weights (none: not measured)")
    ap.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # internal: run this unit here
    ap.add_argument("--unit-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reuse-resident", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--die-before", default=None, help=argparse.SUPPRESS)  # tests: a kill between units
    args = ap.parse_args(argv)

    if args.plan:
        print(plan_text())
        return 0
    if args.render:
        render(args.render, Path(args.readme) if args.readme else ROOT / "README.md")
        return 0
    step = STEPS.get(args.step)
    if args.budget_s is None:  # a dry run: no limit (the CPU is slow, and there is no device command to fit)
        args.budget_s = step.budget_s if step else 0 if args.dry_run else DEFAULT_BUDGET_S
    ctx = Ctx(args, started)
    ctx.out.mkdir(parents=True, exist_ok=True)
    if args.unit:
        unit = next(u for u in UNITS if u.key == args.unit)
        rows, probe = unit_here(ctx, unit, args.reuse_resident)
        Path(args.unit_out).write_text(json.dumps({"rows": rows, "probe": probe}, default=str))
        return 0

    if args.stage:
        stages = [args.stage]
    elif args.stages:
        stages = [int(s) for s in args.stages.split(",")]
    else:
        stages = list(step.stages) if step else list(dict.fromkeys(n for s in PLAN for n in s.stages))
    configs = args.configs.split(",") if args.configs else (list(step.configs) if step and step.configs else None)
    if configs is None and not (args.step or args.stage or args.stages):  # everything: the plan's units in its
        planned = [u for s in PLAN for u in select_units(list(s.stages), s.configs)]  # order, then the rest
        units = [u for u in dict.fromkeys(planned + select_units(sorted(STAGE_NAMES), None)) if not u.optional]
    else:
        units = select_units(stages, configs)
    if not (ctx.dry or args.no_install):
        install_wheels(Path(args.wheels), ctx.site)
        use_paths(ctx.site)
        ctx.env = proof_env(ctx.site)
    ctx.path = results_path(ctx.out, "cpu" if ctx.dry else slug(gpu_name(ctx.env)), ctx.date)

    failed, not_run = [], []
    for unit in units:
        if args.die_before == unit.name:
            os._exit(137)  # what the device's limit does to a command: no cleanup
        left = ctx.left_s()
        if not ctx.dry and left < unit.min_start_s:
            not_run.append(f"{unit.key} ({left:.0f} s left, it needs {unit.min_start_s})")
            continue
        cap = {"probe": PROBE_TIMEOUT_S, "pytest": PYTEST_TIMEOUT_S}.get(unit.kind, ctx.row_cap)
        timeout = max(1.0, min(cap, left))
        print(f"== stage {unit.stage} ({STAGE_NAMES[unit.stage]}): {unit.name} [{ctx.presets[unit.preset]}], "
              f"up to {timeout:.0f} s", flush=True)
        t0 = time.perf_counter()
        doc = load_doc(ctx)
        rows, probe = run_unit(ctx, unit, timeout, doc)
        _log_tail(ctx, unit)
        doc = record(ctx, unit, rows, probe)
        for row in rows:
            print(f"   {row['config']}: total {_fmt(row.get('total_s'))} s" + (f"; error: {row['error'][:300]}"
                                                                              if row.get("error") else ""), flush=True)
        errors = [r for r in rows if r.get("error")] + ([probe] if probe and probe.get("error") else [])
        if errors:
            failed.append(unit.key)
            log = ctx.log(unit)
            if log.is_file():
                print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr, flush=True)
        print(f"   {time.perf_counter() - t0:.1f} s -> {ctx.path}", flush=True)
    if ctx.path.is_file():
        print(ctx.path.with_suffix(".md").read_text())
        print(f"results: {ctx.path}" + (f" (copied to {ctx.copy_to})" if ctx.copy_to else ""))
    copy_out(ctx)
    if not_run:
        print(f"not run (budget): {', '.join(not_run)}", file=sys.stderr)
    if failed:
        print(f"units that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or not_run else 0


def _on_signal(signum, frame):  # killed from outside: take the units' process groups along
    bench_e2e.kill_live_groups()
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, _on_signal)
    sys.exit(main())

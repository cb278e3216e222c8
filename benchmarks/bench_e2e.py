#!/usr/bin/env python3
"""End-to-end: diffusers' pipeline vs our eager vs our compiled backend with each switch, in one run.

Configurations are listed in a fixed order so each row shows what one more switch buys (diffusion-fast
style). Each (preset, configuration) row runs in its own process (this script with --row), so nothing a row
does to the model leaks into the next: the FP8 swap replaces linears in place on the GPU, compiled graphs
and the allocator's pool stay with their process. The eager row saves its final latents and frames to
--ref-dir; the other rows, in this run or a later one pointed at the same directory (gpu_proof's stages),
compare against them: cosine of the final latents, PSNR of the decoded frames. A row whose configuration
has FP8 off fails if any Fp8Linear is found in its experts.

For each row: median of --repeats runs after --warmup runs (warmup_s: their time, compiles included; each is
a WARMUP_STEPS-step request at the row's size, frames and guidance, which reaches both experts at the batch
sizes the timed run uses), per-stage times, peak memory, the loop's achieved TFLOP/s and % of the FLOP model at
BF16 and FP8 peak. The guard compares the timed run's own frames (kept as the pipeline decodes them: no second
decode). A row that finds no reference yet leaves its latents and frames as `pending_*.pt` beside where the
reference will be, for a later comparison (gpu_proof backfills it). Child processes run in their own process
group, killed as a group on timeout. Results go to benchmarks/results/e2e_<model>_<device>.json (+ a markdown
table and, with matplotlib, a PNG chart).

    python benchmarks/bench_e2e.py --model tiny                              # CPU smoke run (tiny preset)
    python benchmarks/bench_e2e.py --model random-full --presets fast,default,high_quality   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
# this checkout's wanrt first (never an installed copy), then benchmarks/
for _p in (str(HERE.parent), str(HERE.parent.parent / "src")):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

import flops as flop_model  # noqa: E402
from bench_runtime import PRESETS, arch_of, device_name  # noqa: E402

IMAGE = HERE.parent.parent / "tests" / "assets" / "first_frame.png"
PROMPT = "a woman turning her head slowly and smiling"
CONFIGS = [  # (name, backend, options) in the order the switches are added
    ("diffusers", "diffusers", {}),
    ("eager", "eager", {}),
    ("+fp8", "compiled", dict(fp8=True, compile=False, cudagraphs=False)),
    ("+fp8 +compile", "compiled", dict(fp8=True, compile=True, cudagraphs=False)),
    ("+fp8 +compile +cudagraphs", "compiled", dict(fp8=True, compile=True, cudagraphs=True)),
    ("bf16 +compile", "compiled", dict(fp8=False, compile=True, cudagraphs=False)),  # the default with --no-fp8
    ("+fp8(torchao) +compile", "compiled", dict(fp8=True, fp8_impl="torchao", compile=True, cudagraphs=False)),
    # self-attention in FP8 through cuDNN (attn=cudnn_fp8): 53 % of a default forward's FLOPs
    ("+fp8 +compile +cudnn_fp8", "compiled", dict(fp8=True, compile=True, cudagraphs=False, attn="cudnn_fp8")),
    ("bf16 +compile +cudagraphs", "compiled", dict(fp8=False, compile=True, cudagraphs=True)),
    ("tensorrt", "tensorrt", {}),  # only with --artifacts and an importable TensorRT
]
REFERENCE_CONFIG = "eager"
# Warm-up requests take this many steps (one per expert at the default boundary) at the row's size, frames and
# guidance: every expert at every batch size the timed run uses, so compiles, cuDNN/cuBLAS heuristics and the
# allocator's pool are done, for a third of a default request's loop. 0: warm up with the timed request itself.
WARMUP_STEPS = 2
# The parts of a request both diffusers' pipeline and ours time: vs_diffusers divides their sums. The MP4 encode
# is left out (diffusers writes no video; ours overlaps it with the decode on a writer thread).
COMPARED_PARTS = ("text_encode_s", "vae_encode_s", "denoise_high_s", "denoise_low_s", "vae_decode_s")
GPU_PEAK_KEYS = {"H100": "H100 SXM", "H200": "H200"}


def _pdeathsig():
    """prctl(PR_SET_PDEATHSIG, SIGKILL), resolved now: the forked child calls it before exec (no imports there)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        return lambda: prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the timeout's group kill still applies
        return None


_DIE_WITH_PARENT = _pdeathsig()
LIVE_GROUPS: set[int] = set()  # process groups running now (a signal handler can kill them: kill_live_groups)


def kill_live_groups() -> None:
    for pgid in list(LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def run_group(cmd: list[str], timeout: float | None = None, env: dict | None = None,
              log: Path | None = None, cwd: Path | None = None) -> tuple[int | None, str, str]:
    """`cmd` in a session (process group) of its own: on timeout the whole group is killed (the row process and
    what it started: Inductor's compile workers, the CLI), not only the direct child, and a child dies with this
    process too (PR_SET_PDEATHSIG on Linux), so nothing keeps ~66 GB of GPU memory after its command ended.
    (returncode, None when killed at the timeout; stdout; the last 20,000 characters of stderr, all of which go
    to `log` when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "stdout"
        err_path = Path(log) if log else Path(tmp) / "stderr"
        err_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True,
                                 preexec_fn=_DIE_WITH_PARENT)
            LIVE_GROUPS.add(p.pid)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # a timeout, or this process interrupted: the whole group goes
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                LIVE_GROUPS.discard(p.pid)
        return rc, out_path.read_text(errors="replace"), err_path.read_bytes()[-20_000:].decode(errors="replace")


def with_alloc_conf(env: dict) -> dict:
    """`env` with the allocator setting the server runs with (build_runtime: gpus.prefer_expandable_segments) unless
    it has one: every row measures under it, diffusers' too."""
    from wanrt.runtime.gpus import ALLOC_CONF_VARS, CUDA_ALLOC_CONF

    if not any(v in env for v in ALLOC_CONF_VARS):
        env["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF
    return env


def child_env(env: dict | None = None) -> dict:
    """`env` (default os.environ) with this checkout's src/ first on PYTHONPATH: child processes measure it too."""
    env = dict(os.environ if env is None else env)
    src = str(HERE.parent.parent / "src")
    with_alloc_conf(env)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]
    env["PYTHONPATH"] = os.pathsep.join([src, *rest])
    return env


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def decode_frames(model, latents):
    import numpy as np

    from wanrt.runtime.vae import decode_stream, to_uint8_frames

    return np.concatenate([to_uint8_frames(c) for c in decode_stream(model.vae, latents)])


def fp8_layer_count(*modules) -> int:
    """Fp8Linear modules in these modules (each counted once)."""
    from wanrt.runtime.fp8 import Fp8Linear
    seen = set()
    for module in modules:
        for m in module.modules():
            if isinstance(m, Fp8Linear):
                seen.add(id(m))
    return len(seen)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_diffusers(model, params, image, device):
    """diffusers' WanImageToVideoPipeline on the same components, latents out; stages timed by wrapping the
    pipeline's prompt encoding and latent preparation (the first-frame VAE encode) and hooking each expert."""
    import torch
    from diffusers import WanImageToVideoPipeline

    from wanrt.runtime.image import fit_image
    from wanrt.runtime.sampler import make_scheduler

    pipe = WanImageToVideoPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                                   scheduler=make_scheduler(model.scheduler_config), image_processor=None,
                                   image_encoder=None, transformer=model.transformer_high,
                                   transformer_2=model.transformer_low, boundary_ratio=model.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    timings = {"text_encode_s": 0.0, "vae_encode_s": 0.0, "denoise_high_s": 0.0, "denoise_low_s": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            _sync(device)
            timings[key] += time.perf_counter() - t0
            return out
        return wrapper

    pipe.encode_prompt = timed("text_encode_s", pipe.encode_prompt)
    pipe.prepare_latents = timed("vae_encode_s", pipe.prepare_latents)
    started, hooks = [0.0], []
    for key, expert in (("denoise_high_s", model.transformer_high), ("denoise_low_s", model.transformer_low)):
        def pre(module, args, _key=key):
            _sync(device)
            started[0] = time.perf_counter()

        def post(module, args, out, _key=key):
            _sync(device)
            timings[_key] += time.perf_counter() - started[0]

        hooks += [expert.register_forward_pre_hook(pre), expert.register_forward_hook(post)]
    try:
        t0 = time.perf_counter()
        latents = pipe(image=fit_image(image, params.width, params.height), prompt=params.prompt,
                       negative_prompt=params.negative_prompt, height=params.height, width=params.width,
                       num_frames=params.frames_generated, num_inference_steps=params.steps,
                       guidance_scale=params.cfg_high_noise, guidance_scale_2=params.cfg_low_noise,
                       generator=torch.Generator("cpu").manual_seed(params.seed), output_type="latent").frames
        _sync(device)
        loop_and_encode = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    t1 = time.perf_counter()
    frames = decode_frames(model, latents)  # diffusers decodes the whole video at once; same maths
    decode = time.perf_counter() - t1
    return latents, frames, {**timings, "diffusers_encode_and_loop_s": loop_and_encode, "vae_decode_s": decode,
                             "total_s": loop_and_encode + decode}


def reference_path(ref_dir: Path, model: str, preset_name: str) -> Path:
    return Path(ref_dir) / f"ref_{Path(model).name}_{preset_name}.pt"


def pending_path(ref_dir: Path, model: str, preset_name: str, config: str) -> Path:
    """Where a row that ran before its preset's reference leaves its latents and frames."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", config).strip("_")
    return Path(ref_dir) / f"pending_{Path(model).name}_{preset_name}_{slug}.pt"


def guard_against(ref: Path, params: dict, latents, frames=None) -> dict | None:
    """Cosine of `latents` (float32, CPU) and PSNR of `frames` (uint8 array; where both sides have frames) against
    the reference file; bit_identical: the latents equal. None when there is no reference for these params."""
    import torch

    if not Path(ref).is_file():
        return None
    saved = torch.load(ref, weights_only=True)
    if saved["params"] != params:
        return None
    out = {"reference": REFERENCE_CONFIG, "latent_cosine": torch.nn.functional.cosine_similarity(
        latents.flatten(), saved["latents"].flatten(), dim=0).item(), "frames_psnr_db": None,
        "bit_identical": bool(torch.equal(latents, saved["latents"]))}
    if frames is not None and saved.get("frames") is not None:
        out["frames_psnr_db"] = psnr(frames, saved["frames"].numpy())
    return out


def warmup_params(preset: dict, boundary_ratio: float = 0.9, steps: int = WARMUP_STEPS) -> dict:
    """The preset with `steps` denoising steps where that still runs both experts (the size, frames and guidance,
    hence the batch sizes, stay), else the preset itself."""
    if 0 < steps < preset["steps"] and all(flop_model.split_steps(steps, boundary_ratio)):
        return {**preset, "steps": steps}
    return dict(preset)


@contextlib.contextmanager
def kept_frames(into: list):
    """The uint8 frames WanI2VPipeline.generate decodes (and hands to its MP4 writer), appended to `into`: the
    guard's PSNR reads the timed run's own frames instead of a second full VAE decode after it."""
    import wanrt.runtime.pipeline as pipeline

    real = pipeline.to_uint8_frames

    def keep(chunk):
        frames = real(chunk)
        into.append(frames)
        return frames

    pipeline.to_uint8_frames = keep
    try:
        yield into
    finally:
        pipeline.to_uint8_frames = real


def run_row(model_spec: str, device_arg: str, preset_name: str, config_name: str, repeats: int = 1,
            warmup: int = 1, ref_dir: str | Path | None = None, artifacts: str | None = None,
            compile_off: bool = False, warmup_steps: int = WARMUP_STEPS) -> dict:
    """One configuration on one preset, in this process (run it in a fresh one: see spawn_row). A configuration
    this device can only refuse (fp8_impl=torchao without its GPU or package) returns {"skipped": why} before
    loading anything (the check runs here, in the row's process: the caller holds no CUDA context)."""
    import numpy as np
    import torch
    from PIL import Image

    from wanrt.config import Settings
    from wanrt.model.loading import load_model
    from wanrt.params import GenerateParams
    from wanrt.runtime.backends import make_backend
    from wanrt.runtime.pipeline import WanI2VPipeline

    name, backend_name, options = next(c for c in CONFIGS if c[0] == config_name)
    options = dict(options)
    if compile_off and backend_name == "compiled":  # CPU smoke runs: inductor on CPU takes minutes
        options.update(compile=False, cudagraphs=False)
    settings = Settings(model=model_spec, device=device_arg)
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    cuda = device.startswith("cuda")
    preset = PRESETS[preset_name]
    row = {"preset": preset_name, "config": name, "params": preset, "options": options}
    if options.get("fp8_impl") == "torchao":
        from wanrt.runtime.fp8 import torchao_unavailable

        if why := torchao_unavailable(device):
            return row | {"skipped": why}
    if options.get("attn") == "cudnn_fp8":
        from wanrt.runtime.attention import fp8_unavailable

        if why := fp8_unavailable(device):
            return row | {"skipped": why}
    params = GenerateParams(prompt=PROMPT, **preset)
    image = Image.open(IMAGE)
    t0 = time.perf_counter()
    model = load_model(model_spec, device, dtype)
    row["load_s"] = time.perf_counter() - t0
    warm = GenerateParams(prompt=PROMPT, **warmup_params(preset, model.boundary_ratio, warmup_steps))
    if warmup:
        row["warmup_steps"] = warm.steps
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        runs, describe, backend = [], {}, None
        t_warm = time.perf_counter()
        if backend_name == "diffusers":
            for i in range(warmup + repeats):
                if i == warmup:
                    row["warmup_s"] = time.perf_counter() - t_warm
                    setup_peak(row, cuda)
                latents, frames, timings = run_diffusers(model, params if i >= warmup else warm, image, device)
                if i >= warmup:
                    runs.append(timings)
        else:
            if backend_name == "tensorrt":
                options = dict(artifacts=artifacts, device=device)
            backend = make_backend(backend_name, model, **options)
            pipe = WanI2VPipeline(model, backend, device=device, dtype=dtype)
            with tempfile.TemporaryDirectory() as tmp:
                for i in range(warmup + repeats):
                    if i == warmup:
                        row["warmup_s"] = time.perf_counter() - t_warm
                        setup_peak(row, cuda)
                    chunks = []
                    with kept_frames(chunks) if i == warmup + repeats - 1 else contextlib.nullcontext():
                        result = pipe.generate(params if i >= warmup else warm, image, Path(tmp) / "v.mp4",
                                               keep_latents=True)
                    if i >= warmup:
                        runs.append(result.timings)
            latents = result.latents
            frames = np.concatenate(chunks)  # the timed run's frames, as decoded for its MP4
            describe = backend.describe() if hasattr(backend, "describe") else {"backend": backend_name}
        experts = list(model.experts.values()) + list(getattr(backend, "experts", {}).values())
        row["fp8_layers"] = fp8_layer_count(*experts)
        if backend_name != "tensorrt" and not options.get("fp8") and row["fp8_layers"]:
            raise AssertionError(f"BF16 row {name!r} runs {row['fp8_layers']} FP8 layers: a previous row leaked")
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row.update(median_s=median, describe=describe)
        if cuda:  # the timed requests' peak (setup_peak_*: the backend's build and the warm-up before them)
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        if ref_dir is not None:
            ref = reference_path(ref_dir, model_spec, preset_name)
            final = latents.detach().float().cpu()
            if name == REFERENCE_CONFIG:
                ref.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"latents": final, "frames": torch.from_numpy(frames), "params": preset,
                            "device": device}, ref)
            guard = guard_against(ref, preset, final, frames)
            if guard is not None:
                row["guard"] = guard
            else:  # no reference yet: left for a later comparison (gpu_proof backfills the row)
                pending = pending_path(ref_dir, model_spec, preset_name, name)
                pending.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"latents": final, "frames": torch.from_numpy(frames), "params": preset}, pending)
                row["pending"] = str(pending)
        loop_s = median.get("denoise_high_s", 0) + median.get("denoise_low_s", 0)
        req = flop_model.request_flops(arch=arch_of(model), **preset)
        row["loop_tflop"] = req["total"] / 1e12
        if loop_s:
            achieved = req["total"] / loop_s / 1e12
            row["loop_tflops"] = achieved
            peak_key = next((v for k, v in GPU_PEAK_KEYS.items() if k in device_name(device)), None)
            if peak_key:
                row["loop_pct_of_peak"] = {p: 100 * achieved / v for p, v in flop_model.PEAKS_TFLOPS[peak_key].items() if v}
                row["projection_s"] = {  # labelled projection: same efficiency on another card's peak
                    card: round(req["total"] / (flop_model.PEAKS_TFLOPS[card]["bf16"] * 1e12 *
                                                achieved / flop_model.PEAKS_TFLOPS[peak_key]["bf16"])
                                + median["total_s"] - loop_s, 1)
                    for card in ("RTX 4090", "RTX 3080")}
    except Exception as e:  # a configuration that cannot run here says why, the others go on
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        if backend_name == "compiled" and options.get("compile"):
            torch._dynamo.reset()  # a caller running several compiled rows in one process starts clean
    return row


def setup_peak(row: dict, cuda: bool) -> None:
    """Before the timed requests: the peak so far (the backend's build, e.g. FP8 quantisation from BF16 weights on
    the GPU, and the warm-up) goes to setup_peak_*, and the counters restart, so peak_memory_gb is what serving a
    request takes. The first H200 run (2026-11-26) reported one peak for both: 66.6 GiB for FP8 + compile, most of
    it the BF16 experts still on the GPU while they were quantised."""
    if cuda:
        import torch

        row["setup_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        row["setup_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        torch.cuda.reset_peak_memory_stats()


def spawn_row(model_spec: str, device: str, preset_name: str, config_name: str, repeats: int, warmup: int,
              ref_dir, artifacts: str | None = None, compile_off: bool = False, timeout: float | None = None,
              env: dict | None = None, log: Path | None = None, warmup_steps: int = WARMUP_STEPS) -> dict:
    """run_row in a fresh process of this script (same interpreter; `env`, default this checkout's src/ first on
    PYTHONPATH), in a process group of its own killed as a whole at `timeout`. stderr goes to `log` if given."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(HERE), "--row", config_name, "--presets", preset_name, "--model", model_spec,
               "--device", device, "--repeats", str(repeats), "--warmup", str(warmup), "--ref-dir", str(ref_dir),
               "--warmup-steps", str(warmup_steps), "--row-out", str(out)]
        cmd += ["--artifacts", artifacts] if artifacts else []
        cmd += ["--compile-off"] if compile_off else []
        rc, _, err = run_group(cmd, timeout, child_env(env), log)
        if rc is None:
            return {"preset": preset_name, "config": config_name,
                    "error": f"killed after {timeout:.0f} s (its process group): {err[-300:]}"}
        if rc != 0 or not out.is_file():
            return {"preset": preset_name, "config": config_name, "error": f"row process exited {rc}: {err[-600:]}"}
        return json.loads(out.read_text())


def cold_start(model: str, device: str, preset_name: str, artifacts: str | None = None,
               extra: tuple[str, ...] = (), timeout: float | None = None, env: dict | None = None,
               fresh_caches: bool = True, log: Path | None = None, cache_root: str | None = None) -> dict:
    """A fresh `wanrt generate` process: imports, model load (from artifacts when given), one video. fresh_caches:
    Inductor's (FX graph, AOT) and Triton's caches in empty temporary directories, so the compile is a cold one
    (earlier rows filled the default ones in /tmp). cache_root: the caches there instead (a second call with the
    same root is a restart with warm caches, as a worker's data dir gives it). Its process group is killed at
    `timeout` (returncode None)."""
    preset = PRESETS[preset_name]
    env = child_env(env)
    with tempfile.TemporaryDirectory() as tmp:
        root = cache_root or (tmp if fresh_caches else None)
        if root is not None:
            env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"] = str(Path(root) / "inductor"), str(Path(root) / "triton")
        warm = cache_root is not None and any((Path(cache_root) / "inductor").glob("*"))
        cmd = [sys.executable, "-m", "wanrt.cli", "generate", "--model", model, "--image", str(IMAGE),
               "--prompt", "cold start", "--out", str(Path(tmp) / "v.mp4"), "--device", device, *extra]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in preset.items()]
        if artifacts:
            cmd += ["--artifacts", artifacts]
        t0 = time.perf_counter()
        rc, stdout, stderr = run_group(cmd, timeout, env, log)
        seconds = time.perf_counter() - t0
    summary = {}
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
            except ValueError:
                pass
            break
    return {"seconds": seconds, "returncode": rc, "preset": preset_name, "artifacts": artifacts,
            "args": list(extra), "request_timings_s": summary.get("timings_s"),
            "cache": "warm" if warm or not (fresh_caches or cache_root) else "cold",
            "stderr_tail": ("" if rc == 0 else f"killed after {timeout:.0f} s; " if rc is None else "") + (
                stderr[-500:] if rc != 0 else "")}


def vs_diffusers(base_row: dict | None, row: dict) -> float | None:
    """diffusers' time / ours over COMPARED_PARTS, the parts both rows measured (never the MP4 encode: diffusers'
    pipeline writes no video, and ours encodes on a writer thread while the decode runs)."""
    if not base_row or "median_s" not in base_row or "median_s" not in row:
        return None
    keys = [k for k in COMPARED_PARTS if base_row["median_s"].get(k) is not None and row["median_s"].get(k) is not None]
    ours = sum(row["median_s"][k] for k in keys)
    return sum(base_row["median_s"][k] for k in keys) / ours if keys and ours > 0 else None


def markdown_table(rows: list[dict], header: str) -> str:
    base = {r["preset"]: r for r in rows if r["config"] == "diffusers" and "median_s" in r}
    lines = [header, "", "| preset | config | total s | vs diffusers | loop TFLOP/s | % BF16 peak | latent cos | PSNR dB | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['preset']} | {r['config']} | error: {r.get('error', '?')} |  |  |  |  |  |  |")
            continue
        speed = vs_diffusers(base.get(r["preset"]), r)
        g = r.get("guard") or {}
        lines.append(f"| {r['preset']} | {r['config']} | {r['median_s']['total_s']:.3f} | "
                     f"{'' if speed is None else f'{speed:.2f}x'} | {r.get('loop_tflops', 0):.3f} | "
                     f"{r.get('loop_pct_of_peak', {}).get('bf16', float('nan')):.1f} | {g.get('latent_cosine', float('nan')):.5f} | "
                     f"{g.get('frames_psnr_db', float('nan')):.1f} | {r.get('peak_memory_gb') or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--presets", default=None, help="comma list; default tiny on the tiny model, else all three")
    ap.add_argument("--configs", default=None, help="comma list of config names (default all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                    help="steps of each warm-up request (0: the timed request's)")
    ap.add_argument("--artifacts", default=None, help="a `wanrt build` output: adds the tensorrt row")
    ap.add_argument("--cold-start", action="store_true",
                    help="also time `wanrt generate` from process start to the MP4 (with --artifacts if given)")
    ap.add_argument("--cold-start-preset", default=None, help="preset of the cold start (default: the first)")
    ap.add_argument("--ref-dir", default=None, help="reference latents/frames (default: a temporary directory)")
    ap.add_argument("--compile-off", action="store_true", help="compiled rows without torch.compile (CPU smoke runs)")
    ap.add_argument("--row", default=None, help="internal: run this one configuration here and write --row-out")
    ap.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    presets = (args.presets or ("tiny" if args.model == "tiny" else "fast,default,high_quality")).split(",")

    if args.row:
        row = run_row(args.model, args.device, presets[0], args.row, args.repeats, args.warmup, args.ref_dir,
                      args.artifacts, args.compile_off, args.warmup_steps)
        Path(args.row_out).write_text(json.dumps(row, default=str))
        return 0

    import torch

    from wanrt.config import Settings

    device = Settings(model=args.model, device=args.device).resolved_device()
    dev_name = device_name(device)
    configs = [c[0] for c in CONFIGS if not args.configs or c[0] in args.configs.split(",")]
    if not args.artifacts:
        configs = [c for c in configs if c != "tensorrt"]
    # the reference row first, so every other row has something to compare against; the table keeps CONFIGS order
    order = sorted(configs, key=lambda c: c != REFERENCE_CONFIG)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = args.ref_dir or tmp
        for preset_name in presets:
            done = {}
            for name in order:
                row = spawn_row(args.model, args.device, preset_name, name, args.repeats, args.warmup, ref_dir,
                                args.artifacts, args.compile_off, warmup_steps=args.warmup_steps)
                if row.get("skipped"):
                    print(f"bench_e2e: leaving out {name}: {row['skipped']}", file=sys.stderr)
                    continue
                done[name] = row
                print(json.dumps({"preset": preset_name, "config": name,
                                  "total_s": row.get("median_s", {}).get("total_s"), "error": row.get("error")}), flush=True)
            rows += [done[name] for name in configs if name in done]
    for r in rows:
        r["vs_diffusers"] = vs_diffusers(next((b for b in rows if b["preset"] == r["preset"] and b["config"] == "diffusers"), None), r)

    cold = None
    if args.cold_start:
        cold = cold_start(args.model, args.device, args.cold_start_preset or presets[0], args.artifacts)
        print(f"cold start (process start -> {cold['preset']} MP4): {cold['seconds']:.1f} s")

    table = markdown_table(rows, f"device: {dev_name}, model {args.model}, median of {args.repeats} after "
                                 f"{args.warmup} warm-up, one process per row")
    print(table)
    for preset_name in presets:
        if preset_name in flop_model.SEED_TARGETS_S:
            print(f"seed targets for {preset_name}: {flop_model.SEED_TARGETS_S[preset_name]} s "
                  "(projection_s in the JSON: our measured efficiency on those cards' peaks, a projection)")

    slug = dev_name.split()[0].lower() if device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else HERE.parent / "results" / f"e2e_{args.model}_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev_name, "model": args.model, "torch": torch.__version__, "rows": rows,
                               "cold_start": cold}, indent=2, default=str))
    out.with_suffix(".md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        ok = [r for r in rows if "median_s" in r]
        ax.barh([f"{r['preset']}: {r['config']}" for r in ok], [r["median_s"]["total_s"] for r in ok])
        ax.set_xlabel("seconds (median)")
        ax.set_title(f"wanrt end to end, {dev_name}")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        plt.close(fig)
    except ImportError:
        print("matplotlib not installed: no chart")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

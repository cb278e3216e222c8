#!/usr/bin/env python3
"""End-to-end: diffusers' pipeline vs our eager vs our compiled backend with each switch, in one run.

Configurations are listed in a fixed order so each row shows what one more switch buys (diffusion-fast
style). Each (preset, configuration) row runs in its own process (this script with --row), so nothing a row
does to the model leaks into the next: the FP8 swap replaces linears in place on the GPU, compiled graphs
and the allocator's pool stay with their process. The eager row saves its final latents and frames to
--ref-dir; the other rows, in this run or a later one pointed at the same directory (gpu_proof's stages),
compare against them: cosine of the final latents, PSNR of the decoded frames. A row whose configuration
has FP8 off fails if any Fp8Linear is found in its experts.

For each row: median of --repeats runs after --warmup (warmup_s: their time, compiles included), per-stage
times, peak memory, the loop's achieved TFLOP/s and % of the FLOP model at BF16 and FP8 peak. Results go
to benchmarks/results/e2e_<model>_<device>.json (+ a markdown table and, with matplotlib, a PNG chart).

    python benchmarks/bench_e2e.py --model tiny                              # CPU smoke run (tiny preset)
    python benchmarks/bench_e2e.py --model random-full --presets fast,default,high_quality   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_model  # noqa: E402
from bench_runtime import PRESETS, arch_of, device_name  # noqa: E402

HERE = Path(__file__).resolve()
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
    ("bf16 +compile +cudagraphs", "compiled", dict(fp8=False, compile=True, cudagraphs=True)),
    ("tensorrt", "tensorrt", {}),  # only with --artifacts and an importable TensorRT
]
REFERENCE_CONFIG = "eager"


def runnable(configs: list[str], device: str, who: str) -> list[str]:
    """`configs` without the rows this device could only refuse (fp8_impl=torchao without its GPU or package),
    saying which and why."""
    from wanrt.runtime.fp8 import torchao_unavailable

    why = torchao_unavailable(device)
    skipped = [n for n, _, o in CONFIGS if why and o.get("fp8_impl") == "torchao" and n in configs]
    if skipped:
        print(f"{who}: leaving out {', '.join(skipped)}: {why}", file=sys.stderr)
    return [c for c in configs if c not in skipped]
GPU_PEAK_KEYS = {"H100": "H100 SXM", "H200": "H200"}


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


def run_row(model_spec: str, device_arg: str, preset_name: str, config_name: str, repeats: int = 1,
            warmup: int = 1, ref_dir: str | Path | None = None, artifacts: str | None = None,
            compile_off: bool = False) -> dict:
    """One configuration on one preset, in this process (run it in a fresh one: see spawn_row)."""
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
    params = GenerateParams(prompt=PROMPT, **preset)
    image = Image.open(IMAGE)
    row = {"preset": preset_name, "config": name, "params": preset, "options": options}
    t0 = time.perf_counter()
    model = load_model(model_spec, device, dtype)
    row["load_s"] = time.perf_counter() - t0
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
                latents, frames, timings = run_diffusers(model, params, image, device)
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
                    result = pipe.generate(params, image, Path(tmp) / "v.mp4", keep_latents=True)
                    if i >= warmup:
                        runs.append(result.timings)
            latents = result.latents
            frames = decode_frames(model, latents)
            describe = backend.describe() if hasattr(backend, "describe") else {"backend": backend_name}
        experts = list(model.experts.values()) + list(getattr(backend, "experts", {}).values())
        row["fp8_layers"] = fp8_layer_count(*experts)
        if backend_name != "tensorrt" and not options.get("fp8") and row["fp8_layers"]:
            raise AssertionError(f"BF16 row {name!r} runs {row['fp8_layers']} FP8 layers: a previous row leaked")
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row.update(median_s=median, describe=describe)
        if cuda:
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        if ref_dir is not None:
            ref = reference_path(ref_dir, model_spec, preset_name)
            if name == REFERENCE_CONFIG:
                ref.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"latents": latents.detach().float().cpu(), "frames": torch.from_numpy(frames),
                            "params": preset, "device": device}, ref)
            if ref.is_file():
                saved = torch.load(ref, weights_only=True)
                if saved["params"] == preset:
                    row["guard"] = {"reference": REFERENCE_CONFIG, "latent_cosine": torch.nn.functional.cosine_similarity(
                        latents.detach().flatten().float().cpu(), saved["latents"].flatten(), dim=0).item(),
                        "frames_psnr_db": psnr(frames, saved["frames"].numpy())}
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


def spawn_row(model_spec: str, device: str, preset_name: str, config_name: str, repeats: int, warmup: int,
              ref_dir, artifacts: str | None = None, compile_off: bool = False, timeout: float | None = None) -> dict:
    """run_row in a fresh process of this script (same interpreter and environment)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(HERE), "--row", config_name, "--presets", preset_name, "--model", model_spec,
               "--device", device, "--repeats", str(repeats), "--warmup", str(warmup), "--ref-dir", str(ref_dir),
               "--row-out", str(out)]
        cmd += ["--artifacts", artifacts] if artifacts else []
        cmd += ["--compile-off"] if compile_off else []
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"preset": preset_name, "config": config_name, "error": f"timed out after {timeout} s"}
        if r.returncode != 0 or not out.is_file():
            return {"preset": preset_name, "config": config_name,
                    "error": f"row process exited {r.returncode}: {r.stderr[-600:]}"}
        return json.loads(out.read_text())


def cold_start(model: str, device: str, preset_name: str, artifacts: str | None = None,
               extra: tuple[str, ...] = ()) -> dict:
    """A fresh `wanrt generate` process: imports, model load (from artifacts when given), one video."""
    preset = PRESETS[preset_name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "wanrt.cli", "generate", "--model", model, "--image", str(IMAGE),
               "--prompt", "cold start", "--out", str(Path(tmp) / "v.mp4"), "--device", device, *extra]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in preset.items()]
        if artifacts:
            cmd += ["--artifacts", artifacts]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    summary = {}
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
            except ValueError:
                pass
            break
    return {"seconds": seconds, "returncode": r.returncode, "preset": preset_name, "artifacts": artifacts,
            "args": list(extra), "request_timings_s": summary.get("timings_s"),
            "stderr_tail": r.stderr[-500:] if r.returncode else ""}


def vs_diffusers(base_row: dict | None, row: dict) -> float | None:
    """diffusers' total / ours, both without the MP4 encode (diffusers' pipeline writes no video)."""
    if not base_row or "median_s" not in base_row or "median_s" not in row:
        return None
    ours = row["median_s"]["total_s"] - row["median_s"].get("mp4_encode_s", 0.0)
    return base_row["median_s"]["total_s"] / ours if ours > 0 else None


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
                      args.artifacts, args.compile_off)
        Path(args.row_out).write_text(json.dumps(row, default=str))
        return 0

    import torch

    from wanrt.config import Settings

    device = Settings(model=args.model, device=args.device).resolved_device()
    dev_name = device_name(device)
    configs = [c[0] for c in CONFIGS if not args.configs or c[0] in args.configs.split(",")]
    if not args.artifacts:
        configs = [c for c in configs if c != "tensorrt"]
    configs = runnable(configs, device, "bench_e2e")
    # the reference row first, so every other row has something to compare against; the table keeps CONFIGS order
    order = sorted(configs, key=lambda c: c != REFERENCE_CONFIG)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = args.ref_dir or tmp
        for preset_name in presets:
            done = {}
            for name in order:
                row = spawn_row(args.model, args.device, preset_name, name, args.repeats, args.warmup, ref_dir,
                                args.artifacts, args.compile_off)
                done[name] = row
                print(json.dumps({"preset": preset_name, "config": name,
                                  "total_s": row.get("median_s", {}).get("total_s"), "error": row.get("error")}), flush=True)
            rows += [done[name] for name in configs]
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

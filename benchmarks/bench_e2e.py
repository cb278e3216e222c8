#!/usr/bin/env python3
"""End-to-end: diffusers' pipeline vs our eager vs our compiled backend with each switch, in one run.

Configurations are applied in a fixed order so each row shows what one more switch buys (diffusion-fast
style). For each preset: median of --repeats runs after --warmup, per-stage times, peak memory, the loop's
achieved TFLOP/s and % of the FLOP model at BF16 and FP8 peak, and a quality guard against our eager path
(cosine of the final latents, PSNR of the decoded frames). Results go to benchmarks/results/e2e_<device>.json
(+ a markdown table and, with matplotlib, a PNG chart).

    python benchmarks/bench_e2e.py --model tiny                              # CPU smoke run (tiny preset)
    python benchmarks/bench_e2e.py --model random-full --presets fast,default,high_quality   # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_model  # noqa: E402
from bench_runtime import PRESETS, arch_of, device_name  # noqa: E402

CONFIGS = [  # (name, backend, options) in the order the switches are added
    ("diffusers", "diffusers", {}),
    ("eager", "eager", {}),
    ("+fp8", "compiled", dict(fp8=True, compile=False, cudagraphs=False)),
    ("+fp8 +compile", "compiled", dict(fp8=True, compile=True, cudagraphs=False)),
    ("+fp8 +compile +cudagraphs", "compiled", dict(fp8=True, compile=True, cudagraphs=True)),
    ("bf16 +compile +cudagraphs", "compiled", dict(fp8=False, compile=True, cudagraphs=True)),
    ("tensorrt", "tensorrt", {}),  # only with --artifacts and an importable TensorRT
]
GPU_PEAK_KEYS = {"H100": "H100 SXM", "H200": "H200"}


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def decode_frames(model, latents):
    import numpy as np

    from wanrt.runtime.vae import decode_stream, to_uint8_frames

    return np.concatenate([to_uint8_frames(c) for c in decode_stream(model.vae, latents)])


def run_diffusers(model, params, image, device):
    """diffusers' WanImageToVideoPipeline on the same components, latents out, timed by stage where it can be."""
    import torch
    from diffusers import WanImageToVideoPipeline

    from wanrt.runtime.sampler import make_scheduler

    pipe = WanImageToVideoPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                                   scheduler=make_scheduler(model.scheduler_config), image_processor=None,
                                   image_encoder=None, transformer=model.transformer_high,
                                   transformer_2=model.transformer_low, boundary_ratio=model.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    from wanrt.runtime.image import fit_image

    t0 = time.perf_counter()
    latents = pipe(image=fit_image(image, params.width, params.height), prompt=params.prompt,
                   negative_prompt=params.negative_prompt, height=params.height, width=params.width,
                   num_frames=params.frames_generated, num_inference_steps=params.steps,
                   guidance_scale=params.cfg_high_noise, guidance_scale_2=params.cfg_low_noise,
                   generator=torch.Generator("cpu").manual_seed(params.seed), output_type="latent").frames
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    loop_and_encode = time.perf_counter() - t0
    t1 = time.perf_counter()
    frames = decode_frames(model, latents)  # diffusers decodes the whole video at once; same maths
    decode = time.perf_counter() - t1
    return latents, frames, {"diffusers_encode_and_loop_s": loop_and_encode, "vae_decode_s": decode,
                             "total_s": loop_and_encode + decode}


def cold_start(args, preset_name: str) -> dict:
    """A fresh `wanrt generate` process: imports, model load (from artifacts when given), one video."""
    import subprocess

    preset = PRESETS[preset_name]
    image = Path(__file__).resolve().parent.parent / "tests" / "assets" / "first_frame.png"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "wanrt.cli", "generate", "--model", args.model, "--image", str(image),
               "--prompt", "cold start", "--out", str(Path(tmp) / "v.mp4"), "--device", args.device]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in preset.items()]
        if args.artifacts:
            cmd += ["--artifacts", args.artifacts]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "returncode": r.returncode, "preset": preset_name, "artifacts": args.artifacts,
            "stderr_tail": r.stderr[-500:] if r.returncode else ""}


def main(argv=None) -> int:
    import torch
    from PIL import Image

    from wanrt.config import Settings
    from wanrt.model.loading import load_model
    from wanrt.params import GenerateParams
    from wanrt.runtime.backends import make_backend
    from wanrt.runtime.pipeline import WanI2VPipeline

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
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    settings = Settings(model=args.model, device=args.device)
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    presets = (args.presets or ("tiny" if args.model == "tiny" else "fast,default,high_quality")).split(",")
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs.split(",")]
    if not args.artifacts:
        configs = [c for c in configs if c[1] != "tensorrt"]
    model = load_model(args.model, device, dtype)
    image = Image.open(Path(__file__).resolve().parent.parent / "tests" / "assets" / "first_frame.png")
    dev_name = device_name(device)
    peak_key = next((v for k, v in GPU_PEAK_KEYS.items() if k in dev_name), None)
    arch = arch_of(model)
    rows = []

    for preset_name in presets:
        preset = PRESETS[preset_name]
        params = GenerateParams(prompt="a woman turning her head slowly and smiling", **preset)
        reference = None
        for name, backend_name, options in configs:
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = {"preset": preset_name, "config": name, "params": preset}
            try:
                runs, latents, frames, describe = [], None, None, {}
                if backend_name == "diffusers":
                    for i in range(args.warmup + args.repeats):
                        latents, frames, timings = run_diffusers(model, params, image, device)
                        if i >= args.warmup:
                            runs.append(timings)
                else:
                    if backend_name == "tensorrt":
                        options = dict(artifacts=args.artifacts, device=device)
                    backend = make_backend(backend_name, model, **options)
                    pipe = WanI2VPipeline(model, backend, device=device, dtype=dtype)
                    with tempfile.TemporaryDirectory() as tmp:
                        for i in range(args.warmup + args.repeats):
                            result = pipe.generate(params, image, Path(tmp) / "v.mp4", keep_latents=True)
                            if i >= args.warmup:
                                runs.append(result.timings)
                    latents = result.latents
                    frames = decode_frames(model, latents)
                    describe = backend.describe() if hasattr(backend, "describe") else {"backend": backend_name}
                    del backend, pipe
                median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                row.update(median_s=median, describe=describe)
                if name == "eager":
                    reference = (latents, frames)
                if reference is not None:
                    row["guard"] = {"latent_cosine": torch.nn.functional.cosine_similarity(
                        latents.flatten().float(), reference[0].flatten().float(), dim=0).item(),
                        "frames_psnr_db": psnr(frames, reference[1])}
                loop_s = median.get("denoise_high_s", 0) + median.get("denoise_low_s", 0)
                req = flop_model.request_flops(arch=arch, **preset)
                if loop_s:
                    achieved = req["total"] / loop_s / 1e12
                    row["loop_tflops"] = achieved
                    if peak_key:
                        row["loop_pct_of_peak"] = {p: 100 * achieved / v for p, v in flop_model.PEAKS_TFLOPS[peak_key].items() if v}
                        row["projection_s"] = {  # labelled projection: same efficiency on another card's peak
                            card: round(req["total"] / (flop_model.PEAKS_TFLOPS[card]["bf16"] * 1e12 *
                                                        achieved / flop_model.PEAKS_TFLOPS[peak_key]["bf16"])
                                        + median["total_s"] - loop_s, 1)
                            for card in ("RTX 4090", "RTX 3080")}
                if device.startswith("cuda"):
                    row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as e:  # a configuration that cannot run here says why, the others go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("preset", "config") if k in row}
                             | {"total_s": row.get("median_s", {}).get("total_s"), "error": row.get("error")}), flush=True)

    cold = None
    if args.cold_start:
        cold = cold_start(args, presets[0])
        print(f"cold start (process start -> {presets[0]} MP4): {cold['seconds']:.1f} s")

    base = {r["preset"]: r["median_s"]["total_s"] for r in rows if r["config"] == "diffusers" and "median_s" in r}
    lines = [f"device: {dev_name}, model {args.model}, median of {args.repeats} after {args.warmup} warm-up",
             "", "| preset | config | total s | vs diffusers | loop TFLOP/s | % BF16 peak | latent cos | PSNR dB | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['preset']} | {r['config']} | error: {r['error']} |  |  |  |  |  |  |")
            continue
        t = r["median_s"]["total_s"]
        speed = f"{base[r['preset']] / t:.2f}x" if r["preset"] in base else ""
        g = r.get("guard", {})
        lines.append(f"| {r['preset']} | {r['config']} | {t:.3f} | {speed} | {r.get('loop_tflops', 0):.3f} | "
                     f"{r.get('loop_pct_of_peak', {}).get('bf16', float('nan')):.1f} | {g.get('latent_cosine', float('nan')):.5f} | "
                     f"{g.get('frames_psnr_db', float('nan')):.1f} | {r.get('peak_memory_gb') or ''} |")
    table = "\n".join(lines)
    print(table)
    for preset_name in presets:
        if preset_name in flop_model.SEED_TARGETS_S:
            print(f"seed targets for {preset_name}: {flop_model.SEED_TARGETS_S[preset_name]} s "
                  "(projection_s in the JSON: our measured efficiency on those cards' peaks, a projection)")

    slug = dev_name.split()[0].lower() if device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"e2e_{args.model}_{slug}.json"
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
    except ImportError:
        print("matplotlib not installed: no chart")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

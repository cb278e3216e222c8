#!/usr/bin/env python3
"""Per-stage times of one request on the eager backend: text encode, VAE encode, each expert's steps,
VAE decode, MP4 encode; the loop's achieved TFLOP/s from the FLOP model.

    python benchmarks/bench_runtime.py --model tiny --preset tiny            # CPU smoke run
    python benchmarks/bench_runtime.py --model random-full --preset default  # GPU, full-size random BF16

Prints a table (median of --repeats runs after --warmup) and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_model  # noqa: E402

PRESETS = {
    **flop_model.PRESETS,
    "tiny": dict(steps=4, frames=17, width=256, height=256, cfg_high_noise=3.5, cfg_low_noise=3.5),
    # smallest runs (dry runs of gpu_proof on the tiny model): the default and fast presets' shapes of guidance
    "smoke": dict(steps=4, frames=9, width=64, height=64, cfg_high_noise=3.5, cfg_low_noise=3.5),
    "smoke_fast": dict(steps=4, frames=9, width=64, height=64, cfg_high_noise=1.0, cfg_low_noise=1.0),
    # the smallest request the CLI and the API accept (cold-start smoke runs through `wanrt generate`)
    "cli_min": dict(steps=2, frames=16, width=256, height=256, cfg_high_noise=1.0, cfg_low_noise=1.0),
}
STAGES = ["text_encode_s", "vae_encode_s", "denoise_high_s", "denoise_low_s", "vae_decode_s", "mp4_encode_s", "total_s"]


def arch_of(model) -> dict:
    cfg = model.transformer_high.config
    return dict(dim=cfg.num_attention_heads * cfg.attention_head_dim, layers=cfg.num_layers, ffn=cfg.ffn_dim,
                heads=cfg.num_attention_heads, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                text_dim=cfg.text_dim, text_len=model.max_sequence_length, patch=tuple(cfg.patch_size),
                freq_dim=cfg.freq_dim)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main(argv=None) -> int:
    import torch
    from PIL import Image

    from wanrt.config import Settings
    from wanrt.model.loading import load_model
    from wanrt.params import GenerateParams
    from wanrt.runtime.pipeline import WanI2VPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: tiny for the tiny model, else default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/runtime_<model>_<preset>.json)")
    args = ap.parse_args(argv)

    preset_name = args.preset or ("tiny" if args.model == "tiny" else "default")
    preset = PRESETS[preset_name]
    settings = Settings(model=args.model, device=args.device, dtype=args.dtype)
    device, dtype = settings.resolved_device(), settings.resolved_dtype()

    t0 = time.perf_counter()
    model = load_model(args.model, device, dtype)
    load_s = time.perf_counter() - t0
    pipeline = WanI2VPipeline(model, device=device, dtype=dtype)
    params = GenerateParams(prompt="a woman turning her head slowly and smiling", **preset)
    image = Image.open(Path(__file__).resolve().parent.parent / "tests" / "assets" / "first_frame.png")

    runs = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.warmup + args.repeats):
            result = pipeline.generate(params, image, Path(tmp) / f"r{i}.mp4")
            if i >= args.warmup:
                runs.append(result.timings)
    median = {k: statistics.median(r[k] for r in runs) for k in STAGES}

    arch = arch_of(model)
    high = result.steps_per_expert["high"]
    req = flop_model.request_flops(steps_high=high, arch=arch, **preset)
    loop_s = median["denoise_high_s"] + median["denoise_low_s"]
    achieved = req["total"] / loop_s / 1e12 if loop_s > 0 else None
    report = {
        "benchmark": "bench_runtime", "backend": "eager", "model": args.model, "preset": preset_name, "params": preset,
        "device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "load_s": load_s, "repeats": args.repeats, "warmup": args.warmup, "median_s": median, "runs": runs,
        "steps_per_expert": result.steps_per_expert, "loop_tflop": req["total"] / 1e12, "loop_tflops_achieved": achieved,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    for dev, peaks in flop_model.PEAKS_TFLOPS.items():
        if dev.split()[0] in report["device"] and achieved:
            report["loop_fraction_of_peak"] = {p: (achieved / v if v else None) for p, v in peaks.items()}

    print(f"model={args.model} preset={preset_name} device={report['device']} dtype={report['dtype']} "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'stage':<16}{'median s':>10}{'share':>8}")
    for k in STAGES:
        share = median[k] / median["total_s"] if median["total_s"] else 0
        print(f"{k[:-2]:<16}{median[k]:>10.3f}{100 * share:>7.1f}%")
    print(f"loop: {req['total'] / 1e12:.3f} TFLOP in {loop_s:.3f} s = "
          f"{achieved:.3f} TFLOP/s achieved" if achieved else "loop: no time measured")
    if "loop_fraction_of_peak" in report:
        print("fraction of peak:", {k: (round(v, 3) if v else None) for k, v in report["loop_fraction_of_peak"].items()})

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"runtime_{args.model}_{preset_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Which layers can be FP8? Quality guard per configuration: cosine / relative error of an expert's output
with FP8 (e4m3) weights vs the same expert unquantized, on random latents at t = 999, 500, 100.

    python benchmarks/bench_fp8_guard.py                       # tiny model, CPU (weights-only emulation)
    python benchmarks/bench_fp8_guard.py --model random-full   # GPU, full-size random BF16 experts

Weights are quantized and dequantized (activations stay in the compute dtype), so this isolates weight
error; activation FP8 belongs to the compiled backend's guard (benchmarks/bench_e2e.py, GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIGS = {
    "blocks, per-channel (default)": dict(granularity="channel", include=None, exclude=()),
    "blocks, per-tensor": dict(granularity="tensor", include=None, exclude=()),
    "blocks except cross-attn, per-channel": dict(granularity="channel", include=None, exclude=(r"attn2",)),
    "blocks except FFN down, per-channel": dict(granularity="channel", include=None, exclude=(r"ffn\.net\.2",)),
    "every linear incl. embedders + head": dict(granularity="channel", include=r".*", exclude=()),
}


def main(argv=None) -> int:
    import torch

    from wanrt.config import Settings
    from wanrt.engine_build import quantize
    from wanrt.model.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    settings = Settings(model=args.model, device=args.device)
    device = settings.resolved_device()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(args.model, device, dtype)
    size = dict(frames=3, height=16, width=16) if args.model == "tiny" else dict(frames=21, height=80, width=80)
    rows = []
    for expert_name, expert in model.experts.items():
        for name, cfg in CONFIGS.items():
            sd = quantize.quantize_expert(expert, cfg["granularity"], include=cfg["include"] or quantize.DEFAULT_INCLUDE,
                                          exclude=cfg["exclude"], keep_dtype=dtype)
            g = quantize.quality_guard_in_place(expert, sd, **size)  # no room for two 14B copies on one GPU
            rows.append({"expert": expert_name, "config": name, "layers": len(quantize.quantizable_layers(
                expert, cfg["include"] or quantize.DEFAULT_INCLUDE, cfg["exclude"])),
                "cosine": g.cosine, "rel_error": g.rel_error, "passes": g.passes()})
    print(f"{'expert':<6} {'configuration':<40}{'layers':>7}{'cosine':>10}{'rel err':>9}  guard")
    for r in rows:
        print(f"{r['expert']:<6} {r['config']:<40}{r['layers']:>7}{r['cosine']:>10.5f}{r['rel_error']:>9.4f}  "
              f"{'pass' if r['passes'] else 'FAIL'}")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"fp8_guard_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "device": device, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

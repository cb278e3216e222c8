#!/usr/bin/env python3
"""FLOP model of a WAN 2.2 I2V request: linear and attention FLOPs per expert forward, CFG on/off.

Counts multiply-adds as 2 FLOPs, the transformer only (patch embed, 40 blocks, head); the VAE and the text
encoder are left out (they are timed separately). Every GPU timing in benchmarks/ is divided by this to
give achieved TFLOP/s and % of a device's peak.

    python benchmarks/flops.py            # table for the seed's presets at full size
    python benchmarks/flops.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

# The model itself lives in the package (the memory planner projects times from it): one definition.
from wanrt.model.sizes import FLOP_ARCH as A14B
from wanrt.model.sizes import PRESETS, SEED_TARGETS_S, ForwardFlops  # noqa: F401 (re-exported)
from wanrt.model.sizes import forward_flops as _forward_flops
from wanrt.model.sizes import request_flops as _request_flops
from wanrt.runtime.gpus import peaks_by_name

# Published dense tensor-core peaks in TFLOP/s (no sparsity), by card: src/wanrt/runtime/gpus.py.
PEAKS_TFLOPS = peaks_by_name()


def latent_tokens(frames: int, height: int, width: int, patch=(1, 2, 2)) -> int:
    from wanrt.model.sizes import latent_tokens as tokens  # one definition, shared with the memory planner

    return tokens(frames, height, width, patch)


def forward_flops(frames: int, height: int, width: int, arch: dict = A14B) -> ForwardFlops:
    """One expert forward for one sample (batch 1)."""
    return _forward_flops(frames, height, width, arch)


def request_flops(steps: int, frames: int, width: int, height: int, cfg_high_noise: float, cfg_low_noise: float,
                  steps_high: int | None = None, arch: dict = A14B) -> dict:
    """FLOPs of the denoising loop. steps_high: steps on the high-noise expert (default: from the schedule)."""
    if steps_high is None:
        steps_high = split_steps(steps)[0]
    return _request_flops(steps, frames, width, height, cfg_high_noise, cfg_low_noise, steps_high, arch)


def split_steps(steps: int, boundary_ratio: float = 0.9) -> tuple[int, int]:
    """(high, low) steps on the upstream UniPC shift-5 schedule."""
    from wanrt.model.components import UNIPC_SCHEDULER_CONFIG
    from wanrt.runtime.sampler import make_scheduler, plan_steps

    plan = plan_steps(make_scheduler(UNIPC_SCHEDULER_CONFIG), steps, boundary_ratio, 1.0, 1.0)
    high = sum(1 for s in plan if s.expert == "high")
    return high, steps - high


def ideal_seconds(flops: float, device: str, precision: str = "bf16") -> float | None:
    peak = PEAKS_TFLOPS[device][precision]
    return None if peak is None else flops / (peak * 1e12)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the table as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for name, preset in PRESETS.items():
        high, low = split_steps(preset["steps"])
        r = request_flops(**preset, steps_high=high)
        row = {"preset": name, **preset, "steps_high": high, "steps_low": low, "tokens": r["tokens"],
               "forward_tflop": r["forward"]["total"] / 1e12,
               "forward_attention_share": r["forward"]["attention_self"] / r["forward"]["total"],
               "loop_pflop": r["total"] / 1e15,
               "ideal_s": {dev: {prec: (None if ideal_seconds(r["total"], dev, prec) is None
                                        else round(ideal_seconds(r["total"], dev, prec), 2))
                                 for prec in ("bf16", "fp8")} for dev in PEAKS_TFLOPS}}
        rows.append(row)
    print(f"{'preset':<13}{'steps h/l':>10}{'cfg':>9}{'frames':>7}{'tokens':>8}{'fwd TFLOP':>10}{'attn %':>7}"
          f"{'loop PFLOP':>11}{'H100 bf16 s':>12}{'H100 fp8 s':>11}{'4090 bf16 s':>12}{'seed 4090 s':>12}")
    for r in rows:
        print(f"{r['preset']:<13}{r['steps_high']:>5}/{r['steps_low']:<4}{r['cfg_high_noise']:>4}/{r['cfg_low_noise']:<4}"
              f"{r['frames']:>7}{r['tokens']:>8}{r['forward_tflop']:>10.1f}{100 * r['forward_attention_share']:>6.0f}%"
              f"{r['loop_pflop']:>11.2f}{r['ideal_s']['H100 SXM']['bf16']:>12.2f}{r['ideal_s']['H100 SXM']['fp8']:>11.2f}"
              f"{r['ideal_s']['RTX 4090']['bf16']:>12.1f}{SEED_TARGETS_S[r['preset']]['RTX 4090']:>12}")
    print("ideal_s = loop FLOPs / published dense peak: the time at 100% of the tensor cores, loop only.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"arch": A14B, "peaks_tflops": PEAKS_TFLOPS, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

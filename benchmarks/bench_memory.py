#!/usr/bin/env python3
"""Memory tiers: what each tier holds on the device and what it costs in time, measured and projected.

CPU (always): each tier on the tiny model (fp32), forced by the budget that selects it (`--memory auto` with that
budget): the device-memory ledger's peak, seconds per denoising step vs resident, and whether the latents equal
resident's bit for bit.

GPU (when CUDA exists): the same tiers on the full-size model (random weights, BF16; `--model` for real ones)
with the card capped by torch.cuda.set_per_process_memory_fraction to a 24 GB and a 10 GB card: peak allocated
and reserved, the ledger, seconds per step vs resident on the uncapped card, and whether streaming's copies hid
behind compute (late blocks and host waits per step; a step time within a few % of resident's = hidden).

Projection (always): the RTX 4090 and RTX 3080 for the seed's presets, from the FLOP model at an assumed
efficiency plus the host-to-device copies that do not overlap (runtime/memory.py projected_seconds; nothing
measured on a big GPU yet), beside the seed's published times.

    python benchmarks/bench_memory.py                       # CPU rows + projection
    python benchmarks/bench_memory.py --gpu-steps 2         # + GPU rows when CUDA exists
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
TIERS = ("resident", "swap", "stream", "mmap")
CARDS_GIB = {"24 GB card": 24, "10 GB card": 10}


def _image(w: int, h: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)).resize((w, h))


def _step_seconds(result) -> float:
    t = result.timings
    return (t["denoise_high_s"] + t["denoise_low_s"]) / max(1, sum(result.steps_per_expert.values()))


# --------------------------------------------------------------------------------------------- CPU: tiny
def cpu_rows(repeats: int = 3) -> list[dict]:
    """Each tier forced by its budget: the leanest structure's largest phase (every richer tier needs more)."""
    import torch

    from wanrt.config import Settings
    from wanrt.model import sizes
    from wanrt.model.loading import save_single_files
    from wanrt.model.tiny import build_tiny_model
    from wanrt.params import GenerateParams
    from wanrt.runtime.factory import build_runtime
    from wanrt.runtime.memory import ModelBytes, Options, phase_bytes, tiered

    params = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=4)
    bucket = "64x64x9"
    tokens = sizes.bucket_tokens(bucket)
    tiny = build_tiny_model()
    mb = ModelBytes.measure(tiny)
    lean = Options(text_encoder="streamed", vae_resident=False)
    budgets = {"resident": max(phase_bytes(mb, "resident", Options(), tokens, 64, 64).values())}
    for tier in ("swap", "stream"):
        budgets[tier] = max(phase_bytes(mb, tier, lean, tokens, 64, 64).values())
    budgets["mmap"] = budgets["stream"]
    rows, reference, base = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        save_single_files(tiny, Path(tmp))
        for tier in TIERS:
            model = tmp if tier == "mmap" else "tiny"
            host = 2 * mb.stem + mb.text_encoder + mb.vae if tier == "mmap" else None
            pipe = build_runtime(Settings(device="cpu", model=model, warmup=(bucket,)), free_bytes=budgets[tier],
                                 host_bytes=host)
            t = tiered(pipe.backend)
            times, result = [], None
            for _ in range(repeats + 1):  # the first run warms up
                result = pipe.generate(params, _image(64, 64), None)
                times.append(_step_seconds(result))
            step = sorted(times[1:])[len(times[1:]) // 2]
            if reference is None:
                reference, base = result.latents, step
            rows.append({"tier": t.tier, "budget_bytes": budgets[tier], "ledger_peak_bytes": t.ledger.peak,
                         "under_budget": t.ledger.peak <= budgets[tier], "ledger_at_peak": t.ledger.at_peak,
                         "s_per_step": step, "vs_resident": step / base,
                         "bit_identical": bool(torch.equal(result.latents, reference)),
                         "options": t.plan.describe_options()})
    return rows


# --------------------------------------------------------------------------------------------- GPU
def gpu_rows(model: str, steps: int, preset: str) -> list[dict]:
    """Each tier on the full-size model under a 24 GB and a 10 GB cap; resident uncapped as the baseline."""
    import gc

    import torch

    from wanrt.config import Settings
    from wanrt.model.sizes import PRESETS
    from wanrt.params import GenerateParams
    from wanrt.runtime import gpus
    from wanrt.runtime.factory import build_runtime
    from wanrt.runtime.memory import tiered

    total = torch.cuda.get_device_properties(0).total_memory
    req = dict(PRESETS[preset], steps=steps)
    params = GenerateParams(prompt="a cat walking", **req)
    image = _image(params.width, params.height)
    rows, base = [], None
    configs = [("uncapped", None, "resident")] + [(card, gib, tier) for card, gib in CARDS_GIB.items()
                                                  for tier in ("auto", "swap", "stream")]
    for card, gib, tier in configs:
        row = {"card": card, "requested": tier}
        try:
            free = None
            if gib is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, gib * gpus.GiB / total))
                free = int(gib * gpus.GiB) - gpus.CUDA_CONTEXT_BYTES
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            pipe = build_runtime(Settings(model=model, device="cuda", memory=tier, backend="eager"), free_bytes=free)
            t = tiered(pipe.backend)
            pipe.generate(params, image, None)  # warm-up: pins, first copies, kernels
            torch.cuda.reset_peak_memory_stats()
            result = pipe.generate(params, image, None)
            step = _step_seconds(result)
            base = base or step
            streaming = {n: s.describe() for n, s in t.streamers.items()}
            row.update(tier=t.tier, plan_need_gib=round(t.plan.need_bytes / gpus.GiB, 2),
                       peak_allocated_gib=torch.cuda.max_memory_allocated() / gpus.GiB,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / gpus.GiB,
                       ledger_peak_gib=t.ledger.peak / gpus.GiB, s_per_step=step, vs_resident=step / base,
                       late_blocks=sum(s.get("late", 0) for s in streaming.values()),
                       host_waits=sum(s.get("throttled", 0) for s in streaming.values()),
                       transfer_hidden=step <= 1.05 * base, options=t.plan.describe_options())
            del pipe, t
        except Exception as e:  # a tier that does not fit the cap is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- projection
def projection_rows(host_gib: float = 64) -> list[dict]:
    from wanrt.model.sizes import SEED_TARGETS_S
    from wanrt.runtime.memory import plan_for_card

    rows = []
    for card in ("rtx4090", "rtx3080"):
        for preset in ("fast", "default", "high_quality"):
            r = plan_for_card(card, None, host_gib, preset, "fp8")
            t = r["projected_s"]
            rows.append({"card": r["gpu"]["name"], "preset": preset, "tier": r["plan"]["tier"], "fits": r["plan"]["fits"],
                         "options": r["plan_obj"].describe_options(), "peak_gib": r["plan"]["need_gib"],
                         "text_s": t["text_encode_s"], "vae_s": round(t["vae_encode_s"] + t["vae_decode_s"], 1),
                         "loop_s": t["loop_s"], "copies_s": round(sum(v for k, v in t.items() if k.endswith("_exposed_s")
                                                                     or k in ("swap_s", "vae_s")), 2),
                         "projected_s": t["total_s"], "linears": t["linear_precision"],
                         "seed_s": SEED_TARGETS_S[preset][r["gpu"]["name"]]})
    return rows


FORMULA = ("projected s = text + VAE + loop + copies; loop = sum over forwards of (linear FLOPs / (peak_lin x e) + "
           "attention FLOPs / (peak_bf16 x e)), peak_lin = FP8 peak where the card has FP8 GEMMs and the weights are FP8, "
           "else BF16; VAE = VAE FLOPs / (TF32 peak x e_vae); text = UMT5 FLOPs / (BF16 peak x e_text); copies = "
           "host-to-device bytes at 25 GB/s (PCIe 4.0 x16) that do not overlap compute. e = {e}: ASSUMED, nothing "
           "measured on a big GPU yet.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-steps", type=int, default=2, help="denoising steps per GPU row")
    ap.add_argument("--gpu-preset", default="default")
    ap.add_argument("--model", default="random-full", help="GPU rows: the model (random-full: random BF16 weights)")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "memory_tiers.json"))
    args = ap.parse_args(argv)

    import torch

    from wanrt.runtime.memory import ASSUMED_EFFICIENCY

    doc = {"cpu_tiny": cpu_rows(args.repeats), "gpu": None, "projection": projection_rows(),
           "projection_formula": FORMULA.format(e=ASSUMED_EFFICIENCY)}
    print("tiny model, CPU fp32: each tier forced by its budget")
    print(f"{'tier':<10}{'budget B':>10}{'ledger peak B':>15}{'s/step':>9}{'vs resident':>13}{'bit-identical':>15}")
    for r in doc["cpu_tiny"]:
        print(f"{r['tier']:<10}{r['budget_bytes']:>10}{r['ledger_peak_bytes']:>15}{r['s_per_step']:>9.4f}"
              f"{r['vs_resident']:>12.2f}x{str(r['bit_identical']):>15}")
    if torch.cuda.is_available() and not args.no_gpu:
        doc["gpu"] = gpu_rows(args.model, args.gpu_steps, args.gpu_preset)
        print(f"\n{torch.cuda.get_device_name(0)}, {args.model}, preset {args.gpu_preset} at {args.gpu_steps} steps")
        for r in doc["gpu"]:
            print(json.dumps(r))
    else:
        print("\n(no CUDA here: the GPU rows run where it exists)")
    print("\nPROJECTION (not measured): RTX 4090 and RTX 3080, FP8 checkpoint, 64 GB host")
    print(f"{'card':<10}{'preset':<14}{'tier':<8}{'peak GiB':>9}{'loop s':>9}{'VAE s':>7}{'copies s':>9}"
          f"{'total s':>9}{'seed s':>8}  linears")
    for r in doc["projection"]:
        print(f"{r['card']:<10}{r['preset']:<14}{r['tier']:<8}{r['peak_gib']:>9.2f}{r['loop_s']:>9.1f}{r['vae_s']:>7.1f}"
              f"{r['copies_s']:>9.2f}{r['projected_s']:>9.0f}{r['seed_s']:>8}  {r['linears']}")
    print(doc["projection_formula"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What a live preview costs per denoising step: measured on the tiny model, and in the FLOP model at full size.

1. Tiny model, loop only: median seconds per step without and with the preview (runtime/preview.LivePreview).
2. The preview at the full-size latent (640x640x81: 16 x 21 x 80 x 80), on this device: time on the sampling
   thread per step (x0, the 16->3 map; on CUDA the side-stream copy is only queued), and the writer thread's
   encode of the 21-frame WebP (off the sampling thread), and how much that writer leaves the sampling
   thread's Python running (GIL share).
3. FLOP model at full size (benchmarks/flops.py): the preview's FLOPs and bytes per step against one step of
   each preset, as a fraction of the step at the H100's peak (the budget: under 1 %).

    python benchmarks/bench_preview.py                    # CPU: tiny model + projection
    python benchmarks/bench_preview.py --device cuda      # the same on a GPU

Prints a table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_model  # noqa: E402

H100_HBM_BYTES_S = 3.35e12  # H100 SXM HBM3
PCIE_BYTES_S = 25e9  # a conservative pinned device-to-host copy


def preview_cost_model(frames: int, width: int, height: int) -> dict:
    """FLOPs and bytes of one preview: x0 = x - sigma * v (2 FLOP, 3 fp32 tensors touched per element), the
    16 -> 3 map (2 FLOP per multiply-add, + bias, scale, clamp), the uint8 copy to the host."""
    from wanrt.params import frames_to_generate

    f = (frames_to_generate(frames) - 1) // 4 + 1
    pixels = f * (height // 8) * (width // 8)
    elements = 16 * pixels
    flops = 2 * elements + 2 * 16 * 3 * pixels + 5 * 3 * pixels
    device_bytes = 3 * 4 * elements + 4 * elements + 3 * pixels  # x0: read x, v, write x0; map: read x0, write rgb
    return {"latent": [16, f, height // 8, width // 8], "flops": flops, "device_bytes": device_bytes,
            "host_copy_bytes": 3 * pixels}


def run_loop(pipeline, params, preview) -> float:
    """One denoising loop (the sampler, as pipeline.generate runs it, on random conditions: no text or VAE
    encode to wait for); seconds per step, the preview's writer closed (its last step written) inside the time."""
    import torch

    from wanrt.runtime import sampler as sampling

    model, device = pipeline.model, pipeline.device
    scheduler = sampling.make_scheduler(model.scheduler_config)
    plan = sampling.plan_steps(scheduler, params.steps, model.boundary_ratio, params.cfg_high_noise,
                               params.cfg_low_noise, device=device)
    latents = pipeline.initial_noise(params)
    condition = torch.randn(1, 20, *latents.shape[2:], generator=torch.Generator().manual_seed(0)).to(device)
    text_dim = model.transformer_high.config.text_dim
    context = torch.randn(2, model.max_sequence_length, text_dim).to(device, pipeline.dtype)
    on_x0 = None if preview is None else (lambda step, x0: preview(step.index, len(plan), x0))
    t0, c0 = time.perf_counter(), time.process_time()
    sampling.sample(pipeline.backend, scheduler, plan, latents, condition, context[:1], context[1:], pipeline.dtype,
                    on_x0=on_x0)
    if preview is not None:
        preview.close()  # the last step's encode counts too
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / params.steps, (time.process_time() - c0) / params.steps


def time_loops(pipeline, params, make_preview, repeats: int) -> dict:
    """Seconds per step without and with the preview, interleaved (a shared machine's load then hits both
    alike); median and min over `repeats` pairs after one warm-up pair."""
    per_step: dict[str, list[float]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}
    extra: dict = {}
    for i in range(repeats + 1):
        for kind in ("without", "with"):
            preview = make_preview() if kind == "with" else None
            step_s, cpu_s = run_loop(pipeline, params, preview)
            if preview is not None:
                extra = {"hook_s_per_step": preview.hook_s / params.steps,
                         "hook_cpu_s_per_step": preview.hook_cpu_s / params.steps,
                         "encode_s_per_write": preview.encode_s / max(1, preview.written),
                         "encode_cpu_s_per_write": preview.encode_cpu_s / max(1, preview.written),
                         "written": preview.written, "dropped": preview.dropped, "webp_bytes": preview.last_bytes}
            if i:  # the first pair warms up
                per_step[kind].append(step_s)
                cpu[kind].append(cpu_s)
    out = {f"step_s_{stat}{'' if kind == 'without' else '_with_preview'}": fn(per_step[kind])
           for kind in per_step for stat, fn in (("median", statistics.median), ("min", min))}
    out["overhead_pct_median"] = 100 * (out["step_s_median_with_preview"] / out["step_s_median"] - 1)
    out["overhead_pct_min"] = 100 * (out["step_s_min_with_preview"] / out["step_s_min"] - 1)
    out["step_cpu_s_median"] = statistics.median(cpu["without"])
    out["step_cpu_s_median_with_preview"] = statistics.median(cpu["with"])
    return out | extra


def gil_share(encode, seconds: float = 0.6) -> float:
    """How much pure-Python work the main thread gets done while `encode` runs in a loop on another thread
    (1.0: the encoder releases the GIL; 0.5: they take turns)."""
    def count(stop_at: float) -> int:
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
        return n

    alone = count(time.perf_counter() + seconds)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            encode()

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    time.sleep(0.05)
    shared = count(time.perf_counter() + seconds)
    stop.set()
    t.join()
    return shared / alone


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/preview_tiny_<device>.json)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from wanrt.model.loading import load_model
    from wanrt.params import GenerateParams
    from wanrt.runtime.pipeline import WanI2VPipeline
    from wanrt.runtime.preview import LivePreview, encode_webp, latent_to_rgb

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    tmp = Path(tempfile.mkdtemp(prefix="wanrt-preview-bench-"))
    report: dict = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
                    "torch_threads": torch.get_num_threads()}

    # 1. tiny model, loop only, with and without the preview
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline = WanI2VPipeline(load_model("tiny", device, dtype), device=device, dtype=dtype)
    rows = []
    for name, shape in (("256x256x17", dict(width=256, height=256, frames=17)),
                        ("256x256x81", dict(width=256, height=256, frames=81))):
        params = GenerateParams(prompt="bench", steps=args.steps, seed=1, **shape)
        r = time_loops(pipeline, params, lambda: LivePreview(tmp / "p.webp"), args.repeats)
        rows.append({"shape": name, "steps": args.steps, **r})
    report["tiny"] = rows

    # 2. the preview alone at the full-size latent, on this device
    x = torch.randn(1, 16, 21, 80, 80, device=device)
    v = torch.randn_like(x)
    preview = LivePreview(tmp / "full.webp")
    hook, hook_cpu = [], []
    for i in range(6):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.thread_time()
        x0 = x - 0.5 * v  # what the sampler adds per step
        preview(i, 6, x0)
        hook.append(time.perf_counter() - t0)
        hook_cpu.append(time.thread_time() - c0)
        preview.flush()
    preview.close()
    frames = latent_to_rgb(x0).cpu().numpy()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(3):
        data = encode_webp(frames)
    encode_s, encode_cpu_s = (time.perf_counter() - t0) / 3, (time.thread_time() - c0) / 3
    gpu_s = None
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            rgb = latent_to_rgb(x - 0.5 * v)
            host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        gpu_s = start.elapsed_time(end) / 1000 / 20
    report["full_latent"] = {"hook_s_median": statistics.median(hook[1:]),
                             "hook_cpu_s_median": statistics.median(hook_cpu[1:]), "device_s_per_preview": gpu_s,
                             "writer_encode_s": encode_s, "writer_encode_cpu_s": encode_cpu_s, "webp_bytes": len(data),
                             "gil_share_while_encoding": gil_share(lambda: encode_webp(frames)),
                             "frames_rgb_bytes": int(np.prod(frames.shape))}

    # 3. the FLOP model at full size
    peak = flop_model.PEAKS_TFLOPS["H100 SXM"]["bf16"] * 1e12
    proj = []
    for name, preset in flop_model.PRESETS.items():
        fwd = flop_model.forward_flops(preset["frames"], preset["height"], preset["width"]).total
        c = preview_cost_model(preset["frames"], preset["width"], preset["height"])
        batch = 2 if preset["cfg_high_noise"] > 1 else 1
        step_flops = fwd * batch
        step_s = step_flops / peak  # at peak: the step can only be slower, the share only smaller
        preview_s = c["device_bytes"] / H100_HBM_BYTES_S + c["flops"] / peak  # memory-bound: bytes dominate
        proj.append({"preset": name, "latent": c["latent"], "step_pflop": step_flops / 1e15, "step_s_at_peak": step_s,
                     "preview_mflop": c["flops"] / 1e6, "preview_flop_share": c["flops"] / step_flops,
                     "preview_device_s": preview_s, "preview_time_share_pct": 100 * preview_s / step_s,
                     "host_copy_kb": c["host_copy_bytes"] / 1024,
                     "host_copy_s": c["host_copy_bytes"] / PCIE_BYTES_S})
    report["full_size_projection_h100"] = proj

    print(f"device: {report['device']}")
    print("tiny model, per step: wall ms median (min), process CPU ms median; the preview's own CPU ms on the "
          "sampling thread and per written WebP")
    print(f"{'shape':<12}{'steps':>6}{'wall':>15}{'wall+preview':>16}{'overhead':>10}{'CPU':>8}{'CPU+prev':>10}"
          f"{'hook CPU':>10}{'encode CPU':>12}{'written':>9}")
    for r in rows:
        print(f"{r['shape']:<12}{r['steps']:>6}{1e3 * r['step_s_median']:>8.1f} ({1e3 * r['step_s_min']:.1f})"
              f"{1e3 * r['step_s_median_with_preview']:>9.1f} ({1e3 * r['step_s_min_with_preview']:.1f})"
              f"{r['overhead_pct_median']:>9.1f}%{1e3 * r['step_cpu_s_median']:>8.1f}"
              f"{1e3 * r['step_cpu_s_median_with_preview']:>10.1f}{1e3 * r['hook_cpu_s_per_step']:>10.2f}"
              f"{1e3 * r['encode_cpu_s_per_write']:>12.1f}{r['written']:>6}/{r['written'] + r['dropped']}")
    f = report["full_latent"]
    print(f"full-size latent on {device}: sampling thread {1e3 * f['hook_s_median']:.2f} ms/step "
          f"({1e3 * f['hook_cpu_s_median']:.2f} ms CPU)"
          + (f", device {1e6 * f['device_s_per_preview']:.0f} us" if f["device_s_per_preview"] else "")
          + f"; writer encode {1e3 * f['writer_encode_s']:.0f} ms ({1e3 * f['writer_encode_cpu_s']:.0f} ms CPU,"
          f" {f['webp_bytes'] / 1024:.0f} KB WebP),"
          f" sampling thread keeps {100 * f['gil_share_while_encoding']:.0f}% of its Python speed meanwhile")
    print(f"{'FLOP model (H100)':<14}{'latent':>16}{'step PFLOP':>11}{'step s@peak':>12}{'preview MFLOP':>14}"
          f"{'preview us':>11}{'share':>10}{'copy KB':>9}")
    for p in proj:
        print(f"{p['preset']:<14}{'x'.join(map(str, p['latent'])):>16}{p['step_pflop']:>11.2f}{p['step_s_at_peak']:>12.2f}"
              f"{p['preview_mflop']:>14.1f}{1e6 * p['preview_device_s']:>11.1f}{p['preview_time_share_pct']:>9.4f}%"
              f"{p['host_copy_kb']:>9.0f}")
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"preview_tiny_{'cuda' if device.startswith('cuda') else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    assert all(p["preview_time_share_pct"] < 1.0 for p in proj), "preview over 1 % of a step"
    return 0


if __name__ == "__main__":
    sys.exit(main())

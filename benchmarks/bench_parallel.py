#!/usr/bin/env python3
"""Worker groups: what Ulysses + CFG parallelism should buy on 2/4/8 H100s (a projection), and what the
collectives cost on CPU over gloo for the tiny model (measured).

No multi-GPU machine was available: the GPU numbers are a model, not a measurement.

1. Communication model, per rank, at the seed's sizes (640x640; 81 frames = 33,600 tokens; dim 5120, 40 layers,
   bf16): per self-attention layer one all-to-all of q/k/v and one of the output (each rank sends (N-1)/N of its
   local tokens' q, k, v and attention output), per forward one gather of the projected output (64 values per
   token) and, with CFG parallelism, one gather of the velocity across the halves; per step rank 0 broadcasts
   the latents, the timestep and the text context. Times at NVLink (450 GB/s per GPU and direction, H100 SXM)
   and PCIe 4.0 x16 (25 GB/s), with no overlap of communication and compute (the all-to-alls sit on the
   critical path).
2. Compute per rank from benchmarks/flops.py's FLOP model: everything per token splits N ways (self-attention
   by heads), while the text embedding and the cross-attention k/v projections of the 512-token context are
   repeated on every rank; padding to a multiple of N is counted. Time = FLOPs / (989 TFLOP/s bf16 x --mfu).
3. Layouts as the runtime picks them: cfg > 1 on an even group: CFG-2 x Ulysses-N/2 (one row per half);
   otherwise Ulysses-N. The projected speed-up is of the denoising loop; the "request" column adds a VAE decode
   + text encode that stay on rank 0, at --serial-share of the 1-GPU request (DESIGN: the VAE is ~20%).
4. Measured on this CPU (gloo, the built-in tiny model, 2 heads): one forward on 1 rank vs 2 ranks (1 thread
   each), and the same forward's collectives alone.

    python benchmarks/bench_parallel.py                 # model + CPU measurement
    python benchmarks/bench_parallel.py --no-measure    # model only (no processes started)

Prints tables and writes JSON to benchmarks/results/bench_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_model  # noqa: E402

LINKS = {"nvlink": 450e9, "pcie4": 25e9}  # bytes/s per GPU and direction
BF16 = 2
GROUP_SIZES = (2, 4, 8)
NOTE = ("PROJECTION: no multi-GPU machine was available; GPU numbers come from a FLOP model and a bandwidth "
        "model, not from a measurement. The CPU numbers are measured (gloo, tiny model).")


# ------------------------------------------------------------------------------------------------ model
def layout(n: int, cfg: float) -> dict:
    """What the runtime runs for a batch on n ranks: CFG halves when cfg > 1 and n is even, else Ulysses-n."""
    batch = 2 if cfg > 1 else 1
    if batch == 2 and n % 2 == 0:
        return {"name": f"cfg-2 x ulysses-{n // 2}", "ulysses": n // 2, "rows": 1, "cfg_split": True, "batch": 2}
    return {"name": f"ulysses-{n}", "ulysses": n, "rows": batch, "cfg_split": False, "batch": batch}


def comm_per_step(tokens: int, n: int, cfg: float, arch: dict = flop_model.A14B) -> dict:
    """Bytes one rank receives (= sends) in one denoising step (one expert forward)."""
    lay = layout(n, cfg)
    u, rows = lay["ulysses"], lay["rows"]
    d, layers = arch["dim"], arch["layers"]
    patch_volume = arch["patch"][0] * arch["patch"][1] * arch["patch"][2]
    out_per_token = arch["out_channels"] * patch_volume
    padded = -(-tokens // u) * u
    local = padded // u
    a2a_layer = 4 * rows * local * d * BF16 * (u - 1) / u  # q, k, v then the output: (u-1)/u of local data leaves
    gather = rows * local * (u - 1) * out_per_token * BF16  # the projected output, once per forward
    cfg_gather = tokens * out_per_token * BF16 if lay["cfg_split"] else 0  # the other half's velocity row
    latent_in = lay["batch"] * tokens * patch_volume * arch["in_channels"] * BF16
    context = lay["batch"] * arch["text_len"] * arch["text_dim"] * BF16
    broadcast = latent_in + context  # rank 0 -> every rank, once per step
    total = layers * a2a_layer + gather + cfg_gather + broadcast
    return {"layout": lay["name"], "padded_tokens": padded, "a2a_bytes_per_layer": a2a_layer,
            "a2a_bytes_per_step": layers * a2a_layer, "gather_bytes": gather, "cfg_gather_bytes": cfg_gather,
            "broadcast_bytes": broadcast, "bytes_per_step": total,
            "seconds_per_step": {link: total / bw for link, bw in LINKS.items()}}


def compute_per_step(frames: int, width: int, height: int, n: int, cfg: float, arch: dict = flop_model.A14B) -> dict:
    """FLOPs one rank runs in one step; the part repeated on every rank is the text side of cross-attention."""
    fwd = flop_model.forward_flops(frames, height, width, arch)
    d, lt = arch["dim"], arch["text_len"]
    repeated = arch["layers"] * 2 * lt * d * d * 2 + 2 * lt * (arch["text_dim"] * d + d * d)
    lay = layout(n, cfg)
    u = lay["ulysses"]
    padded = -(-fwd.tokens // u) * u
    per_rank = lay["rows"] * ((fwd.total - repeated) * padded / fwd.tokens / u + repeated)
    return {"flops_one_gpu": lay["batch"] * fwd.total, "flops_per_rank": per_rank, "tokens": fwd.tokens,
            "repeated_share": repeated / fwd.total}


def project(mfu: float, serial_share: float, device: str = "H100 SXM") -> list[dict]:
    peak = flop_model.PEAKS_TFLOPS[device]["bf16"] * 1e12 * mfu
    rows = []
    for name, p in flop_model.PRESETS.items():
        steps_high, steps_low = flop_model.split_steps(p["steps"])
        plan = [(steps_high, p["cfg_high_noise"]), (steps_low, p["cfg_low_noise"])]
        one_gpu = sum(k * compute_per_step(p["frames"], p["width"], p["height"], 1, cfg)["flops_one_gpu"] / peak
                      for k, cfg in plan)
        for n in GROUP_SIZES:
            comm = {link: 0.0 for link in LINKS}
            compute = 0.0
            for k, cfg in plan:
                c = compute_per_step(p["frames"], p["width"], p["height"], n, cfg)
                m = comm_per_step(c["tokens"], n, cfg)
                compute += k * c["flops_per_rank"] / peak
                for link in LINKS:
                    comm[link] += k * m["seconds_per_step"][link]
            m = comm_per_step(c["tokens"], n, p["cfg_high_noise"])
            row = {"preset": name, "tokens": c["tokens"], "gpus": n, "layout": m["layout"], "steps": p["steps"],
                   "a2a_mb_per_layer": m["a2a_bytes_per_layer"] / 1e6, "mb_per_step": m["bytes_per_step"] / 1e6,
                   "loop_s_one_gpu": one_gpu, "compute_s": compute,
                   "repeated_share": c["repeated_share"]}
            for link in LINKS:
                loop = compute + comm[link]
                serial = serial_share / (1 - serial_share) * one_gpu  # VAE decode + text encode, on rank 0 only
                row[f"comm_s_{link}"] = comm[link]
                row[f"comm_ms_per_step_{link}"] = 1e3 * m["seconds_per_step"][link]
                row[f"loop_s_{link}"] = loop
                row[f"speedup_{link}"] = one_gpu / loop
                row[f"request_speedup_{link}"] = (one_gpu + serial) / (loop + serial)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ CPU measurement
SHAPES = [(64, 64, 9), (256, 256, 17)]  # 48 and 1,280 tokens on the tiny model


def _median_s(fn, repeats: int) -> float:
    fn()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_rank(rank, world, port, repeats, results):
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from wanrt.config import Settings
    from wanrt.runtime.factory import build_runtime
    from wanrt.runtime.parallel import ParallelBackend

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    pipe = build_runtime(Settings(model="tiny", device="cpu"))
    cfg = pipe.model.transformer_high.config
    group = ParallelBackend(pipe.backend, device="cpu")
    rows = []
    if rank == 0:
        g = torch.Generator().manual_seed(0)
        for w, h, f in SHAPES:
            for batch in (1, 2):
                x = torch.randn(batch, 36, (f - 1) // 4 + 1, h // 8, w // 8, generator=g)
                t = torch.full((batch,), 900, dtype=torch.int64)
                ctx = torch.randn(batch, 512, cfg.text_dim, generator=g)
                with torch.inference_mode():
                    one = _median_s(lambda x=x, t=t, c=ctx: pipe.backend.denoise("high", x, t, c), repeats)
                    two = _median_s(lambda x=x, t=t, c=ctx: group.denoise("high", x, t, c), repeats)
                rows.append({"shape": f"{w}x{h}x{f}", "tokens": x.shape[2] * (h // 16) * (w // 16), "batch": batch,
                             "layout": (group._cfg if batch == 2 else group._plain).name,
                             "one_rank_ms": 1e3 * one, "two_ranks_ms": 1e3 * two})
        group.close()
    else:
        group.follow()

    # The collectives of one forward alone (same sizes, no compute), both ranks in step.
    heads, head_dim, layers = cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers
    out_ch = cfg.out_channels * 4
    comm = []
    for w, h, f in SHAPES:
        tokens = ((f - 1) // 4 + 1) * (h // 16) * (w // 16)
        local = -(-tokens // world)

        def collectives(local=local):
            for _ in range(layers):
                qkv = torch.ones(world, 3, 1, local, heads // world, head_dim)  # as the processor lays them out
                funcol.all_to_all_single(qkv, None, None, dist.group.WORLD).wait()
                out = torch.ones(world, 1, local, heads // world, head_dim)
                funcol.all_to_all_single(out, None, None, dist.group.WORLD).wait()
            funcol.all_gather_single(torch.ones(1, local, out_ch), 1, dist.group.WORLD).wait()

        with torch.inference_mode():
            s = _median_s(collectives, repeats)
        comm.append({"shape": f"{w}x{h}x{f}", "tokens": tokens, "collectives": 2 * layers + 1, "comm_only_ms": 1e3 * s})
    if rank == 0:
        results.put({"forward": rows, "comm": comm, "layers": layers, "heads": heads})
    dist.destroy_process_group()


def measure_cpu(repeats: int) -> dict:
    import multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from wanrt.jobs.group import PRELOAD, _free_port

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_bench_rank, args=(r, 2, port, repeats, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"bench ranks exited with {[p.exitcode for p in procs]}")
    return results.get()


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfu", type=float, default=0.5, help="assumed share of the bf16 peak the forward reaches")
    ap.add_argument("--serial-share", type=float, default=0.2,
                    help="share of a 1-GPU request spent outside the loop (VAE decode, text encode): not split")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-measure", action="store_true", help="the model only; start no processes")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_parallel.json"))
    args = ap.parse_args(argv)

    print(NOTE)
    rows = project(args.mfu, args.serial_share)
    print(f"\nProjected, WAN 2.2 A14B bf16 on H100 SXM at {args.mfu:.0%} MFU, 640x640 (per rank, per step; "
          f"loop = denoising steps; request adds a {args.serial_share:.0%} serial share):")
    print(f"{'preset':<13}{'tokens':>7}{'GPUs':>5}  {'layout':<20}{'a2a MB/layer':>13}{'MB/step':>9}"
          f"{'NVL ms/st':>10}{'PCIe ms/st':>11}{'loop 1 GPU s':>13}{'loop NVL s':>11}{'x NVL':>7}{'x PCIe':>7}"
          f"{'req x NVL':>10}")
    for r in rows:
        print(f"{r['preset']:<13}{r['tokens']:>7}{r['gpus']:>5}  {r['layout']:<20}{r['a2a_mb_per_layer']:>13.1f}"
              f"{r['mb_per_step']:>9.0f}{r['comm_ms_per_step_nvlink']:>10.1f}{r['comm_ms_per_step_pcie4']:>11.0f}"
              f"{r['loop_s_one_gpu']:>13.2f}{r['loop_s_nvlink']:>11.2f}{r['speedup_nvlink']:>7.2f}"
              f"{r['speedup_pcie4']:>7.2f}{r['request_speedup_nvlink']:>10.2f}")
    print("a2a MB/layer and ms/step: the first expert's layout (fast: cfg 1, so Ulysses over every GPU).")

    measured = None
    if not args.no_measure:
        measured = measure_cpu(args.repeats)
        print(f"\nMeasured on this CPU ({platform.processor() or platform.machine()}), gloo, tiny model "
              f"({measured['layers']} layers, {measured['heads']} heads), median of {args.repeats}:")
        print(f"{'shape':<13}{'tokens':>7}{'batch':>6}  {'layout':<20}{'1 rank ms':>10}{'2 ranks ms':>11}")
        for r in measured["forward"]:
            print(f"{r['shape']:<13}{r['tokens']:>7}{r['batch']:>6}  {r['layout']:<20}{r['one_rank_ms']:>10.2f}"
                  f"{r['two_ranks_ms']:>11.2f}")
        print(f"{'shape':<13}{'tokens':>7}{'collectives':>12}{'comm only ms':>14}")
        for r in measured["comm"]:
            print(f"{r['shape']:<13}{r['tokens']:>7}{r['collectives']:>12}{r['comm_only_ms']:>14.2f}")
        print("2 ranks include rank 0's broadcast of the call (header + 3 tensors) and the gathers; 1 thread per rank.")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"note": NOTE, "assumptions": {"mfu": args.mfu, "serial_share": args.serial_share,
                                                             "links_bytes_per_s": LINKS, "dtype": "bf16",
                                                             "arch": flop_model.A14B, "device": "H100 SXM"},
                               "projection": rows, "measured_cpu": measured,
                               "machine": {"platform": platform.platform(), "python": platform.python_version()}},
                              indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

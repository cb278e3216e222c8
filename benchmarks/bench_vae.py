#!/usr/bin/env python3
"""The VAE decode's precision and the MP4 writer thread (settings.vae_dtype, runtime/vae.py, runtime/video.py).

1. Decode only: seconds to decode the latents to uint8 frames in fp32 and in bf16 (on CUDA: bf16 with
   channels_last_3d + cudnn.benchmark, the `auto` setting, and bf16 in the default layout for comparison), and
   each format's frame PSNR against fp32 (the gate: above 40 dB).
2. Decode + H.264, as WanI2VPipeline.generate runs it: the synchronous writer (encode between decode chunks)
   against the writer thread (ThreadedMp4Writer: the next chunk decodes while this one encodes). Decode and
   encode seconds as the pipeline reports them, and the total; the MP4s are compared byte for byte.

Medians of --repeats runs after one warm-up run (which also lets cudnn.benchmark pick its kernels); the two
writer variants run interleaved so that a shared machine's load hits both alike.

    python benchmarks/bench_vae.py                                     # tiny model, CPU (a small random VAE)
    python benchmarks/bench_vae.py --model random-full --device cuda   # Wan 2.1's VAE shape, random weights
    python benchmarks/bench_vae.py --model /path/to/Wan2.2-I2V-A14B-Diffusers --device cuda   # the real VAE

Only real weights give the PSNR that matters: the tiny and random-full VAEs are randomly initialised. Latents:
the tiny model's own denoising loop (`--latents loop`, default for tiny) or seeded N(0, 1) normalised latents.
Prints a table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def load_vae(spec: str, device: str):
    """(vae, tiny model or None). random-full: Wan 2.1's VAE at its real size, random weights (what
    load_model('random-full') builds for its VAE, without the two 14B experts)."""
    if spec == "tiny":
        from wanrt.model.tiny import build_tiny_model

        model = build_tiny_model().to(device)
        return model.vae, model
    from diffusers import AutoencoderKLWan

    if spec == "random-full":
        torch.manual_seed(0)
        return AutoencoderKLWan().to(device).eval().requires_grad_(False), None
    path = Path(spec).expanduser()
    vae_dir = path / "vae" if (path / "vae").is_dir() else path
    return AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=torch.float32).to(device).eval(), None


def make_latents(args, vae, model, device) -> torch.Tensor:
    lat_f, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    if args.latents == "loop" and model is not None:
        from PIL import Image

        from wanrt.params import GenerateParams
        from wanrt.runtime.pipeline import WanI2VPipeline

        rng = np.random.default_rng(0)
        small = rng.integers(0, 255, (args.height // 8, args.width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((args.width, args.height), Image.Resampling.BILINEAR)
        params = GenerateParams(prompt="a dog nodding", width=args.width, height=args.height, frames=args.frames,
                                steps=2, seed=5)
        return WanI2VPipeline(model, device=device).generate(params, image, None).latents
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, vae.config.z_dim, lat_f, lat_h, lat_w, generator=g).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode_frames(vae, latents, fmt) -> np.ndarray:
    from wanrt.runtime.vae import decode_stream, to_uint8_frames

    return np.concatenate([to_uint8_frames(c) for c in decode_stream(vae, latents, fmt)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def decode_to_mp4(vae, latents, fmt, path: Path, fps: int, queue_chunks: int) -> dict:
    """WanI2VPipeline.generate's decode section: decode chunk by chunk into the MP4 writer (queue_chunks 0:
    synchronous). Seconds: decode (this thread), encode (the writer's), total."""
    from wanrt.runtime.vae import decode_stream, to_uint8_frames
    from wanrt.runtime.video import Mp4Writer, ThreadedMp4Writer

    _, _, _, h, w = latents.shape
    t_start = time.perf_counter()
    size = (path, w * 8, h * 8, fps)
    writer = ThreadedMp4Writer(*size, queue_chunks=queue_chunks) if queue_chunks else Mp4Writer(*size)
    decode_s = 0.0
    chunks = decode_stream(vae, latents, fmt)
    try:
        t0 = time.perf_counter()
        for chunk in chunks:
            frames = to_uint8_frames(chunk)
            decode_s += time.perf_counter() - t0
            writer.write(frames)
            t0 = time.perf_counter()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        chunks.close()
    return {"decode_s": decode_s, "encode_s": writer.encode_s, "total_s": time.perf_counter() - t_start,
            "frames": writer.frames_written}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, random-full or a diffusers directory (its vae/)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=None, help="default: 128 (tiny), 832 (others)")
    ap.add_argument("--height", type=int, default=None, help="default: 128 (tiny), 480 (others)")
    ap.add_argument("--frames", type=int, default=None, help="4k+1; default: 17 (tiny), 81 (others)")
    ap.add_argument("--fps", type=int, default=16)
    ap.add_argument("--latents", choices=("loop", "random"), default=None,
                    help="the tiny model's loop output (default for tiny) or N(0,1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON path (default: results/vae_<model>_<device>.json)")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    args.width = args.width or (128 if tiny else 832)
    args.height = args.height or (128 if tiny else 480)
    args.frames = args.frames or (17 if tiny else 81)
    args.latents = args.latents or ("loop" if tiny else "random")
    if args.threads:
        torch.set_num_threads(args.threads)

    from wanrt.runtime.vae import DecodeFormat, decode_format

    device = torch.device(args.device)
    vae, model = load_vae(args.model, str(device))
    latents = make_latents(args, vae, model, device)
    formats = {"fp32": decode_format(device, "fp32"), "bf16": decode_format(device, "bf16")}
    if device.type == "cuda":  # what channels_last_3d + cudnn.benchmark add on top of bf16
        formats["bf16 default layout"] = DecodeFormat(torch.bfloat16)
    auto = decode_format(device, "auto", vae.dtype)

    # 1. decode only
    decode_rows, ref = {}, None
    for name, fmt in formats.items():
        decode_frames(vae, latents, fmt)  # warm-up (cudnn.benchmark's search)
        times = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            frames = decode_frames(vae, latents, fmt)
            times.append(time.perf_counter() - t0)
        ref = frames if ref is None else ref
        decode_rows[name] = {"dtype": str(fmt.dtype).removeprefix("torch."), "channels_last": fmt.channels_last,
                             "cudnn_benchmark": fmt.cudnn_benchmark, "median_s": statistics.median(times),
                             "runs_s": times, "psnr_vs_fp32_db": psnr(ref, frames)}

    # 2. decode + H.264: synchronous writer vs the writer thread, in the `auto` format, interleaved
    writer_runs: dict[str, list[dict]] = {"sync": [], "threaded": []}
    blobs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats + 1):
            for name, queue_chunks in (("sync", 0), ("threaded", 2)):
                path = Path(tmp) / f"{name}.mp4"
                run = decode_to_mp4(vae, latents, auto, path, args.fps, queue_chunks)
                blobs[name] = path.read_bytes()
                if i > 0:  # run 0 warms up
                    writer_runs[name].append(run)
    writer_rows = {name: {**median_of(runs), "frames": runs[0]["frames"], "runs": runs}
                   for name, runs in writer_runs.items()}
    s, t = writer_rows["sync"], writer_rows["threaded"]

    report = {
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "size": {"width": args.width, "height": args.height, "frames": args.frames, "latent": list(latents.shape)},
        "latents": args.latents, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
        "versions": {"torch": torch.__version__, "diffusers": _version("diffusers"), "av": _version("av")},
        "decode": decode_rows,
        "auto_format": {"dtype": str(auto.dtype).removeprefix("torch."), "channels_last": auto.channels_last},
        "writer": writer_rows,
        "writer_same_bytes": blobs["sync"] == blobs["threaded"],
        "threaded_saves_s": s["total_s"] - t["total_s"],
        "note": "PSNR of uint8 frames against the fp32 decode; tiny and random-full VAEs are random, only real "
                "weights give the figure that matters",
    }
    out = Path(args.out) if args.out else RESULTS / f"vae_{Path(args.model).name}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")
    return report


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def print_table(r: dict) -> None:
    size = r["size"]
    print(f"VAE decode, {r['model']} on {r['device']} ({r['device_name']}), {size['width']}x{size['height']}x"
          f"{size['frames']}, latents: {r['latents']}, medians of {r['repeats']}")
    print(f"{'format':<22}{'decode s':>10}{'PSNR vs fp32 dB':>18}")
    for name, row in r["decode"].items():
        print(f"{name:<22}{row['median_s']:>10.3f}{row['psnr_vs_fp32_db']:>18.2f}")
    print(f"\ndecode + H.264 ({r['auto_format']['dtype']}{', channels_last_3d' if r['auto_format']['channels_last'] else ''})")
    print(f"{'writer':<22}{'decode s':>10}{'encode s':>10}{'total s':>10}")
    for name, row in r["writer"].items():
        print(f"{name:<22}{row['decode_s']:>10.3f}{row['encode_s']:>10.3f}{row['total_s']:>10.3f}")
    print(f"threaded saves {r['threaded_saves_s']:.3f} s; same MP4 bytes: {r['writer_same_bytes']}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

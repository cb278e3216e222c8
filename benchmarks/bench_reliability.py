#!/usr/bin/env python3
"""Reliability figures on real parts (tiny model, CPU): crash/kill -9 rounds, restart with queued jobs,
load from concurrent pollers, schema-driven fuzzing, hostile images (issue 12). Prints a table and writes JSON.

    python benchmarks/bench_reliability.py            # the issue's sizes: 20 crashes, 50 jobs, 200 pollers x 60 s
    python benchmarks/bench_reliability.py --quick    # small sizes (a couple of minutes)
    python benchmarks/bench_reliability.py --only hostile_images   # one scenario (about 30 s)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]


# ------------------------------------------------------------------------------------------- hostile images
def _module_at(ref: str, path: str, name: str, tmp: Path):
    """`path` as it was at git `ref`, imported as `name` (the "before" of a before/after figure), or None."""
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    file = tmp / f"{name}.py"
    file.write_text(r.stdout)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rss_kb(key: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _peak_rss(fn, *args) -> dict:
    """Resident memory of this process before, at the peak during, and after fn() (MB). Linux: the peak (VmHWM)
    is reset through /proc/self/clear_refs. tracemalloc would not do: Pillow allocates pixels outside Python's
    allocator, so its peak says nothing about images."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kb()
    fn(*args)
    return {"before_mb": before / 1024, "peak_mb": _rss_kb("VmHWM") / 1024, "after_mb": _rss_kb() / 1024,
            "peak_growth_mb": (_rss_kb("VmHWM") - before) / 1024}


def _quiet(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # the new code refuses what the old decoded: that is the figure
        return e


def _in_threads(n: int, fn, *args) -> None:
    """fn(*args) in n threads at once, errors swallowed."""
    ts = [threading.Thread(target=_quiet, args=(fn, *args)) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def hostile_images_round(images, before_ref: str = "HEAD") -> dict:
    """Issue 12 figures, in this process: fit_image's peak memory on degenerate shapes, how long a server that
    drips its headers holds a fetch, and API-side memory while decoding 8 large images at once (decode_image
    called in 8 threads, as 8 concurrent requests would). "old" is the code at `before_ref`, where it differs."""
    from PIL import Image

    from wanrt.api import fetch as new_fetch
    from wanrt.runtime import image as new_image

    from servers import big_jpeg, rgba_png

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        old_image = _module_at(before_ref, "src/wanrt/runtime/image.py", "old_image", Path(tmp))
        old_fetch = _module_at(before_ref, "src/wanrt/api/fetch.py", "old_fetch", Path(tmp))
    if old_fetch is not None and hasattr(old_fetch, "MIN_IMAGE_SIDE"):  # the ref already has the fix
        old_image = old_fetch = None
    out["before_ref"] = before_ref if old_fetch is not None else "(none: the fix is already at the ref)"

    # 1. fit_image: the old scale-then-crop makes 1 x N cover 256x256 as 256 x 256N (3 bytes a pixel)
    strip = Image.new("RGB", (1, 100_000))
    out["fit_1x100000_new_peak_mb"] = _peak_rss(new_image.fit_image, strip, 256, 256)["peak_growth_mb"]
    out["fit_1x100000_old_intermediate_gb"] = 256 * 256 * 100_000 * 3 / 1e9  # computed: not run (OOM)
    small = Image.new("RGB", (1, 1000))
    out["fit_1x1000_new_peak_mb"] = _peak_rss(new_image.fit_image, small, 256, 256)["peak_growth_mb"]
    if old_image is not None:
        out["fit_1x1000_old_peak_mb"] = _peak_rss(old_image.fit_image, small, 256, 256)["peak_growth_mb"]

    # 2. a server that sends one header byte a second (8 bytes, then a valid image) against a 3 s deadline
    url = images.url("/slow-headers?n=8")
    t0 = time.monotonic()
    _quiet(new_fetch.fetch_bytes, url, new_fetch.FetchPolicy(allow_hosts=("127.0.0.1",), deadline_s=3.0))
    out["slow_headers_held_new_s"] = time.monotonic() - t0
    if old_fetch is not None:
        t0 = time.monotonic()
        _quiet(old_fetch.fetch_bytes, url, old_fetch.FetchPolicy(allow_hosts=("127.0.0.1",), deadline_s=3.0))
        out["slow_headers_held_old_s"] = time.monotonic() - t0

    # 3. API-process memory: 8 decodes at once of a 140 KB PNG that is 6000x6000 RGBA, and of an 8000x6000 JPEG
    png, jpeg = rgba_png(6000), big_jpeg(8000, 6000)
    mods = [("new", new_fetch)] + ([("old", old_fetch)] if old_fetch is not None else [])
    for label, mod in mods:
        policy = mod.FetchPolicy()
        r = _peak_rss(_in_threads, 8, mod.decode_image, png, policy)
        out.update({f"decode8_png6000_{label}_{k}": v for k, v in r.items() if k != "peak_growth_mb"})
        policy = mod.FetchPolicy(max_pixels=64_000_000)  # 48 MP is over the default 40 MP header cap
        r = _peak_rss(_in_threads, 8, mod.decode_image, jpeg, policy)
        out[f"decode8_jpeg8000_{label}_peak_growth_mb"] = r["peak_growth_mb"]
    out["decode_note"] = "in-process decode_image calls in 8 threads (not through the HTTP API)"
    return out


SCENARIOS = ("crash", "restart", "load", "fuzz", "hostile_images")


def main(argv=None) -> int:
    from servers import ImageServer, WanrtServer, start_redis
    from test_reliability import crash_rounds, fuzz_round, load_round, restart_round

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run")
    ap.add_argument("--before", default="HEAD", help="git ref of the code before issue 12 (hostile_images' old figures)")
    args = ap.parse_args(argv)
    crashes, jobs, pollers, seconds, examples = (3, 5, 50, 10, 100) if args.quick else (20, 50, 200, 60, 100)

    results = {}
    with tempfile.TemporaryDirectory() as tmp, ImageServer() as images:
        tmp = Path(tmp)
        if "hostile_images" in args.only:  # first: its memory figures want a process not yet grown by the others
            results["hostile_images"] = hostile_images_round(images, args.before)
        redis_proc, redis_url = start_redis(tmp) if {"crash", "restart"} & set(args.only) else (None, None)
        try:
            if "crash" in args.only:
                with WanrtServer(tmp / "crash", WANRT_QUEUE=redis_url) as srv:
                    r = crash_rounds(srv, images, crashes)
                results["crash_kill9_redis"] = {**{k: v for k, v in r.items() if k not in ("outputs", "expected_outputs")},
                                                "duplicates_or_leftovers": r["outputs"] != r["expected_outputs"]}
            if "restart" in args.only:
                for backend, queue in (("sqlite", "sqlite"), ("redis", redis_url)):
                    results[f"restart_{backend}"] = restart_round(tmp / f"restart_{backend}", queue, images, jobs)
            if "load" in args.only:
                with WanrtServer(tmp / "load", workers=0, WANRT_QUEUE_MAX=100000) as srv:
                    r = load_round(srv, pollers, seconds, images)
                results["load"] = {**r, "errors": len(r["errors"])}
            if "fuzz" in args.only:
                with WanrtServer(tmp / "fuzz", workers=0, WANRT_QUEUE_MAX=100000, WANRT_FETCH_ONLY_ALLOWED=1) as srv:
                    r = fuzz_round(srv, examples)
                results["fuzz"] = {k: v for k, v in r.items() if k != "tail"}
        finally:
            if redis_proc is not None:
                redis_proc.terminate()

    print(f"{'scenario':<22} figures")
    for name, r in results.items():
        print(f"{name:<22} " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if set(args.only) != set(SCENARIOS) and out.exists():  # a partial run updates its rows, keeps the others
        results = {**json.loads(out.read_text()).get("results", {}), **results}
    out.write_text(json.dumps({"quick": args.quick, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

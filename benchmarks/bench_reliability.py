#!/usr/bin/env python3
"""Reliability figures on real parts (tiny model, CPU): crash/kill -9 rounds, restart with queued jobs,
load from concurrent pollers, schema-driven fuzzing. Prints a table and writes JSON.

    python benchmarks/bench_reliability.py            # the issue's sizes: 20 crashes, 50 jobs, 200 pollers x 60 s
    python benchmarks/bench_reliability.py --quick    # small sizes (a couple of minutes)
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]


def redis_server(tmp: Path):
    exe = shutil.which("redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def main(argv=None) -> int:
    from servers import ImageServer, WanrtServer
    from test_reliability import crash_rounds, fuzz_round, load_round, restart_round

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    args = ap.parse_args(argv)
    crashes, jobs, pollers, seconds, examples = (3, 5, 50, 10, 100) if args.quick else (20, 50, 200, 60, 100)

    results = {}
    with tempfile.TemporaryDirectory() as tmp, ImageServer() as images:
        tmp = Path(tmp)
        redis_proc, redis_url = redis_server(tmp)
        try:
            with WanrtServer(tmp / "crash", WANRT_QUEUE=redis_url) as srv:
                r = crash_rounds(srv, images, crashes)
            results["crash_kill9_redis"] = {**{k: v for k, v in r.items() if k not in ("outputs", "expected_outputs")},
                                            "duplicates_or_leftovers": r["outputs"] != r["expected_outputs"]}
            for backend, queue in (("sqlite", "sqlite"), ("redis", redis_url)):
                results[f"restart_{backend}"] = restart_round(tmp / f"restart_{backend}", queue, images, jobs)
            with WanrtServer(tmp / "load", workers=0, WANRT_QUEUE_MAX=100000) as srv:
                r = load_round(srv, pollers, seconds, images)
            results["load"] = {**r, "errors": len(r["errors"])}
            with WanrtServer(tmp / "fuzz", workers=0, WANRT_QUEUE_MAX=100000, WANRT_FETCH_ONLY_ALLOWED=1) as srv:
                r = fuzz_round(srv, examples)
            results["fuzz"] = {k: v for k, v in r.items() if k != "tail"}
        finally:
            redis_proc.terminate()

    print(f"{'scenario':<22} figures")
    for name, r in results.items():
        print(f"{name:<22} " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"quick": args.quick, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

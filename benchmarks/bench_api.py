#!/usr/bin/env python3
"""API throughput against the number of jobs kept: one API process (`wanrt serve --no-worker`), no worker,
the store seeded directly, `wrk` (compiled, so the client does not starve the server on a small machine).

For each store (SQLite, Redis) and each store size (default 100 and 100,000 jobs: 99 % finished, 1 % queued),
64 connections for `--duration` seconds each on: GET / (the framework's own ceiling, same run), GET /status of
a queued job at the back of the queue and of a completed one, GET /jobs?limit=50, GET /metrics, and
POST /generate with a data: image. Prints a table and writes JSON rows
{store, jobs, endpoint, rps, p50_ms, p99_ms, vs_root} plus the goal checks:
/status >= 70 % of GET /'s rps, /jobs?limit=50 and /metrics >= 25 %, no endpoint > 2x slower at the largest
size than at the smallest.

    python benchmarks/bench_api.py                       # the issue's run (~10 min)
    python benchmarks/bench_api.py --jobs 50,500 --duration 2 --stores sqlite   # a smoke run
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = {"text_encode_s": 0.4, "vae_encode_s": 0.6, "denoise_high_s": 4.0, "denoise_low_s": 4.0,
          "vae_decode_s": 1.5, "mp4_s": 0.2}
GOALS = {"status_queued": 0.70, "status_completed": 0.70, "jobs_page": 0.25, "metrics": 0.25}


def seed(store, jobs: int) -> dict[str, str]:
    """`jobs` jobs through the store's own API: 99 % completed (with stage timings), then 1 % queued.
    Returns a completed id and the id of the queued job at the back of the queue."""
    queued = max(1, jobs // 100)
    completed_id = None
    params = {"prompt": "seeded", "steps": 6, "width": 640, "height": 640, "frames": 81}
    for _ in range(jobs - queued):
        job, _ = store.create(params, input_image="seed.png")
        claimed = store.claim("bench-seed", lease_s=3600)
        store.complete(claimed.id, "bench-seed", "/nonexistent/seed.mp4", STAGES)
        completed_id = completed_id or job.id
    last = None
    for _ in range(queued):
        last, _ = store.create(params, input_image="seed.png")
    return {"completed": completed_id, "queued": last.id}


def fast_store(store):
    """Seeding only: 100,000 fsyncs would take longer than the benchmark (the server keeps synchronous=FULL)."""
    if hasattr(store, "_conn"):
        store._conn().execute("PRAGMA synchronous=OFF")
    return store


def start_api(data_dir: Path, queue: str) -> tuple[subprocess.Popen, str]:
    from servers import free_port

    port = free_port()
    env = {**os.environ, "WANRT_DATA_DIR": str(data_dir), "WANRT_PORT": str(port), "WANRT_HOST": "127.0.0.1",
           "WANRT_QUEUE": queue, "WANRT_QUEUE_MAX": str(10**9), "WANRT_JOB_TTL_S": str(10**9),
           # every connection may fetch at once (the default 16 would answer the rest 503: not what is measured)
           "WANRT_FETCH_CONCURRENCY": "128"}
    log = open(data_dir / "api.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "wanrt.cli", "serve", "--no-worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("API did not start")


def generate_script(tmp: Path) -> Path:
    from servers import image_bytes

    data = base64.b64encode(image_bytes("PNG", size=(64, 64))).decode()
    body = json.dumps({"image_url": f"data:image/png;base64,{data}", "prompt": "bench", "width": 256,
                       "height": 256, "frames": 16, "steps": 1})
    script = tmp / "generate.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    return script


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, duration: float, connections: int, script: Path | None = None) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, int(duration))}s", "--latency", "--timeout", "10s"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": rps, "p50_ms": pct.get("50"), "p99_ms": pct.get("99"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def run_size(store_name: str, jobs: int, args, tmp: Path) -> list[dict]:
    from wanrt.config import Settings
    from wanrt.jobs import open_store

    from servers import start_redis

    data_dir = tmp / f"{store_name}-{jobs}"
    data_dir.mkdir()
    redis_proc, queue = (None, "sqlite")
    if store_name == "redis":
        redis_proc, queue = start_redis(data_dir)
    store = fast_store(open_store(Settings(data_dir=data_dir, queue=queue)))
    t0 = time.perf_counter()
    ids = seed(store, jobs)
    seeded_s = time.perf_counter() - t0
    store.close()
    api, base = start_api(data_dir, queue)
    try:
        endpoints = {"root": "/", "status_queued": f"/status/{ids['queued']}",
                     "status_completed": f"/status/{ids['completed']}", "jobs_page": "/jobs?limit=50",
                     "metrics": "/metrics", "generate": "/generate"}
        script = generate_script(data_dir)
        rows = []
        for name, path in endpoints.items():
            m = wrk(base + path, args.duration, args.connections, script if name == "generate" else None)
            rows.append({"store": store_name, "jobs": jobs, "endpoint": name, **m, "seed_s": round(seeded_s, 1)})
        root = rows[0]["rps"]
        for r in rows:
            r["vs_root"] = round(r["rps"] / root, 3)
        return rows
    finally:
        api.terminate()
        api.wait(30)
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait(10)


def checks(rows: list[dict]) -> list[dict]:
    out = []
    sizes = sorted({r["jobs"] for r in rows})
    for store in sorted({r["store"] for r in rows}):
        big = {r["endpoint"]: r for r in rows if r["store"] == store and r["jobs"] == sizes[-1]}
        small = {r["endpoint"]: r for r in rows if r["store"] == store and r["jobs"] == sizes[0]}
        for endpoint, share in GOALS.items():
            out.append({"store": store, "check": f"{endpoint} >= {share:.0%} of GET / at {sizes[-1]} jobs",
                        "value": big[endpoint]["vs_root"], "ok": big[endpoint]["vs_root"] >= share})
        if len(sizes) > 1:
            for endpoint in big:
                ratio = small[endpoint]["rps"] / big[endpoint]["rps"]
                out.append({"store": store, "check": f"{endpoint}: {sizes[0]} -> {sizes[-1]} jobs slowdown <= 2x",
                            "value": round(ratio, 2), "ok": ratio <= 2.0})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", default="sqlite,redis")
    ap.add_argument("--jobs", default="100,100000", help="store sizes, comma-separated")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per endpoint")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "bench_api.json"))
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench_api: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="wanrt-bench-api-") as tmp:
        for store in args.stores.split(","):
            for jobs in (int(j) for j in args.jobs.split(",")):
                rows += run_size(store, jobs, args, Path(tmp))
    print(f"{'store':<7}{'jobs':>8}  {'endpoint':<17}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs /':>7}{'non-2xx':>9}")
    for r in rows:
        print(f"{r['store']:<7}{r['jobs']:>8}  {r['endpoint']:<17}{r['rps']:>9.0f}{r['p50_ms'] or 0:>9.2f}"
              f"{r['p99_ms'] or 0:>9.2f}{r['vs_root']:>7.2f}{r['non_2xx']:>9}")
    goal_rows = checks(rows)
    for c in goal_rows:
        print(f"{'ok  ' if c['ok'] else 'MISS'} {c['store']:<7}{c['check']}: {c['value']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "duration_s": args.duration,
                               "connections": args.connections, "rows": rows, "checks": goal_rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

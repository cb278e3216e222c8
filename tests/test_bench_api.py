"""benchmarks/bench_api.py runs end to end (seeding, a real API process, wrk) and writes the documented rows."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make test installs Debian's wrk)")
def test_bench_api_smoke(tmp_path):
    out = tmp_path / "bench_api.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_api.py"), "--stores", "sqlite",
                        "--jobs", "20", "--duration", "1", "--connections", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    endpoints = {row["endpoint"] for row in data["rows"]}
    assert endpoints == {"root", "status_queued", "status_completed", "jobs_page", "metrics", "generate"}
    for row in data["rows"]:
        assert {"store", "jobs", "endpoint", "rps", "p50_ms", "p99_ms"} <= set(row) and row["rps"] > 0
        assert row["non_2xx"] == 0, row
    assert data["checks"] and all({"check", "value", "ok"} <= set(c) for c in data["checks"])

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import flops  # noqa: E402


def test_flop_model_known_values():
    fwd = flops.forward_flops(81, 640, 640)
    assert fwd.tokens == 21 * 40 * 40 == 33600
    # self-attention alone: 40 layers x 4 L^2 d
    assert fwd.attention_self == 40 * 4 * 33600**2 * 5120
    req = flops.request_flops(steps=6, frames=81, width=640, height=640, cfg_high_noise=3.5, cfg_low_noise=1.0, steps_high=3)
    assert req["per_expert"]["high"]["batch"] == 2 and req["per_expert"]["low"]["batch"] == 1
    assert req["total"] == fwd.total * (3 * 2 + 3 * 1)
    assert flops.split_steps(6) == (3, 3)
    # frames that are not 4k+1 cost what is generated
    assert flops.forward_flops(50, 640, 640).tokens == flops.forward_flops(53, 640, 640).tokens


def test_flops_table_and_runtime_bench_run(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flops.py"), "--json", str(tmp_path / "f.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "default" in r.stdout and json.loads((tmp_path / "f.json").read_text())["rows"][1]["tokens"] == 33600
    out = tmp_path / "rt.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_runtime.py"), "--model", "tiny",
                        "--preset", "smoke", "--repeats", "1", "--warmup", "0", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert set(report["median_s"]) >= {"text_encode_s", "vae_encode_s", "denoise_high_s", "denoise_low_s", "vae_decode_s", "mp4_encode_s"}
    assert report["loop_tflop"] > 0 and report["steps_per_expert"] == {"high": 2, "low": 2}


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_bench_e2e_runs_each_row_in_its_own_process_with_guard(tmp_path):
    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--model", "tiny", "--presets", "smoke",
                        "--configs", "diffusers,eager,+fp8", "--repeats", "1", "--warmup", "0",
                        "--cold-start", "--cold-start-preset", "cli_min",  # the CLI refuses 64x64
                        "--ref-dir", str(tmp_path / "ref"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["config"]: row for row in report["rows"]}
    assert [row["config"] for row in report["rows"]] == ["diffusers", "eager", "+fp8"]
    assert all("median_s" in row and "error" not in row for row in rows.values())
    # the reference (eager) ran first and is on disk; every row, diffusers' too, compares against it
    assert (tmp_path / "ref" / "ref_tiny_smoke.pt").is_file()
    assert abs(rows["eager"]["guard"]["latent_cosine"] - 1.0) < 1e-6 and rows["eager"]["guard"]["frames_psnr_db"] == float("inf")
    assert rows["diffusers"]["guard"]["latent_cosine"] > 0.99999 and rows["diffusers"]["guard"]["frames_psnr_db"] > 60
    assert 0.999 < rows["+fp8"]["guard"]["latent_cosine"] < 1.0 and rows["+fp8"]["guard"]["frames_psnr_db"] > 30
    # FP8 stays in its own row: counted, and a BF16 row with any FP8 layer would have failed
    assert rows["eager"]["fp8_layers"] == rows["diffusers"]["fp8_layers"] == 0 and rows["+fp8"]["fp8_layers"] > 0
    assert rows["diffusers"]["median_s"]["denoise_high_s"] > 0 and rows["diffusers"]["vs_diffusers"] == 1.0
    cold = report["cold_start"]
    assert cold["returncode"] == 0, cold["stderr_tail"]
    assert cold["seconds"] > cold["request_timings_s"]["total_s"] > 0  # process start -> MP4 includes the load
    assert (tmp_path / "e2e.md").read_text().count("| smoke |") == 3

"""benchmarks/gpu_proof.py: the dry run (tiny model, CPU) runs every stage in its own process and writes a
results document that matches the schema the GPU run fills."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_proof  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_proof.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    files = sorted(out.glob("gpu_cpu_*.json"))
    assert len(files) == 1, files
    return out, files[0], json.loads(files[0].read_text())


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_dry_run_writes_a_schema_valid_document(dry_run):
    out, path, doc = dry_run
    assert gpu_proof.validate(doc) == []
    assert doc["schema"] == 1 and doc["dry_run"] is True and doc["model"] == "tiny"
    assert doc["cuda"] is None and doc["cudnn"] is None and doc["torch"]
    assert doc["probe"]["versions"]["torch"] and doc["probe"]["sdpa"] is None  # GPU-only: null
    attention = doc["probe"]["attention"]  # the attention report's plumbing, at Wan's shapes on the CPU
    assert attention["shape"]["tokens"] == 33_600 and attention["chosen"] == "flash"
    assert attention["auto"]["kernel"] == "sdpa" and "needs a CUDA GPU" in attention["cudnn_fp8"]
    stages = {}
    for row in doc["rows"]:
        assert set(gpu_proof.ROW_FIELDS) <= set(row)
        assert "error" not in row, row
        stages.setdefault(row["stage"], []).append(row)
    assert sorted(stages) == [2, 3, 4, 5, 6, 7]
    assert [r["config"] for r in stages[2]] == ["diffusers", "eager"]
    assert [r["config"] for r in stages[5]] == ["diffusers", "eager", gpu_proof.FP8_COMPILED]
    for row in doc["rows"]:
        assert row["total_s"] > 0 and row["peak_allocated_gb"] is None and row["pct_bf16_peak"] is None


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_dry_run_rows_compare_against_the_eager_reference(dry_run):
    _, _, doc = dry_run
    rows = {(r["stage"], r["config"]): r for r in doc["rows"]}
    eager = rows[(2, "eager")]
    assert abs(eager["latent_cos"] - 1) < 1e-6 and eager["psnr_db"] == float("inf")
    assert rows[(2, "diffusers")]["vs_diffusers"] == 1.0 and rows[(2, "diffusers")]["mp4"] is None
    fp8 = rows[(3, gpu_proof.FP8_COMPILED)]
    assert 0.999 < fp8["latent_cos"] < 1 and fp8["fp8_layers"] > 0 and fp8["vs_diffusers"] > 0
    bf16 = rows[(4, gpu_proof.BF16_COMPILED)]
    assert bf16["fp8_layers"] == 0 and abs(bf16["latent_cos"] - 1) < 1e-6  # no FP8 leaked from stage 3
    # offload gives the resident latents exactly, and its host copies were made once
    offload = next(r for r in doc["rows"] if r["stage"] == 6 and r["config"].startswith("offload"))
    assert offload["bit_identical"] is True and offload["swap_s"] > 0


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_dry_run_writes_the_table(dry_run):
    out, path, doc = dry_run
    table = path.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(doc["rows"]) + 1  # header + one line per row
    assert "| 3 | smoke | +fp8 +compile +cudagraphs |" in table


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_a_stage_alone_replaces_its_rows(dry_run, tmp_path):
    out, path, doc = dry_run
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    assert gpu_proof.main(["--stage", "4", "--dry-run", "--out", str(tmp_path)]) == 0
    again = json.loads(copy.read_text())
    assert [r["stage"] for r in again["rows"]].count(4) == 1 and len(again["rows"]) == len(doc["rows"])
    assert gpu_proof.validate(again) == []


def test_validate_names_what_is_wrong():
    row = gpu_proof.empty_row(2, "default", "eager") | {"total_s": "slow"}
    doc = {"schema": 1, "gpu": "x", "torch": "2", "cuda": None, "rows": [row, {"stage": 9}]}
    problems = gpu_proof.validate(doc)
    assert "missing top-level 'cudnn'" in problems
    assert "row 0: total_s is str" in problems
    assert any(p.startswith("row 1: missing") for p in problems) and "row 1: stage 9" in problems

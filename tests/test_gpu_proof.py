"""benchmarks/gpu_proof.py: the dry run (tiny model, CPU) runs every stage in its own process and writes a
results document that matches the schema the GPU run fills, and a copy of the README with its GPU block
regenerated (the tracked README is never written)."""

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
    vae = doc["probe"]["vae"]  # bench_vae on the tiny model: bf16 vs fp32 frames
    assert vae["model"] == "tiny" and not vae["real_weights"] and vae["psnr_db"]["bf16"] > vae["gate_db"] == 40
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
    assert [r["config"] for r in stages[3]] == [gpu_proof.FP8_COMPILED, gpu_proof.FP8_GRAPHS]
    assert [r.get("opt_in") for r in stages[3]] == [None, True]
    assert [r["config"] for r in stages[5]] == ["diffusers", "eager", gpu_proof.FP8_COMPILED]
    assert [r["config"] for r in stages[6]] == ["resident (eager float32)", "offload (eager float32)",
                                                gpu_proof.MEMORY_COMPILED]
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
    # the compiled backend under offload, as the runtime builds it: FP8 drift against eager resident
    compiled = rows[(6, gpu_proof.MEMORY_COMPILED)]
    assert 0.999 < compiled["latent_cos"] < 1 and compiled["fp8_layers"] > 0 and compiled["swap_s"] > 0
    assert compiled["plan_mode"] == "offload" and compiled["bit_identical"] is False


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_dry_run_writes_the_table(dry_run):
    out, path, doc = dry_run
    table = path.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(doc["rows"]) + 1  # header + one line per row
    assert "| 3 | smoke | +fp8 +compile |" in table and "| 3 | smoke | +fp8 +compile +cudagraphs (opt-in) |" in table
    # the README copy carries the same table in its block
    block = (out / "README.md").read_text().split(gpu_proof.README_START)[1].split(gpu_proof.README_END)[0]
    assert table.strip() in block and f"]({path.name})" in block


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_a_stage_alone_replaces_its_rows(dry_run, tmp_path):
    out, path, doc = dry_run
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    assert gpu_proof.main(["--stage", "4", "--dry-run", "--out", str(tmp_path)]) == 0
    again = json.loads(copy.read_text())
    assert [r["stage"] for r in again["rows"]].count(4) == 1 and len(again["rows"]) == len(doc["rows"])
    assert gpu_proof.validate(again) == []


def test_a_dry_stage_writes_its_rows_and_only_a_copy_of_the_readme(tmp_path):
    """Stage 6 in this process (tiny model, CPU: seconds): schema-valid rows, the compiled + offload row among
    them, and the README's GPU block regenerated in a copy (the rest byte for byte); plus the plan and the
    wheelhouse the GPU run relies on."""
    from wanrt.config import Settings

    readme = ROOT / "README.md"
    before = readme.read_bytes()
    assert gpu_proof.main(["--stage", "6", "--dry-run", "--out", str(tmp_path)]) == 0
    assert readme.read_bytes() == before
    (path,) = tmp_path.glob("gpu_cpu_*.json")
    doc = json.loads(path.read_text())
    assert gpu_proof.validate(doc) == [] and doc["dry_run"] is True
    rows = {r["config"]: r for r in doc["rows"]}
    compiled = rows[gpu_proof.MEMORY_COMPILED]
    assert "error" not in compiled and compiled["plan_mode"] == "offload" and compiled["swap_s"] is not None
    assert compiled["fp8_layers"] > 0 and 0.999 < compiled["latent_cos"] < 1
    copy = (tmp_path / "README.md").read_bytes().decode()
    start, end = copy.index(gpu_proof.README_START), copy.index(gpu_proof.README_END)
    old = before.decode()
    assert copy[:start] == old[:old.index(gpu_proof.README_START)]
    assert copy[end:] == old[old.index(gpu_proof.README_END):]
    assert "No GPU figures have been measured yet" in old and f"| 6 | smoke | {gpu_proof.MEMORY_COMPILED} |" in copy
    assert gpu_proof.replace_block("no markers", "x") is None

    # the headline rows time the serving default (Settings); CUDA graphs only in an opt-in row of their own
    options = {name: opts for name, _, opts in gpu_proof.bench_e2e.CONFIGS}
    defaults = Settings()
    serving = {k: getattr(defaults, k) for k in ("fp8", "compile", "cudagraphs")}
    assert gpu_proof.E2E_PLAN[3][0][1] == gpu_proof.FP8_COMPILED and options[gpu_proof.FP8_COMPILED] == serving
    assert gpu_proof.E2E_PLAN[4] == [("default", gpu_proof.BF16_COMPILED, 1)]
    assert options[gpu_proof.BF16_COMPILED] == serving | {"fp8": False}
    graphs = [c for plan in gpu_proof.E2E_PLAN.values() for _, c, _ in plan if options[c].get("cudagraphs")]
    assert graphs == [gpu_proof.FP8_GRAPHS] and gpu_proof.OPT_IN == {gpu_proof.FP8_GRAPHS, gpu_proof.FP8_TORCHAO}
    assert options[gpu_proof.FP8_TORCHAO] == serving | {"fp8_impl": "torchao"}  # torchao vs ours, all else equal

    # the wheelhouse: the pins the GPU host needs, and the install refuses a wheels/ without them
    pkgs = gpu_proof.wheelhouse_packages()
    assert {"torchao==0.18.0", "nvidia-cudnn-frontend==1.32.0", "diffusers"} <= set(pkgs)
    wheels = [Path(n) for n in ("diffusers-0.35.1-py3-none-any.whl", "torchao-0.14.0-cp39-abi3-linux_x86_64.whl",
                                "nvidia_cudnn_frontend-1.32.0-cp312-cp312-manylinux_2_28_x86_64.whl")]
    assert gpu_proof.missing_wheels(wheels, ["diffusers", "torchao==0.18.0", "nvidia-cudnn-frontend==1.32.0",
                                             "av"]) == ["torchao==0.18.0", "av"]


def test_validate_names_what_is_wrong():
    row = gpu_proof.empty_row(2, "default", "eager") | {"total_s": "slow"}
    doc = {"schema": 1, "gpu": "x", "torch": "2", "cuda": None, "rows": [row, {"stage": 9}]}
    problems = gpu_proof.validate(doc)
    assert "missing top-level 'cudnn'" in problems
    assert "row 0: total_s is str" in problems
    assert any(p.startswith("row 1: missing") for p in problems) and "row 1: stage 9" in problems

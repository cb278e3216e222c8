"""benchmarks/gpu_proof.py: the dry run (tiny model, CPU) runs every unit and writes a results document that
matches the schema the GPU run fills, and a copy of the README with its GPU block regenerated (the tracked README
is never written); rows are written as each unit ends, a unit's process group dies at its timeout, and the plan,
--render, vs_diffusers and a partial probe's table work without a GPU."""

import json
import os
import subprocess
import sys
import time
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
    assert doc["schema"] == 2 and doc["dry_run"] is True and doc["model"] == "tiny"
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
    assert sorted(stages) == [2, 3, 4, 5, 6, 7, 8]
    assert [r["config"] for r in stages[2]] == ["diffusers", "eager"]
    assert [r["config"] for r in stages[3]] == [gpu_proof.FP8_COMPILED]
    assert [r["config"] for r in stages[8]] == [gpu_proof.FP8_GRAPHS]  # torchao, cuDNN FP8: left out on the CPU
    assert [r.get("opt_in") for r in stages[8]] == [True]
    assert [r["config"] for r in stages[5]] == ["diffusers", "eager", gpu_proof.FP8_COMPILED]
    assert [r["config"] for r in stages[6]] == ["resident (eager float32)", "offload (eager float32)",
                                                gpu_proof.MEMORY_COMPILED, gpu_proof.MEMORY_STREAM]
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
    assert fp8["psnr_db"] > 30 and "pending" not in fp8
    bf16 = rows[(4, gpu_proof.BF16_COMPILED)]
    assert bf16["fp8_layers"] == 0 and abs(bf16["latent_cos"] - 1) < 1e-6  # no FP8 leaked from stage 3
    resident = rows[(6, "resident (eager float32)")]  # stage 2's eager row, not run again
    assert resident["reused"] and resident["total_s"] == eager["total_s"] and resident["plan_mode"] == "resident"
    # offload gives the resident latents exactly, and its host copies were made once
    offload = next(r for r in doc["rows"] if r["stage"] == 6 and r["config"].startswith("offload"))
    assert offload["bit_identical"] is True and offload["swap_s"] > 0
    # the compiled backend under offload, as the runtime builds it: FP8 drift against eager resident
    compiled = rows[(6, gpu_proof.MEMORY_COMPILED)]
    assert 0.999 < compiled["latent_cos"] < 1 and compiled["fp8_layers"] > 0 and compiled["swap_s"] > 0
    assert compiled["plan_mode"] == "offload" and compiled["bit_identical"] is False
    stream = rows[(6, gpu_proof.MEMORY_STREAM)]  # the same FP8 weights, streamed: the same latents as offload
    assert stream["plan_mode"] == "stream" and stream["fp8_layers"] > 0 and stream["latent_cos"] == compiled["latent_cos"]


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_dry_run_writes_the_table(dry_run):
    out, path, doc = dry_run
    table = path.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(doc["rows"]) + 1  # header + one line per row
    assert "| 3 | smoke | +fp8 +compile |" in table and "| 8 | smoke | +fp8 +compile +cudagraphs (opt-in) |" in table
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
    assert "NVIDIA H200" in old and "NVIDIA H200" not in copy  # the tracked README keeps the committed figures
    assert f"| 6 | smoke | {gpu_proof.MEMORY_COMPILED} |" in copy
    assert gpu_proof.replace_block("no markers", "x") is None

    # the headline row times the serving default (Settings), alone in its stage; CUDA graphs and torchao only in
    # the opt-in stage
    options = {name: opts for name, _, opts in gpu_proof.bench_e2e.CONFIGS}
    defaults = Settings()
    serving = {k: getattr(defaults, k) for k in ("fp8", "compile", "cudagraphs")}
    e2e = {n: [u.name for u in gpu_proof.UNITS if u.stage == n] for n in (2, 3, 4, 5, 8)}
    assert e2e[3] == [gpu_proof.FP8_COMPILED] and options[gpu_proof.FP8_COMPILED] == serving
    assert e2e[4] == [gpu_proof.BF16_COMPILED] and options[gpu_proof.BF16_COMPILED] == serving | {"fp8": False}
    graphs = [c for names in e2e.values() for c in names if options[c].get("cudagraphs")]
    assert graphs == [gpu_proof.FP8_GRAPHS] and gpu_proof.OPT_IN == set(e2e[8])
    assert options[gpu_proof.FP8_TORCHAO] == serving | {"fp8_impl": "torchao"}  # torchao vs ours, all else equal
    assert options[gpu_proof.FP8_ATTN] == serving | {"attn": "cudnn_fp8"}
    # each step runs the eager reference of every preset whose compared rows it runs, before them
    for step in gpu_proof.PLAN:
        units = gpu_proof.select_units(list(step.stages), list(step.configs) if step.configs else None)
        for i, u in enumerate(units):
            if u.kind == "e2e" and u.name not in ("eager", "diffusers") or u.kind == "memory compiled":
                assert any(v.name == "eager" and v.preset == u.preset for v in units[:i]), (step.name, u.key)
    assert all(s.timeout_s <= 560 for s in gpu_proof.PLAN)  # each step one device command (600 s at most)

    # the wheelhouse: the pins the GPU host needs (no wanrt wheel: src/ is measured; no importlib-metadata), and
    # the install refuses a wheels/ without them
    pkgs = gpu_proof.wheelhouse_packages()
    assert {"torchao==0.18.0", "nvidia-cudnn-frontend==1.32.0", "diffusers"} <= set(pkgs)
    assert not {p for p in pkgs if p.startswith(("importlib-metadata", "wanrt"))}
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


# --------------------------------------------------------------------------------------------- cheap, no GPU
def test_rows_are_written_as_each_unit_completes(tmp_path):
    """A command killed between two units (as the device's limit kills it: no cleanup) keeps the first unit's row,
    in the work dir and in --copy-to."""
    back = tmp_path / "back"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_proof.py"), "--dry-run", "--stages", "2",
                        "--configs", "eager,diffusers", "--die-before", "diffusers", "--out", str(tmp_path),
                        "--copy-to", str(back)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr[-2000:]
    for d in (tmp_path, back):
        (path,) = d.glob("gpu_cpu_*.json")
        doc = json.loads(path.read_text())
        assert gpu_proof.validate(doc) == [] and [(x["stage"], x["config"]) for x in doc["rows"]] == [(2, "eager")]
    assert {p.name for p in back.iterdir()} >= {path.name, path.with_suffix(".md").name, "README.md"}
    assert not any(p.suffix == ".pt" for p in back.rglob("*"))  # the reference latents stay on the machine


def test_a_row_run_before_its_reference_is_compared_when_the_reference_comes(tmp_path):
    assert gpu_proof.main(["--dry-run", "--stages", "3,2", "--configs", f"{gpu_proof.FP8_COMPILED},eager",
                           "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu_cpu_*.json")
    rows = {r["stage"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows[3]["backfilled"] is True and 0.999 < rows[3]["latent_cos"] < 1 and rows[3]["psnr_db"] > 30
    assert not list((tmp_path / "ref").glob("pending_*")) and "pending" not in rows[3]


def test_a_unit_killed_at_its_timeout_takes_its_process_group(tmp_path):
    """A row process and whatever it started (compile workers, the CLI) die together: nothing keeps the GPU."""
    pid_file = tmp_path / "grandchild"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    rc, _, _ = gpu_proof.bench_e2e.run_group([sys.executable, "-c", code], timeout=8)  # time to start both
    assert rc is None and time.monotonic() - t0 < 30
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild, reparented, is reaped a moment after the kill
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {pid} outlived its group's kill")
    assert not gpu_proof.bench_e2e.LIVE_GROUPS


def test_the_plan_prints_without_wanrt_or_torch_installed():
    """-I -S: no PYTHONPATH, no user or system site-packages (so no editable wanrt, no torch): the script finds
    this checkout's src/ itself, in every mode; --plan prints what the docstring and benchmarks/README.md say."""
    r = subprocess.run([sys.executable, "-I", "-S", str(ROOT / "benchmarks" / "gpu_proof.py"), "--plan"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == gpu_proof.plan_text()
    assert "--step A --copy-to $OUT" in r.stdout and all(f"  {s.name}  " in r.stdout for s in gpu_proof.PLAN)
    assert gpu_proof.plan_text() in gpu_proof.__doc__
    assert gpu_proof.plan_text() in (ROOT / "benchmarks" / "README.md").read_text()


def test_the_checkout_and_the_wheel_install_come_first(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import gpu_proof, wanrt; "
            "print(json.dumps([wanrt.__file__, sys.path, gpu_proof.proof_env()['PYTHONPATH']]))")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT / "benchmarks")], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "WANRT_PROOF_SITE": str(site)})
    assert r.returncode == 0, r.stderr
    wanrt_file, path, pythonpath = json.loads(r.stdout)
    src = str(ROOT / "src")
    assert wanrt_file == str(ROOT / "src" / "wanrt" / "__init__.py")
    assert path.index(src) < path.index(str(site)) and not any("site-packages" in p for p in path)
    assert pythonpath.split(os.pathsep)[:2] == [src, str(site)]  # what every child process gets


def test_vs_diffusers_compares_the_parts_both_measure_and_only_bench_e2e_rows():
    def row(stage, preset, config, **parts):
        return gpu_proof.empty_row(stage, preset, config) | parts

    parts = dict(text=1.0, vae_encode=2.0, denoise_high=10.0, denoise_low=10.0, vae_decode=3.0)  # 26 s
    rows = [row(2, "default", "diffusers", total_s=30.0, **parts),
            row(2, "default", "eager", total_s=24.0, mp4=5.0, **parts | {"denoise_high": 5.0}),  # 21 s of parts
            row(3, "default", gpu_proof.FP8_COMPILED, total_s=15.0, mp4=5.0, **parts | {"denoise_high": 2.0,
                                                                                          "denoise_low": 2.0}),
            row(6, "default", "resident (eager bfloat16)", total_s=24.0, **parts),
            row(7, "default", gpu_proof.COLD_START, total_s=200.0, **parts),
            row(5, "fast", "eager", total_s=9.0, **parts),  # no diffusers row of the fast preset
            row(4, "default", gpu_proof.BF16_COMPILED, error="boom")]
    gpu_proof.add_vs_diffusers(rows)
    vs = [r["vs_diffusers"] for r in rows]
    assert vs[0] == 1.0 and vs[1] == 26 / 21 and vs[2] == 26 / 10  # the MP4 encode never counts
    assert vs[3:] == [None, None, None, None]


def test_markdown_renders_a_partial_probe():
    doc = {"schema": 2, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "cuda": "13.0", "cudnn": 91000,
           "model": "random-full", "rows": [gpu_proof.empty_row(3, "default", gpu_proof.FP8_COMPILED)],
           "probe": {"fp8_linear": {"bf16": {"ms": 10.0, "tflops": 650.0},  # Fp8Linear never ran: scaled_mm raised
                                    "fp8_scaled_mm": {"error": "RuntimeError: no FP8 here"}},
                     "sdpa_default": None, "sdpa": {"flash": {"ms": 50.0, "tflops": 400.0}, "cudnn": {"error": "x"}},
                     "attention": {"device": "cuda"}, "vae": {"model": "/w", "error": "no vae/"},
                     "pytest_gpu": {"summary": "3 passed"}}}
    text = gpu_proof.markdown(doc)
    assert "BF16 650 TFLOP/s, FP8 scaled_mm: RuntimeError: no FP8 here" in text
    assert "- flash: 50.0 ms, 400 TFLOP/s" in text and "- cudnn: x" in text and "**?**" in text
    assert "VAE decode (/w): no vae/" in text and "pytest -m gpu: 3 passed" in text
    doc["probe"]["sdpa"] = {"flash": "not a dict"}  # a malformed part says so and the rest still renders
    text = gpu_proof.markdown(doc)
    assert "SDPA: partial probe, not rendered" in text and "| 3 | default | +fp8 +compile |" in text


def test_render_merges_returned_documents_into_results_and_the_readme(tmp_path):
    def doc(*rows, probe=None):
        return {"schema": 2, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "cuda": "13.0", "cudnn": 91000,
                "dry_run": False, "model": "random-full", "rows": list(rows), **({"probe": probe} if probe else {})}

    def row(stage, config, total, **extra):
        return gpu_proof.empty_row(stage, "default", config) | {"total_s": total, "unit": config} | extra

    a = doc(row(3, gpu_proof.FP8_COMPILED, 40.0), probe={"versions": {"torch": "2.11"}})
    b = doc(row(3, gpu_proof.FP8_COMPILED, 99.0, error="killed"), row(2, "eager", 80.0), row(2, "diffusers", 120.0))
    c = doc(row(2, "eager", 75.0))  # a later run of the same row replaces it
    files = []
    for name, d in (("A", a), ("B", b), ("C", c)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(d))
    results = tmp_path / "results" / "gpu_nvidia_h100_80gb_hbm3_20260101.json"
    readme = tmp_path / "README.md"
    assert gpu_proof.main(["--render", str(results), *map(str, files), "--readme", str(readme)]) == 0
    merged = json.loads(results.read_text())
    assert gpu_proof.validate(merged) == [] and merged["probe"] == {"versions": {"torch": "2.11"}}
    assert [(r["stage"], r["config"], r["total_s"]) for r in merged["rows"]] == [
        (2, "diffusers", 120.0), (2, "eager", 75.0), (3, gpu_proof.FP8_COMPILED, 40.0)]  # an error never replaces
    table = results.with_suffix(".md").read_text()
    assert "| 3 | default | +fp8 +compile | 40.00 |" in table
    block = readme.read_text().split(gpu_proof.README_START)[1].split(gpu_proof.README_END)[0]
    assert table.strip() in block and f"]({results.relative_to(tmp_path).as_posix()})" in block
    # rendering the merged file alone is idempotent
    assert gpu_proof.main(["--render", str(results), "--readme", str(readme)]) == 0
    assert json.loads(results.read_text()) == merged


def test_units_that_cannot_start_inside_the_budget_are_listed(tmp_path, capsys):
    assert gpu_proof.main(["--no-install", "--model", "tiny", "--device", "cpu", "--stages", "2", "--budget-s", "1",
                           "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not run (budget): 2:eager" in err and "2:diffusers" in err and not list(tmp_path.glob("gpu_*.json"))
    units = gpu_proof.select_units([2], None)
    assert [u.name for u in units] == ["eager", "diffusers"]  # the preset's reference first
    assert [u.key for u in gpu_proof.select_units([1], ["pytest"])] == ["1:pytest"]
    assert [u.name for u in gpu_proof.select_units([1], None)] == ["probe"]  # pytest only when named
    with pytest.raises(SystemExit, match="no unit"):
        gpu_proof.select_units([3], ["eager"])


def test_the_pytest_unit_keeps_pytests_summary_and_failures_not_a_librarys_exit_noise(tmp_path):
    """The first device run stored the last line of stdout+stderr as the summary: cudnn-frontend's nanobind leak
    report at interpreter exit, and which GPU tests failed was lost. A real pytest run whose process prints such
    noise to stderr at exit."""
    (tmp_path / "conftest.py").write_text("import atexit, sys\n"
                                          "atexit.register(lambda: print('nanobind: leaked 30 instances!', file=sys.stderr))\n")
    (tmp_path / "test_x.py").write_text("import pytest\n\n@pytest.mark.skip(reason='no')\ndef test_s():\n    pass\n\n"
                                        "def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'kaput'\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider",
                        str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "nanobind" in r.stderr and r.returncode == 1
    out = gpu_proof.pytest_outcome(r.stdout)
    assert out["summary"].startswith("1 failed, 1 passed, 1 skipped in "), out
    assert len(out["failed"]) == 1 and out["failed"][0].startswith("FAILED ") and "test_bad" in out["failed"][0]
    lines = gpu_proof.markdown({"gpu": "g", "torch": "t", "cuda": None, "cudnn": None, "model": "m", "rows": [],
                                "probe": {"pytest_gpu": {"returncode": 1, **out}}})
    assert "test_bad" in lines and "1 failed, 1 passed" in lines and "before 2026-11-27" not in lines


def test_every_row_runs_under_the_servers_allocator_setting(tmp_path):
    """The proof's children (ours and diffusers') get build_runtime's PYTORCH_CUDA_ALLOC_CONF unless the host set
    an allocator setting of its own."""
    from wanrt.runtime.gpus import CUDA_ALLOC_CONF

    assert gpu_proof.proof_env(tmp_path, env={})["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF
    assert gpu_proof.bench_e2e.child_env({})["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF
    given = gpu_proof.proof_env(tmp_path, env={"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in given and given["PYTORCH_ALLOC_CONF"] == "backend:cudaMallocAsync"


def test_each_step_runs_the_units_it_names():
    """`eager` is stage 2's reference and stage 6's memory unit: a step names stage 2's as 2:eager (a step once ran
    both, and its last unit would not have fitted). The order: what is still unmeasured first."""
    steps = {s.name: [u.key for u in gpu_proof.select_units(list(s.stages), list(s.configs) if s.configs else None)]
             for s in gpu_proof.PLAN}
    assert steps == {
        "A": [f"7:{gpu_proof.COLD_START}", "2:eager", f"8:{gpu_proof.FP8_TORCHAO}"],
        "B": ["2:eager", "6:stream24"],
        "C": ["2:eager", f"8:{gpu_proof.FP8_GRAPHS}"],
        "D": ["1:probe", "2:eager", "2:diffusers", f"3:{gpu_proof.FP8_COMPILED}"],
        "E": ["1:pytest", "2:eager", f"8:{gpu_proof.FP8_ATTN}", "5:eager", f"5:{gpu_proof.FP8_COMPILED}"],
        "F": ["2:eager", "6:compiled", f"4:{gpu_proof.BF16_COMPILED}"]}
    with pytest.raises(SystemExit, match="no unit"):
        gpu_proof.select_units([2], ["6:eager"])

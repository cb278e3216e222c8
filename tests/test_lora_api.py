"""LoRAs per request over HTTP (issue 15): a real `wanrt serve` with a LoRA directory and one worker, a real
client. GET /loras lists what the worker validated (a corrupt file and one with unmatched keys are listed as
unavailable and the server keeps serving), requests pick LoRAs in JSON and multipart, bad entries are a 422
naming the entry, the LoRAs used are echoed in /status and /debug/job, and a file added later is served."""

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wanrt.runtime.video import probe_mp4

from conftest import make_image
from lora_fixtures import TARGETS, as_format, random_lora
from servers import WanrtServer

ASSET = Path(__file__).parent / "assets" / "first_frame.png"
TINY = dict(prompt="a cat", width=256, height=256, frames=16, steps=1)


def data_url() -> str:
    buf = io.BytesIO()
    make_image(64, 64).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("lora_api")
    lib = d / "loras"
    lib.mkdir()
    high = tiny_model.transformer_high
    save_file(as_format(random_lora(high, rank=4, seed=1, alpha=2.0), "comfy"), str(lib / "style.safetensors"))
    save_file(as_format(random_lora(high, rank=8, seed=2, targets=TARGETS[1:]), "peft"), str(lib / "motion.safetensors"))
    (lib / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    save_file({"transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}, str(lib / "unmatched.safetensors"))
    srv = WanrtServer(d / "data", workers=1, WANRT_LORA_DIR=lib, WANRT_MAX_LORA_RANK=16, WANRT_LORA_RESCAN_S=0.5).start()
    srv.lib, srv.tiny_model = lib, tiny_model
    try:
        with srv.client() as c:  # the worker publishes its library once its model is loaded
            deadline = time.time() + 120
            while time.time() < deadline and not c.get("/loras").json()["loras"]:
                time.sleep(0.3)
        yield srv
    finally:
        srv.stop()


def test_get_loras_lists_the_validated_library(server):
    with server.client() as c:
        body = c.get("/loras").json()
    by_name = {e["name"]: e for e in body["loras"]}
    assert body["available"] == ["motion", "style"]
    assert by_name["style"]["format"] and by_name["style"]["rank"] == 4 and len(by_name["style"]["sha256"]) == 64
    assert by_name["motion"]["rank"] == 8 and set(by_name["motion"]["layers"]) == {"high", "low"}
    assert by_name["corrupt"]["available"] is False and "safetensors" in by_name["corrupt"]["error"]
    assert by_name["unmatched"]["available"] is False and "blocks.9" in by_name["unmatched"]["error"]


def test_json_request_with_loras_runs_and_is_echoed(server):
    loras = [{"name": "style", "strength": 0.75}, {"name": "motion", "strength": -1, "expert": "low"}]
    with server.client() as c:
        r = c.post("/generate", json={**TINY, "image_url": data_url(), "loras": loras})
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        status = server.wait_status(job_id)
        assert status["status"] == "completed", status
        want = [{"name": "style", "strength": 0.75, "expert": "both"},
                {"name": "motion", "strength": -1.0, "expert": "low"}]
        assert status["params"]["loras"] == want
        assert c.get(f"/debug/job/{job_id}").json()["job"]["params"]["loras"] == want
        video = c.get(f"/download/{job_id}")
    path = server.data_dir / "clip.mp4"
    path.write_bytes(video.content)
    assert probe_mp4(path)["frames"] == 16


def test_multipart_request_with_loras(server):
    buf = io.BytesIO()
    make_image(64, 64).save(buf, format="PNG")
    form = {k: str(v) for k, v in TINY.items()} | {"loras": json.dumps([{"name": "style", "expert": "high"}])}
    with server.client() as c:
        r = c.post("/generate", data=form, files={"image": ("f.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        status = server.wait_status(r.json()["job_id"])
        assert status["status"] == "completed"
        assert status["params"]["loras"] == [{"name": "style", "strength": 1.0, "expert": "high"}]
        bad = c.post("/generate", data=form | {"loras": "[{"}, files={"image": ("f.png", buf.getvalue(), "image/png")})
        assert bad.status_code == 422 and "loras" in bad.json()["detail"]


@pytest.mark.parametrize("loras, where", [
    ([{"name": "nope"}], "loras[0].name"),
    ([{"name": "corrupt"}], "loras[0].name"),  # listed, but unavailable
    ([{"name": "style"}, {"name": "motion", "strength": 4.5}], "loras[1].strength"),
    ([{"name": "style", "expert": "mid"}], "loras[0].expert"),
    ([{"name": "style", "strength": 0.1, "expert": "high"}] * 9, "at most 8"),
    ([{"name": "style", "scale": 1}], "loras[0].scale"),
    ("style", "loras: Expected `array"),  # msgspec, before our check
])
def test_bad_loras_are_422_naming_the_entry_and_make_no_job(server, loras, where):
    with server.client() as c:
        before = c.get("/jobs?limit=1").json()["total"]
        r = c.post("/generate", json={**TINY, "image_url": data_url(), "loras": loras})
        assert r.status_code == 422 and where in r.json()["detail"], r.text
        assert c.get("/jobs?limit=1").json()["total"] == before


def test_seed_request_is_unchanged_and_a_file_added_later_is_served(server, tmp_path):
    with server.client() as c:
        r = c.post("/generate", json={**TINY, "image_url": data_url()})
        assert "loras" not in server.wait_status(r.json()["job_id"])["params"]
        save_file(as_format(random_lora(server.tiny_model.transformer_high, rank=2, seed=9), "wan"),
                  str(tmp_path / "late.safetensors"))
        (tmp_path / "late.safetensors").rename(server.lib / "late.safetensors")  # appears whole
        deadline = time.time() + 30
        while time.time() < deadline and "late" not in (c.get("/loras").json()["available"] or []):
            time.sleep(0.3)
        assert "late" in c.get("/loras").json()["available"]
        r = c.post("/generate", json={**TINY, "image_url": data_url(), "loras": [{"name": "late"}]})
        assert r.status_code == 200 and server.wait_status(r.json()["job_id"])["status"] == "completed"


def test_typed_client_lists_and_sends_loras(server):
    from wanrt.client import WanrtClient

    buf = io.BytesIO()
    make_image(64, 64).save(buf, format="PNG")
    image = server.data_dir / "first.png"
    image.write_bytes(buf.getvalue())
    with WanrtClient(server.base) as client:
        assert "style" in client.loras()["available"]
        final = client.generate("a cat", image_path=image, loras=[{"name": "motion", "strength": 0.5}], wait=True,
                                progress=False, timeout_s=180, **{k: v for k, v in TINY.items() if k != "prompt"})
    assert final["status"] == "completed"
    assert final["params"]["loras"] == [{"name": "motion", "strength": 0.5, "expert": "both"}]


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_cli_generate_with_lora_flags(server, tmp_path):
    import subprocess
    import sys

    def wanrt(*args):
        return subprocess.run([sys.executable, "-m", "wanrt.cli", "generate", "--image", str(ASSET), "--prompt", "x",
                               "--width", "256", "--height", "256", "--frames", "16", "--steps", "1", *args],
                              capture_output=True, text=True, timeout=300)

    r = wanrt("--lora-dir", str(server.lib), "--max-lora-rank", "16", "--lora", "style:0.5:high", "--lora", "motion",
              "--out", str(tmp_path / "a.mp4"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["loras"] == [{"name": "style", "strength": 0.5, "expert": "high"},
                                {"name": "motion", "strength": 1.0, "expert": "both"}]
    assert probe_mp4(tmp_path / "a.mp4")["frames"] == 16
    bad = wanrt("--lora-dir", str(server.lib), "--lora", "nope", "--out", str(tmp_path / "b.mp4"))
    assert bad.returncode == 2 and "unknown LoRA 'nope'" in bad.stderr
    flag = wanrt("--lora", "style:x", "--out", str(tmp_path / "c.mp4"))
    assert flag.returncode == 2 and "strength 'x' is not a number" in flag.stderr
    nodir = wanrt("--lora", "style", "--out", str(tmp_path / "c.mp4"))
    assert nodir.returncode == 2 and "--lora needs --lora-dir" in nodir.stderr


def test_metrics_count_lora_swaps_and_warmup(server):
    with server.client() as c:
        body = c.get("/metrics").text
    swaps = [line for line in body.splitlines() if line.startswith("wanrt_worker_lora_swaps_total{")]
    assert swaps and int(swaps[0].rsplit(" ", 1)[1]) >= 2  # the LoRA jobs above swapped sets on both experts
    assert any(line.startswith("wanrt_worker_lora_swap_seconds_total{") for line in body.splitlines())


def test_queued_jobs_say_why_they_wait(tmp_path):
    """A queued job no live worker can take says why in /status `waiting` (it stays queued: nothing accepted is
    lost): no worker runs, or it asks for LoRAs and the only worker has no LoRA slots. Once a worker that can
    take a job runs, that job starts; the LoRA job keeps waiting, with the reason."""
    with WanrtServer(tmp_path / "data", workers=0) as srv, srv.client() as c:
        plain = c.post("/generate", json={**TINY, "image_url": data_url()}).json()["job_id"]
        lora = c.post("/generate", json={**TINY, "image_url": data_url(), "loras": [{"name": "style"}]})
        assert lora.status_code == 200, lora.text  # no worker has reported: the name cannot be checked yet
        lora = lora.json()["job_id"]
        for job_id in (plain, lora):
            body = c.get(f"/status/{job_id}").json()
            assert body["status"] == "queued" and "no worker has reported" in body["waiting"], body
        assert 'wanrt_workers_live{loras="no"} 0' in c.get("/metrics").text
        worker = subprocess.Popen([sys.executable, "-m", "wanrt.cli", "worker", "--worker-id", "plain"], env=srv.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            done = srv.wait_status(plain)
            assert done["status"] == "completed" and "waiting" not in done
            deadline = time.time() + 10  # /status re-reads the workers' reports at most once a second
            while "no worker has reported" in (body := c.get(f"/status/{lora}").json())["waiting"] and \
                    time.time() < deadline:
                time.sleep(0.2)
            assert body["status"] == "queued" and body["queue_position"] == 1
            assert "no live worker serves LoRAs" in body["waiting"] and "--lora-dir" in body["waiting"]
            # and a new LoRA request is refused up front now that the workers have said what they serve
            r = c.post("/generate", json={**TINY, "image_url": data_url(), "loras": [{"name": "style"}]})
            assert r.status_code == 422 and "serves no LoRAs" in r.json()["detail"]
            metrics = c.get("/metrics").text  # what an alert on "jobs queued, nothing to run them" reads
            assert 'wanrt_workers_live{loras="yes"} 0' in metrics and 'wanrt_workers_live{loras="no"} 1' in metrics
            assert 'wanrt_worker_busy{worker="plain"' in metrics and "wanrt_worker_report_age_seconds{" in metrics
        finally:
            worker.terminate()
            worker.wait(30)


def test_a_set_past_the_workers_rank_is_422_naming_the_ranks(server, tmp_path):
    """The workers run at max_lora_rank 16: a rank-12 file with motion (8) needs 20 on both experts. Refused up
    front from the ranks the workers publish (it used to be accepted and fail on the worker); no job is made."""
    save_file(as_format(random_lora(server.tiny_model.transformer_high, rank=12, seed=12), "comfy"),
              str(tmp_path / "wide.safetensors"))
    (tmp_path / "wide.safetensors").rename(server.lib / "wide.safetensors")
    with server.client() as c:
        deadline = time.time() + 30
        while time.time() < deadline and "wide" not in (c.get("/loras").json()["available"] or []):
            time.sleep(0.3)
        before = c.get("/jobs?limit=1").json()["total"]
        r = c.post("/generate", json={**TINY, "image_url": data_url(),
                                      "loras": [{"name": "wide"}, {"name": "motion", "strength": 0.5}]})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "high-noise expert need rank 20 (wide 12 + motion 8)" in detail and "max_lora_rank 16" in detail
        assert c.get("/jobs?limit=1").json()["total"] == before

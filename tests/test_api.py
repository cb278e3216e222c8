"""The seed contract against a real `wanrt serve` process, a real HTTP client and a real image server."""

import base64
import subprocess
import sys
import time

import httpx
import pytest

from wanrt.runtime.video import probe_mp4

from conftest import wait_for
from servers import WanrtServer, image_bytes

SMALL = {"width": 256, "height": 256, "frames": 16, "steps": 2}
# conftest's fixtures: `server` (one worker), `api_only` (no worker: jobs stay queued for queue position, 429,
# idempotency) and `images`
API_ONLY = {"WANRT_QUEUE_MAX": 3}


def test_health(server):
    assert httpx.get(server.base + "/").json() == {"message": "WAN 2.2-14B LoRAs Image-to-Video API", "status": "running"}


def test_seed_python_example_flow(server, images, tmp_path):
    """The seed's Python client, unchanged but for the URL and a small size so CI stays fast."""
    import requests

    response = requests.post(f"{server.base}/generate", json={
        "image_url": images.url("/img.jpg"),
        "prompt": "person waving hello",
        "steps": 2,
        "frames": 16, "width": 256, "height": 256,
    })
    job_id = response.json()["job_id"]
    seen = []
    while True:
        status = requests.get(f"{server.base}/status/{job_id}").json()
        seen.append((status["status"], status.get("progress", 0)))
        if status["status"] == "completed":
            video_data = requests.get(f"{server.base}/download/{job_id}")
            with open(tmp_path / "output.mp4", "wb") as f:
                f.write(video_data.content)
            break
        elif status["status"] == "error":
            pytest.fail(status["error"])
        time.sleep(0.2)
    info = probe_mp4(tmp_path / "output.mp4")
    assert info["frames"] == 16 and (info["width"], info["height"]) == (256, 256) and info["fps"] == 16
    progresses = [p for s, p in seen]
    assert progresses == sorted(progresses)  # monotone as the client sees it
    assert status["video_ready"] is True and status["download_url"] == f"/download/{job_id}"
    assert status["video_path"].endswith(".mp4") and status["progress"] == 100
    assert status["params"]["frames_generated"] == 17 and status["params"]["seed"] == 1
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]
    def counted():  # the worker counts the job and re-reports just after recording it completed
        workers = httpx.get(f"{server.base}/debug/workers").json()["workers"]
        return workers if workers[0]["jobs_done"] >= 1 else None

    workers = wait_for(counted, 10, "the worker to count the job")
    assert len(workers) == 1 and workers[0]["device"] == "cpu" and workers[0]["backend"]["backend"] == "eager"
    assert 'wanrt_worker_jobs_done{worker="' in httpx.get(f"{server.base}/metrics").text
    dbg = httpx.get(f"{server.base}/debug/job/{job_id}").json()
    assert dbg["job"]["worker_id"] and dbg["job"]["device"] == "cpu" and dbg["job"]["attempts"] == 1
    assert {"text_encode_s", "vae_encode_s", "denoise_high_s", "denoise_low_s", "vae_decode_s"} <= set(dbg["job"]["timings"])
    jobs = httpx.get(f"{server.base}/jobs").json()["jobs"]
    assert jobs[job_id] == {"status": "completed", "progress": 100, "input_image": f"{job_id}_input.jpg"}
    files = httpx.get(f"{server.base}/debug/files").json()
    assert f"{job_id}_input.jpg" in [f["name"] for f in files["inputs"]]

    # Range requests
    full = httpx.get(f"{server.base}/download/{job_id}").content
    r = httpx.get(f"{server.base}/download/{job_id}", headers={"Range": "bytes=10-99"})
    assert r.status_code == 206 and r.content == full[10:100]
    assert r.headers["content-range"] == f"bytes 10-99/{len(full)}" and r.headers["content-type"] == "video/mp4"
    r = httpx.get(f"{server.base}/download/{job_id}", headers={"Range": "bytes=-16"})
    assert r.status_code == 206 and r.content == full[-16:]
    r = httpx.get(f"{server.base}/download/{job_id}", headers={"Range": f"bytes={len(full)}-"})
    assert r.status_code == 416 and "detail" in r.json()

    # DELETE removes the job and its files
    assert httpx.delete(f"{server.base}/jobs/{job_id}").json() == {"message": "Job deleted"}
    assert httpx.get(f"{server.base}/status/{job_id}").status_code == 404
    names = [f["name"] for k in ("inputs", "outputs") for f in httpx.get(f"{server.base}/debug/files").json()[k]]
    assert not any(job_id in n for n in names)


@pytest.mark.parametrize("payload,code,fragment", [
    ({"prompt": "x"}, 422, "image_url: field required"),
    ({"image_url": "IMG", "prompt": "x", "steps": 21}, 422, "steps"),
    ({"image_url": "IMG", "prompt": "x", "steps": 0}, 422, "1-20"),
    ({"image_url": "IMG", "prompt": "x", "width": 250}, 422, "width"),
    ({"image_url": "IMG", "prompt": "x", "width": 300}, 422, "divisible by 32"),
    ({"image_url": "IMG", "prompt": "x", "height": 2048}, 422, "height"),
    ({"image_url": "IMG", "prompt": "x", "frames": 15}, 422, "frames"),
    ({"image_url": "IMG", "prompt": "x", "fps": 31}, 422, "fps"),
    ({"image_url": "IMG", "prompt": "x", "cfg_high_noise": 0.5}, 422, "cfg_high_noise"),
    ({"image_url": "IMG", "prompt": "x", "cfg_low_noise": "high"}, 422, "cfg_low_noise"),
    ({"image_url": "IMG", "prompt": ""}, 422, "prompt"),
    ({"image_url": "IMG", "prompt": "   "}, 422, "prompt"),
    ({"image_url": "http://127.0.0.1:1/none.png", "prompt": "x"}, 400, "Failed to download image"),
    ({"image_url": "http://169.254.169.254/latest/meta-data/", "prompt": "x"}, 400, "not allowed"),
    ({"image_url": "file:///etc/passwd", "prompt": "x"}, 400, "unsupported URL scheme"),
    ({"image_url": "LOCAL/missing", "prompt": "x"}, 400, "HTTP 404"),
    ({"image_url": "LOCAL/notimage.png", "prompt": "x"}, 400, "Invalid image format"),
    ({"image_url": "LOCAL/bomb.png", "prompt": "x"}, 400, "exceeds the limit"),
    ({"image_url": "LOCAL/huge.bin", "prompt": "x"}, 400, "larger than"),
])
def test_generate_errors_have_detail_and_create_no_job(api_only, images, payload, code, fragment):
    data_url = "data:image/png;base64," + base64.b64encode(image_bytes("PNG")).decode()
    payload = {k: (data_url if v == "IMG" else v.replace("LOCAL", images.url("")) if isinstance(v, str) else v)
               for k, v in payload.items()}
    before = httpx.get(api_only.base + "/jobs").json()["jobs"]
    r = httpx.post(api_only.base + "/generate", json=payload, timeout=30)
    assert r.status_code == code, r.text
    assert set(r.json()) == {"detail"} and fragment in r.json()["detail"], r.json()
    assert httpx.get(api_only.base + "/jobs").json()["jobs"] == before


def test_malformed_json_is_400(api_only):
    r = httpx.post(api_only.base + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "detail" in r.json()


@pytest.mark.parametrize("method,path", [("GET", "/status/nope"), ("GET", "/download/nope"), ("DELETE", "/jobs/nope"),
                                         ("GET", "/debug/job/nope"), ("POST", "/jobs/nope/cancel")])
def test_unknown_job_is_404_job_not_found(api_only, method, path):
    r = httpx.request(method, api_only.base + path)
    assert r.status_code == 404 and r.json() == {"detail": "Job not found"}


def test_queue_position_idempotency_429_paging(api_only, images):
    base = api_only.base
    for job_id in list(httpx.get(base + "/jobs").json()["jobs"]):
        httpx.delete(f"{base}/jobs/{job_id}")
    body = {"image_url": images.url("/img.png"), "prompt": "x", **SMALL}
    a = httpx.post(base + "/generate", json=body, headers={"Idempotency-Key": "abc"}).json()
    again = httpx.post(base + "/generate", json=body, headers={"Idempotency-Key": "abc"}).json()
    assert again["job_id"] == a["job_id"]
    b = httpx.post(base + "/generate", json=body).json()
    st = httpx.get(f"{base}/status/{b['job_id']}").json()
    assert st["status"] == "queued" and st["queue_position"] == 2 and st["progress"] == 0
    assert httpx.post(base + "/generate", json=body).status_code == 200  # third fills the queue (max 3)
    full = httpx.post(base + "/generate", json=body)
    assert full.status_code == 429 and "Queue is full" in full.json()["detail"] and int(full.headers["retry-after"]) > 0
    page = httpx.get(base + "/jobs", params={"status": "queued", "limit": 2, "offset": 1}).json()
    assert page["total"] == 3 and len(page["jobs"]) == 2 and a["job_id"] not in page["jobs"]
    assert httpx.get(base + "/jobs", params={"status": "bogus"}).status_code == 422
    for job_id in list(httpx.get(base + "/jobs").json()["jobs"]):
        assert httpx.delete(f"{base}/jobs/{job_id}").status_code == 200


def test_cors_openapi_gpu_metrics(api_only):
    pre = httpx.options(api_only.base + "/generate", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code in (200, 204) and pre.headers["access-control-allow-origin"] in ("*", "http://elsewhere.example")
    got = httpx.get(api_only.base + "/", headers={"Origin": "http://elsewhere.example"})
    assert got.headers["access-control-allow-origin"] in ("*", "http://elsewhere.example")
    schema = httpx.get(api_only.base + "/schema/openapi.json").json()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["steps"]["maximum"] == 20 and props["width"]["multipleOf"] == 32 and props["steps"]["default"] == 6
    gpu = httpx.get(api_only.base + "/debug/gpu").json()
    assert gpu["available"] is False and "GPU" in gpu["reason"] or "nvml" in gpu["reason"].lower()
    metrics = httpx.get(api_only.base + "/metrics").text
    assert 'wanrt_jobs{state="queued"}' in metrics and "wanrt_queue_depth" in metrics and "wanrt_gpu_available 0" in metrics


def test_api_process_does_not_import_torch():
    code = ("import sys; from wanrt.config import Settings; from wanrt.api.app import create_app; "
            "import tempfile; create_app(Settings(data_dir=tempfile.mkdtemp())); "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False", out.stderr


def test_delete_while_running_cancels_and_removes_files(server, images):
    base = server.base
    job = httpx.post(base + "/generate", json={"image_url": images.url("/img.webp"), "prompt": "x",
                                               **{**SMALL, "steps": 20, "frames": 48}}).json()["job_id"]
    server.wait_status(job, states=("processing",))
    assert httpx.delete(f"{base}/jobs/{job}").json() == {"message": "Job deleted"}
    assert httpx.get(f"{base}/status/{job}").status_code == 404
    deadline = time.time() + 30
    while time.time() < deadline:
        files = httpx.get(base + "/debug/files").json()
        names = [f["name"] for k in ("inputs", "outputs") for f in files[k]]
        if not any(job in n for n in names):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"files of deleted job remain: {names}")
    # the worker is free again
    nxt = httpx.post(base + "/generate", json={"image_url": images.url("/img.png"), "prompt": "y", **SMALL}).json()["job_id"]
    assert server.wait_status(nxt)["status"] == "completed"


def test_cancel_ends_a_job_as_cancelled_and_keeps_its_record(server, images):
    """POST /jobs/{id}/cancel: the `cancelled` state of the docs, reachable (DELETE removes the job instead)."""
    base = server.base
    long = {"image_url": images.url("/img.png"), "prompt": "x", **{**SMALL, "steps": 20, "frames": 48}}
    running = httpx.post(base + "/generate", json=long).json()["job_id"]
    server.wait_status(running, states=("processing",))
    queued = httpx.post(base + "/generate", json=long).json()["job_id"]
    r = httpx.post(f"{base}/jobs/{queued}/cancel")  # behind the running job: cancelled at once
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["error_type"] == "cancelled"
    r = httpx.post(f"{base}/jobs/{running}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "processing" and r.json()["cancel_requested"] is True
    done = server.wait_status(running, timeout=60)  # within a step (or a VAE chunk)
    assert done["status"] == "cancelled" and done["error_type"] == "cancelled" and done["retryable"] is False
    assert httpx.post(f"{base}/jobs/{running}/cancel").json()["status"] == "cancelled"  # again: the same answer
    assert httpx.get(f"{base}/download/{running}").status_code == 404
    assert {j: v["status"] for j, v in httpx.get(base + "/jobs").json()["jobs"].items() if j in (running, queued)} == {
        running: "cancelled", queued: "cancelled"}
    small = httpx.post(base + "/generate", json={**long, **SMALL}).json()["job_id"]  # the worker is free again
    assert server.wait_status(small)["status"] == "completed"
    r = httpx.post(f"{base}/jobs/{small}/cancel")
    assert r.status_code == 409 and r.json() == {"detail": "Job already finished (status: completed)"}


def test_auth_when_api_keys_are_set(tmp_path, images):
    with WanrtServer(tmp_path / "d", workers=0, WANRT_API_KEYS="k1,k2") as srv:
        assert httpx.get(srv.base + "/").status_code == 200  # health stays open
        r = httpx.get(srv.base + "/jobs")
        assert r.status_code == 401 and r.json() == {"detail": "Missing or invalid bearer token"}
        assert httpx.get(srv.base + "/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(srv.base + "/jobs", headers={"Authorization": "Bearer k2"}).status_code == 200


def test_ttl_expires_finished_jobs_and_files(tmp_path, images):
    with WanrtServer(tmp_path / "d", WANRT_JOB_TTL_S="6") as srv:  # time enough to see it completed first
        job = httpx.post(srv.base + "/generate", json={"image_url": images.url("/img.png"), "prompt": "x", **SMALL}).json()["job_id"]
        assert srv.wait_status(job)["status"] == "completed"
        deadline = time.time() + 30
        while httpx.get(f"{srv.base}/status/{job}").status_code != 404:
            assert time.time() < deadline, "job did not expire"
            time.sleep(0.5)
        assert list((tmp_path / "d" / "outputs").glob(f"*{job}*")) == []

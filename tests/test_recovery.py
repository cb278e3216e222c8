"""Nothing accepted is lost: kill -9 of a worker mid-job, and a full server restart with queued jobs."""

import base64
import os
import signal
import time

import httpx
import pytest

from wanrt.runtime.video import probe_mp4

from servers import ImageServer, WanrtServer, image_bytes

SMALL = {"width": 256, "height": 256, "frames": 16, "steps": 2}


@pytest.fixture(scope="module")
def images():
    with ImageServer() as srv:
        yield srv


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_kill_9_worker_mid_job_then_job_completes(tmp_path, images):
    with WanrtServer(tmp_path / "d") as srv:
        job = httpx.post(srv.base + "/generate", json={"image_url": images.url("/img.png"), "prompt": "x",
                                                       **{**SMALL, "frames": 32}}).json()["job_id"]
        srv.wait_status(job, states=("processing",))
        (pid,) = srv.worker_pids()
        os.kill(pid, signal.SIGKILL)
        final = srv.wait_status(job, timeout=180)
        assert final["status"] == "completed", final
        dbg = httpx.get(f"{srv.base}/debug/job/{job}").json()["job"]
        assert dbg["attempts"] == 2  # run again, not lost
        assert probe_mp4(srv.data_dir / final["video_path"])["frames"] == 32  # video_path is relative to the data dir
        assert srv.worker_pids() and srv.worker_pids()[0] != pid  # the supervisor started a new worker
        outputs = list((tmp_path / "d" / "outputs").iterdir())
        assert [p.name for p in outputs] == [f"wanrt_{job}.mp4"]  # one output, no leftovers


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_restart_loses_nothing(tmp_path, images):
    data = tmp_path / "d"
    body = {"image_url": images.url("/img.jpg"), "prompt": "x", **SMALL}
    with WanrtServer(data) as srv:
        done = httpx.post(srv.base + "/generate", json=body).json()["job_id"]
        assert srv.wait_status(done)["status"] == "completed"
    # API only: jobs are accepted and wait
    srv = WanrtServer(data, workers=0).start()
    queued = [httpx.post(srv.base + "/generate", json={**body, "seed": i}).json()["job_id"] for i in range(3)]
    assert all(httpx.get(f"{srv.base}/status/{j}").json()["status"] == "queued" for j in queued)
    assert srv.stop() == 0
    # back with a worker: all queued jobs run, the earlier one still downloads
    with WanrtServer(data) as srv:
        for j in queued:
            assert srv.wait_status(j, timeout=240)["status"] == "completed"
        r = httpx.get(f"{srv.base}/download/{done}")
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_sigterm_requeues_the_running_job(tmp_path, images):
    data = tmp_path / "d"
    body = {"image_url": images.url("/img.jpg"), "prompt": "x", **{**SMALL, "steps": 20, "frames": 32}}
    srv = WanrtServer(data).start()
    job = httpx.post(srv.base + "/generate", json=body).json()["job_id"]
    srv.wait_status(job, states=("processing",))
    t0 = time.time()
    assert srv.stop() == 0
    assert time.time() - t0 < 30
    with WanrtServer(data) as srv:
        final = srv.wait_status(job, timeout=240)
        assert final["status"] == "completed"
        assert httpx.get(f"{srv.base}/debug/job/{job}").json()["job"]["attempts"] == 1


def test_workers_do_not_outlive_a_killed_server(tmp_path):
    import psutil

    srv = WanrtServer(tmp_path / "d").start()
    pids = srv.worker_pids()
    assert pids
    srv.proc.kill()
    srv.proc.wait()
    srv._log.close()
    deadline = time.time() + 30
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
        time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


@pytest.mark.parametrize("env,said", [
    ({"WANRT_DETERMINISTIC": "1", "WANRT_AUTOTUNE": "1"}, "settings refused: deterministic and autotune do not go together"),
    ({"WANRT_MODEL": "/nonexistent/model"}, "cannot load the model"),  # was exit 1: restarted every 2 s, for ever
])
def test_a_worker_whose_settings_the_runtime_refuses_is_not_restarted(tmp_path, env, said):
    """Settings the runtime refuses (--deterministic with --autotune, a model that is not there) end the worker
    with exit 2 and one log line; `wanrt serve` keeps answering and does not restart it in a loop (it could only
    fail again)."""
    with WanrtServer(tmp_path / "d", **env) as srv:
        deadline = time.time() + 60
        while time.time() < deadline and "not restarting it" not in srv.log_path.read_text():
            time.sleep(0.3)
        log = srv.log_path.read_text()
        assert said in log
        assert "refused its settings (exit 2); not restarting it" in log and "starting it again" not in log
        assert httpx.get(srv.base + "/").status_code == 200 and srv.worker_pids() == []


def test_a_worker_that_keeps_dying_at_start_is_restarted_with_backoff(tmp_path):
    """Any exit but 2 is restarted, but a worker that dies within QUICK_EXIT_S of its start waits 1, 2, 4... s,
    at most 60 s (each start re-loads the model; it restarted every 2 s for ever); one that ran a while is
    restarted after the first wait, its count reset."""
    from wanrt.api.server import WorkerSupervisor
    from wanrt.config import Settings

    sup = WorkerSupervisor(Settings(data_dir=tmp_path), 1)
    waits = []
    for _ in range(9):
        sup.started[0] = time.monotonic()  # it had just started
        sup._exited(0, 1)
        waits.append(round(sup.due[0] - time.monotonic()))
        sup.due[0] = 0.0
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    sup.quick_exits[0], sup.started[0] = 3, time.monotonic() - sup.QUICK_EXIT_S - 1  # it ran a while
    sup._exited(0, -9)
    assert sup.quick_exits[0] == 0 and round(sup.due[0] - time.monotonic()) == 1


def test_sigterm_reaches_the_workers_before_the_api_drains_its_streams(tmp_path):
    """docker stop gives 10 s: the workers must hear SIGTERM at once (and re-queue their job), not after uvicorn
    has waited up to 10 s for an open event stream to close."""
    import psutil

    srv = WanrtServer(tmp_path / "d").start()
    try:
        job = httpx.post(srv.base + "/generate", json={
            "image_url": "data:image/png;base64," + base64.b64encode(image_bytes("PNG")).decode(), "prompt": "x",
            "width": 256, "height": 256, "frames": 48, "steps": 20}).json()["job_id"]
        srv.wait_status(job, states=("processing",))
        (worker,) = [psutil.Process(p) for p in srv.worker_pids()]
        with httpx.stream("GET", f"{srv.base}/events/{job}", timeout=30) as stream:
            assert stream.status_code == 200
            t0 = time.time()
            srv.proc.send_signal(signal.SIGTERM)
            while True:  # ended (a zombie until serve reaps it, after the drain): its job released
                try:
                    if worker.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.NoSuchProcess:
                    break
                # told after the drain, it would end past 10 s; told at once, it ends after its current VAE chunk
                # or step (up to ~2.5 s each on a busy 2-core CI) and its teardown
                assert time.time() - t0 < 9.5, "the worker heard of the stop only after the API drained"
                time.sleep(0.1)
    finally:
        srv.stop()
    with WanrtServer(tmp_path / "d", workers=0) as again:  # re-queued, not lost
        assert httpx.get(f"{again.base}/status/{job}").json()["status"] == "queued"

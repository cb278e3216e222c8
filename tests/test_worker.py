"""The worker in-process on a real SQLite store: concurrency slots, error classification, lost jobs."""

import threading
import time

import pytest

from wanrt.config import Settings
from wanrt.jobs.paths import DataPaths
from wanrt.jobs.store import SqliteJobStore
from wanrt.jobs.worker import Worker
from wanrt.params import GenerateParams
from wanrt.runtime.video import probe_mp4

from conftest import make_image
from conftest import queue_job as _queue_job

TINY = dict(prompt="x", width=64, height=64, frames=9, steps=2)


def queue_job(paths: DataPaths, store: SqliteJobStore, **params):
    p = GenerateParams(**{**TINY, **params})
    return _queue_job(paths, store, p, make_image(96, 64))


def test_two_slots_run_jobs_at_the_same_time(tmp_path, tiny_pipeline):
    settings = Settings(data_dir=tmp_path, concurrency=2, heartbeat_s=0.2)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    ids = [queue_job(paths, store, frames=33, seed=i) for i in range(2)]
    worker = Worker(settings, "w", store=store, pipeline=tiny_pipeline)
    t = threading.Thread(target=worker.run, kwargs={"poll_s": 0.05, "max_jobs": 2})
    t.start()
    t.join(120)
    jobs = [store.get(i) for i in ids]
    assert [j.status for j in jobs] == ["completed", "completed"]
    assert {j.worker_id for j in jobs} == {"w", "w/1"}  # one job per slot
    a, b = sorted(jobs, key=lambda j: j.started_at)
    assert b.started_at < a.finished_at  # they overlapped
    assert all(probe_mp4(j.video_path)["frames"] == 33 for j in jobs)


def test_a_worker_without_lora_slots_runs_the_plain_job_and_leaves_the_lora_one(tmp_path, tiny_pipeline):
    """In a fleet where only some workers have LoRA slots, one without them must not take (and fail as
    invalid_lora) a LoRA job another could run: it runs the younger plain job and the LoRA job stays queued."""
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    lora_id = queue_job(paths, store)
    store._write("UPDATE jobs SET params=json_set(params, '$.loras', json('[{\"name\": \"style\"}]')) WHERE id=?",
                 (lora_id,))
    plain_id = queue_job(paths, store)
    Worker(settings, "w", store=store, pipeline=tiny_pipeline).run(poll_s=0.01, max_jobs=1)
    assert store.get(plain_id).status == "completed"
    lora_job = store.get(lora_id)
    assert lora_job.status == "queued" and lora_job.attempts == 0 and store.queue_position(lora_job) == 1


def test_failed_job_gets_error_type_and_worker_goes_on(tmp_path, tiny_pipeline):
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    bad = queue_job(paths, store)
    (paths.inputs / f"{bad}_input.png").unlink()  # the input vanished
    good = queue_job(paths, store)
    Worker(settings, "w", store=store, pipeline=tiny_pipeline).run(poll_s=0.05, max_jobs=2)
    failed = store.get(bad)
    assert failed.status == "error" and failed.error_type == "input_missing" and failed.retryable is False
    assert store.get(good).status == "completed"


def test_warm_up_times_each_bucket_and_the_worker_reports_it(tmp_path, tiny_pipeline):
    settings = Settings(data_dir=tmp_path, warmup=("64x64x5",))
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    from wanrt.runtime.backends.eager import EagerBackend
    from wanrt.runtime.pipeline import WanI2VPipeline

    seen, threads = [], set()  # (expert, batch) of every denoising call: warm-up must compile what requests will run
    states = []  # the worker's published state at each call: warming_up, then busy

    class Recording(EagerBackend):
        def denoise(self, expert, latent_input, *args):
            seen.append((expert, latent_input.shape[0]))
            threads.add(threading.get_ident())
            states.append(store.workers()[0]["state"])
            return super().denoise(expert, latent_input, *args)

    pipeline = WanI2VPipeline(tiny_pipeline.model, Recording(tiny_pipeline.model))
    job = queue_job(paths, store)
    Worker(settings, "w", store=store, pipeline=pipeline).run(poll_s=0.01, max_jobs=1)
    assert set(seen) == {("high", 2), ("low", 2), ("high", 1), ("low", 1)}  # both experts, with and without CFG
    assert states[0] == "warming_up" and states[-1] == "busy" and set(states) == {"warming_up", "busy"}
    # the job ran on the thread that warmed up: CUDA graph trees are per thread (another would record its own)
    assert store.get(job).status == "completed" and threads == {threading.get_ident()}
    (report,) = store.workers()
    assert list(report["warmup_s"]) == ["64x64x5"] and report["warmup_s"]["64x64x5"] > 0
    from wanrt.api.routes import metrics_text

    line = next(x for x in metrics_text(store, None, 0.0).splitlines() if x.startswith("wanrt_worker_warmup_seconds{"))
    assert 'bucket="64x64x5"' in line and float(line.split()[-1]) == report["warmup_s"]["64x64x5"]


def test_a_shutdown_during_warm_up_ends_it_at_the_next_step(tmp_path, tiny_pipeline):
    """SIGTERM (the worker's shutdown event) while it warms up: no further step, no bucket after it, nothing
    claimed, and the worker's last report says stopped."""
    from wanrt.runtime.backends.eager import EagerBackend
    from wanrt.runtime.pipeline import WanI2VPipeline

    calls = []

    class Stopping(EagerBackend):
        def denoise(self, *args):
            calls.append(1)
            worker.shutdown.set()  # as the SIGTERM handler does
            return super().denoise(*args)

    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    job = queue_job(paths, store)
    worker = Worker(Settings(data_dir=tmp_path, warmup=("64x64x5", "96x64x5")), "w", store=store,
                    pipeline=WanI2VPipeline(tiny_pipeline.model, Stopping(tiny_pipeline.model)))
    worker.run(poll_s=0.01)
    assert len(calls) == 1 and worker.warmup_s == {} and store.get(job).status == "queued"
    assert store.workers()[0]["state"] == "stopped"


def test_the_default_warm_up_runs_only_where_something_compiles(tmp_path, tiny_pipeline):
    """Unset WANRT_WARMUP on CUDA means the default request's bucket, for its compile: a backend that compiles
    nothing (eager, or the compiled backend on a streamed tier, compile off) skips it, not minutes of forwards."""
    from types import SimpleNamespace

    from wanrt.jobs.worker import compiles
    from wanrt.runtime.factory import build_runtime

    compiled = build_runtime(Settings(device="cpu", backend="compiled", compile=True, warmup=("64x64x5",)))
    group = SimpleNamespace(backend=SimpleNamespace(inner=compiled.backend))  # a worker group's wrapper
    assert compiles(compiled) and compiles(group)  # (nothing compiled yet: compiles on its first call)
    assert not compiles(build_runtime(Settings(device="cpu", backend="compiled", compile=False, warmup=("64x64x5",))))
    settings = Settings(data_dir=tmp_path, device="cuda")  # as a GPU host resolves it; the pipeline is the CPU's
    assert settings.resolved_warmup() == ("640x640x81",) and not compiles(tiny_pipeline)
    store = SqliteJobStore(DataPaths(tmp_path).ensure().db)
    worker = Worker(settings, "w", store=store, pipeline=tiny_pipeline)
    worker.run(poll_s=0.01, max_jobs=0)
    assert worker.warmup_s == {}


def test_an_out_of_memory_warm_up_moves_to_a_leaner_tier_and_a_failed_one_does_not_stop_the_worker(tmp_path):
    """Warm-up runs as a job does (run_within_memory): an OOM moves the tier one step leaner and runs again. A
    bucket that fails anyway is logged and skipped: the worker serves (a crash would restart into the same error)."""
    import torch

    from wanrt.runtime.factory import build_runtime
    from wanrt.runtime.memory import tiered

    pipe = build_runtime(Settings(device="cpu", warmup=("64x64x5",), memory="resident"))
    tier, inner = tiered(pipe.backend), tiered(pipe.backend).inner
    denoise, failures = inner.denoise, [1]

    def oom_once(*args, **kwargs):
        if failures:
            failures.pop()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return denoise(*args, **kwargs)

    inner.denoise = oom_once
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    worker = Worker(Settings(data_dir=tmp_path, warmup=("64x64x5",)), "w", store=store, pipeline=pipe)
    worker.run(poll_s=0.01, max_jobs=0)
    assert tier.tier == "swap" and list(worker.warmup_s) == ["64x64x5"]

    def always(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    tiered(pipe.backend).inner.denoise = always
    job = queue_job(paths, store)
    worker = Worker(Settings(data_dir=tmp_path, warmup=("64x64x5",)), "w2", store=store, pipeline=pipe)
    worker.run(poll_s=0.01, max_jobs=1)  # returns: the warm-up failure did not end the worker
    assert worker.warmup_s == {} and store.get(job).status == "error"


def test_an_idle_or_busy_worker_keeps_its_report_fresh(tmp_path, tiny_pipeline, monkeypatch):
    """The API takes a worker whose last report is older than LIVE_REPORT_S (120 s) for gone: its LoRA library
    leaves GET /loras, the API stops checking LoRA names, queued jobs say no worker runs. So a worker re-reports
    (every REPORT_EVERY_S) while idle and while busy on a long job (saying which), and its last report, once
    its slots end, is 'stopped' (never overwritten by a late re-send)."""
    from wanrt.jobs import worker as worker_mod
    from wanrt.lora_request import LIVE_REPORT_S, REPORT_EVERY_S

    assert REPORT_EVERY_S * 3 <= LIVE_REPORT_S  # a couple of missed re-sends do not make a worker look gone
    monkeypatch.setattr(worker_mod, "REPORT_EVERY_S", 0.1)
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    class Held:
        """The tiny pipeline, whose generate waits for `go`: the test decides how long the job keeps it busy."""

        def __init__(self, pipeline):
            self._pipeline, self.go = pipeline, threading.Event()

        def __getattr__(self, name):
            return getattr(self._pipeline, name)

        def generate(self, *args, **kwargs):
            self.go.wait(60)
            return self._pipeline.generate(*args, **kwargs)

    held = Held(tiny_pipeline)
    worker = Worker(settings, "w", store=store, pipeline=held)
    t = threading.Thread(target=worker.run, kwargs={"poll_s": 0.05, "max_jobs": 1})
    t.start()

    def report(until, timeout=60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            reports = store.workers()
            if reports and until(reports[0]):
                return reports[0]
            time.sleep(0.02)
        raise AssertionError(f"no such report: {store.workers()}")

    first = report(lambda w: w["state"] == "idle")
    later = report(lambda w: w["updated_at"] >= first["updated_at"] + 0.25)  # idle, nothing happened: re-sent
    assert later["state"] == "idle" and "job_id" not in later
    job_id = queue_job(paths, store)
    busy = report(lambda w: w["state"] == "busy")
    assert busy["job_id"] == job_id
    busy_later = report(lambda w: w["updated_at"] >= busy["updated_at"] + 0.25)  # the job is held: re-sent
    assert busy_later["state"] == "busy" and busy_later["job_id"] == job_id
    held.go.set()
    t.join(120)
    assert store.get(job_id).status == "completed"
    stopped = store.workers()[0]
    time.sleep(0.4)
    assert stopped["state"] == "stopped" and store.workers()[0]["updated_at"] == stopped["updated_at"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # slot 1's, on purpose
def test_a_claim_the_store_cannot_answer_is_retried_and_a_dead_slot_says_stopped(tmp_path, tiny_pipeline, monkeypatch):
    """A store that fails a claim for a while (SQLite locked, Redis restarting) costs a retry, not the slot; a slot
    whose loop dies anyway reports 'stopped' (else the reporter would re-send it as live for ever)."""
    import sqlite3

    class Flaky(SqliteJobStore):
        claim_failures = 2

        def claim(self, *args, **kwargs):
            if self.claim_failures:
                self.claim_failures -= 1
                raise sqlite3.OperationalError("database is locked")
            return super().claim(*args, **kwargs)

        def release_orphans(self, worker_id):
            if worker_id.endswith("/1"):
                raise RuntimeError("slot 1 cannot start")
            return super().release_orphans(worker_id)

    monkeypatch.setattr(Worker, "CLAIM_BACKOFF_S", (0.01, 0.05))
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2, concurrency=2)
    paths = DataPaths(tmp_path).ensure()
    store = Flaky(paths.db)
    job_id = queue_job(paths, store)
    Worker(settings, "w", store=store, pipeline=tiny_pipeline).run(poll_s=0.01, max_jobs=1)
    assert store.get(job_id).status == "completed" and store.claim_failures == 0
    assert {w["id"]: w["state"] for w in store.workers()} == {"w": "stopped", "w/1": "stopped"}

"""How a worker ends a job when it is not alone: a run that lost its job (its lease lapsed while it ran) beside the
run that re-claimed it, unique worker ids, a store that is away when a job ends, and a video on disk before
its job says completed. Real SQLite stores and files; faults are injected by thin subclasses, and os.replace and
os.fsync are wrapped (and still called) only to order two runs' steps or to see the calls."""

import os
import socket
import sqlite3
import stat
import threading
import time

import numpy as np
from test_worker import queue_job

from wanrt.config import Settings
from wanrt.jobs.paths import DataPaths, fsync_dir
from wanrt.jobs.store import SqliteJobStore
from wanrt.jobs.worker import Worker
from wanrt.runtime.video import Mp4Writer, probe_mp4


class Gated:
    """A pipeline whose generate stops at the first progress report of `stage` until `go` is set."""

    def __init__(self, pipeline, stage: str):
        self._pipeline, self.stage = pipeline, stage
        self.reached, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate(self, *args, progress=None, **kwargs):
        def gate(value, stage):
            if stage == self.stage and not self.reached.is_set():
                self.reached.set()
                self.go.wait(30)
            progress(value, stage)

        return self._pipeline.generate(*args, progress=gate, **kwargs)


class Unreachable(SqliteJobStore):
    """Worker A's view of the store: its heartbeats do not get through (a partition, a paused VM)."""

    def heartbeat(self, *args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")


def test_a_run_that_lost_its_job_leaves_the_new_owners_files_alone(tmp_path, tiny_pipeline, monkeypatch):
    """A's lease lapses while A still runs; B re-claims the job and has written its MP4 under its temp name when
    A finishes. A's complete() is refused ('lost'): A must not touch B's temp file, previews or video, and B's
    rename must find its file (it once failed the job as input_missing)."""
    settings = Settings(data_dir=tmp_path, lease_s=0.5, heartbeat_s=0.1)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    job_id = queue_job(paths, store)
    worker_a = Worker(settings, "A", store=Unreachable(paths.db), pipeline=tiny_pipeline)
    worker_b = Worker(settings, "B", store=SqliteJobStore(paths.db), pipeline=tiny_pipeline)
    pipe_a = Gated(Worker._clone_for_concurrency(tiny_pipeline), "text_encode")  # (its own VAE cache)
    b_renaming, a_ended, real_replace = threading.Event(), threading.Event(), os.replace

    def replace(src, dst):  # B's MP4 rename (the first one) waits until A has ended
        if str(dst).endswith(".mp4") and not b_renaming.is_set():
            b_renaming.set()
            a_ended.wait(30)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    outcomes = {}
    job_a = worker_a.store.claim("A", settings.lease_s)
    run_a = threading.Thread(target=lambda: outcomes.setdefault("A", worker_a.run_job(job_a, pipe_a, "A")))
    run_a.start()
    assert pipe_a.reached.wait(30)
    deadline = time.monotonic() + 10
    while (job_b := worker_b.store.claim("B", settings.lease_s)) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # A's lease lapses: none of its heartbeats gets through
    assert job_b is not None and job_b.id == job_id
    run_b = threading.Thread(target=lambda: outcomes.setdefault("B", worker_b.run_job(job_b, tiny_pipeline, "B")))
    run_b.start()
    assert b_renaming.wait(30)
    pipe_a.go.set()  # A runs to its end meanwhile
    run_a.join(30)
    assert outcomes["A"] == "lost"
    assert len(list(paths.outputs.glob(f".wanrt_{job_id}.mp4*.part"))) == 1  # B's, still there
    assert sorted(p.name for p in paths.previews.iterdir()) == [f"{job_id}.json", f"{job_id}.webp"]
    a_ended.set()
    run_b.join(30)
    assert outcomes["B"] == "completed"
    job = store.get(job_id)
    assert job.status == "completed" and job.worker_id == "B" and job.attempts == 2
    assert probe_mp4(job.video_path)["frames"] == 9
    assert [p.name for p in paths.outputs.iterdir()] == [f"wanrt_{job_id}.mp4"]  # no temp file left behind
    assert sorted(p.name for p in paths.previews.iterdir()) == [f"{job_id}.json", f"{job_id}.webp"]


def test_each_writer_of_a_video_and_each_preview_write_has_its_own_temp_file(tmp_path, monkeypatch):
    frames = np.zeros((5, 64, 64, 3), np.uint8)
    a, b = Mp4Writer(tmp_path / "v.mp4", 64, 64, 16), Mp4Writer(tmp_path / "v.mp4", 64, 64, 16)
    assert a.tmp_path != b.tmp_path and a.tmp_path.name.startswith(".v.mp4.") and a.tmp_path.suffix == ".part"
    a.write(frames[:3])
    b.write(frames)
    a.close()
    assert probe_mp4(tmp_path / "v.mp4")["frames"] == 3
    b.close()
    assert probe_mp4(tmp_path / "v.mp4")["frames"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]

    from wanrt.runtime import preview

    sources, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (sources.append(str(src)), real(src, dst))[1])
    preview._replace(tmp_path / "p.webp", b"one")
    preview._replace(tmp_path / "p.webp", b"two")
    assert len(set(sources)) == 2 and (tmp_path / "p.webp").read_bytes() == b"two"


def test_removing_a_jobs_files_removes_every_runs_temp_files_and_no_other_jobs(tmp_path):
    paths = DataPaths(tmp_path).ensure()
    mine = [paths.outputs / n for n in ("wanrt_j1.mp4", ".wanrt_j1.mp4.part", ".wanrt_j1.mp4.7-0a1b2c3d.part",
                                         ".wanrt_j1.mp4.8-ffffffff.part")]
    mine += [paths.previews / n for n in ("j1.webp", "j1.json", ".j1.webp.7-00000000.part", ".j1.json.7-1.part")]
    others = [paths.outputs / ".wanrt_j10.mp4.7-0a1b2c3d.part", paths.outputs / "wanrt_j10.mp4", paths.previews / "j10.webp"]
    for p in mine + others:
        p.write_bytes(b"x")
    assert sorted(paths.remove_job_files("j1", keep_input=True)) == sorted(map(str, mine))
    assert all(p.exists() for p in others)


def test_files_of_no_job_and_dead_runs_temp_files_are_swept_after_an_hour(tmp_path):
    """A kill -9 between writing an input and creating its job (or between deleting a job and its files) left
    files no job refers to, for ever. The API's hourly sweep removes them, and temp files whose job is not
    running; anything of a known job, anything changed within the hour and any name without a job id stays."""
    import uuid

    from wanrt.jobs.paths import STRAY_AFTER_S

    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    queued, _ = store.create({"prompt": "x"}, input_image="q_input.png")
    done, _ = store.create({"prompt": "x"}, input_image="d_input.png")
    assert store.claim("w", 30).id == queued.id  # the oldest: this one runs
    running = queued
    store.claim("w2", 30)
    store.complete(done.id, "w2", str(paths.output_path(done.id)), {})
    gone = str(uuid.uuid4())
    old = [paths.input_path(gone, "png"), paths.output_path(gone), paths.previews / f"{gone}.webp",  # no such job
           paths.outputs / f".{paths.output_path(done.id).name}.1-aa.part"]  # a dead run's temp file of a finished job
    kept = [paths.input_path(done.id, "png"), paths.output_path(done.id),  # a known job's
            paths.outputs / f".{paths.output_path(running.id).name}.1-bb.part",  # its job is still running
            paths.inputs / "notes.txt"]  # no job id in the name
    fresh = paths.input_path(str(uuid.uuid4()), "png")  # its job may be being created right now
    for p in old + kept + [fresh]:
        p.write_bytes(b"x")
    for p in old + kept:
        os.utime(p, (time.time() - STRAY_AFTER_S - 60,) * 2)

    def status(job_id):
        job = store.get(job_id, include_deleted=True)
        return None if job is None else job.status

    assert sorted(paths.remove_stray_files(STRAY_AFTER_S, status)) == sorted(map(str, old))
    assert all(p.exists() for p in kept + [fresh])


def test_worker_ids_are_unique_per_process_and_per_serve_instance_and_stable_across_its_restarts(tmp_path):
    from wanrt.api.server import WorkerSupervisor

    settings = Settings(data_dir=tmp_path)
    store = SqliteJobStore(DataPaths(tmp_path).ensure().db)
    a, b = Worker(settings, store=store), Worker(settings, store=store)  # e.g. two containers, both PID 1
    assert a.worker_id != b.worker_id and a.worker_id.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    assert Worker(settings, "stable", store=store).worker_id == "stable"

    def ids(**kw):
        return [WorkerSupervisor(Settings(**{"data_dir": tmp_path / "a", "port": 8189, **kw}), 2).worker_id(slot)
                for slot in (0, 1)]

    first = ids()
    assert first == ids() and first[0] != first[1]  # a restart of this serve: the same ids (orphans released)
    assert first[0].startswith(os.uname().nodename + "-") and first[0].endswith("-w0")
    others = ids(port=8190) + ids(data_dir=tmp_path / "b")  # other serve instances on this host
    assert not set(first) & set(others) and len(set(others)) == 4


class Outage(SqliteJobStore):
    """The store away when jobs end (Redis restarting, SQLite locked): the next `failures` calls that end a
    job raise, or every one until `away_until` (monotonic) once `away_s` is set."""

    failures, away_s, away_until = 0, 0.0, None

    def _away(self):
        if self.away_s and self.away_until is None:
            self.away_until = time.monotonic() + self.away_s
        if self.failures or (self.away_until is not None and time.monotonic() < self.away_until):
            self.failures = max(0, self.failures - 1)
            raise sqlite3.OperationalError("database is locked")

    def complete(self, *args, **kwargs):
        self._away()
        return super().complete(*args, **kwargs)

    def fail(self, *args, **kwargs):
        self._away()
        return super().fail(*args, **kwargs)


def test_a_store_outage_when_a_job_ends_is_retried_and_the_slot_runs_the_next_job(tmp_path, tiny_pipeline, monkeypatch):
    monkeypatch.setattr(Worker, "CLAIM_BACKOFF_S", (0.01, 0.05))
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2)
    paths = DataPaths(tmp_path).ensure()
    store = Outage(paths.db)
    store.failures = 3
    ids = [queue_job(paths, store, seed=i) for i in range(2)]
    Worker(settings, "w", store=store, pipeline=tiny_pipeline).run(poll_s=0.01, max_jobs=2)
    assert store.failures == 0
    for job in map(store.get, ids):
        assert job.status == "completed" and job.attempts == 1 and probe_mp4(job.video_path)["frames"] == 9


def test_a_job_the_store_cannot_record_is_left_to_be_claimed_again(tmp_path, tiny_pipeline, monkeypatch):
    """An outage longer than the lease: the finished job is not failed; it is left to its lease, claimed again
    and completed, and the slot lives on to run the next job."""
    monkeypatch.setattr(Worker, "CLAIM_BACKOFF_S", (0.01, 0.05))
    settings = Settings(data_dir=tmp_path, lease_s=0.3, heartbeat_s=0.05)
    paths = DataPaths(tmp_path).ensure()
    store = Outage(paths.db)
    store.away_s = 0.6  # from the first complete(): longer than the worker retries (about a lease)
    first, second = queue_job(paths, store, seed=0), queue_job(paths, store, seed=1)
    Worker(settings, "w", store=store, pipeline=tiny_pipeline).run(poll_s=0.01, max_jobs=3)
    assert store.get(first).status == "completed" and store.get(first).attempts == 2  # run again, not failed
    assert store.get(second).status == "completed" and probe_mp4(store.get(first).video_path)["frames"] == 9


def test_a_slot_outlives_a_job_that_does_not_end_cleanly(tmp_path, tiny_pipeline):
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2)
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    bad = queue_job(paths, store)
    (paths.inputs / f"{bad}_input.png").unlink()
    good = queue_job(paths, store)

    class Stuck(DataPaths):
        def remove_job_files(self, *args, **kwargs):  # e.g. a file it may not remove
            raise PermissionError("outputs/ is read-only")

    worker = Worker(settings, "w", store=store, pipeline=tiny_pipeline)
    worker.paths = Stuck(tmp_path)
    worker.run(poll_s=0.01, max_jobs=2)
    assert store.get(bad).status == "error" and store.get(good).status == "completed"


def test_a_finished_mp4_is_on_disk_before_its_job_says_completed(tmp_path, tiny_pipeline, monkeypatch):
    """The file's bytes (fsync of the temp file, before the rename) and the rename (fsync of outputs/) come
    before complete(): after a power loss a completed job never downloads a truncated video. The calls are
    recorded; what fsync does to a disk cannot be seen from here."""
    calls, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real(fd)

    class Recording(SqliteJobStore):
        def complete(self, *args, **kwargs):
            calls.append(("complete", None))
            return super().complete(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    settings = Settings(data_dir=tmp_path, heartbeat_s=0.2)
    paths = DataPaths(tmp_path).ensure()
    store = Recording(paths.db)
    job_id = queue_job(paths, store)
    Worker(settings, "w", store=store, pipeline=tiny_pipeline).run(poll_s=0.01, max_jobs=1)
    job = store.get(job_id)
    assert job.status == "completed" and [p.name for p in paths.outputs.iterdir()] == [f"wanrt_{job_id}.mp4"]
    video, outputs = os.stat(job.video_path).st_ino, paths.outputs.stat().st_ino
    assert calls.index(("file", video)) < calls.index(("dir", outputs)) < calls.index(("complete", None))
    fsync_dir(tmp_path / "missing")  # a directory it cannot open: no error (best effort)

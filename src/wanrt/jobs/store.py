"""Durable job records in SQLite (WAL): the embedded default queue between the API and the workers.

A job is written (and fsynced) before /generate answers. Workers claim the oldest queued job with a lease
that their heartbeat extends; a job whose lease ran out (its worker died) is claimed again, up to
MAX_ATTEMPTS, so nothing accepted is lost and a job that kills every worker does not loop forever.
Each thread gets its own connection; every write is one short IMMEDIATE transaction.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MAX_ATTEMPTS = 3
TERMINAL = ("completed", "error", "cancelled")
STATES = ("queued", "processing") + TERMINAL

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT,
    input_image TEXT,
    video_path TEXT,
    error TEXT,
    error_type TEXT,
    retryable INTEGER,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker_id TEXT,
    device TEXT,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    timings TEXT,
    idempotency_key TEXT UNIQUE,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT NOT NULL, updated_at REAL NOT NULL);
"""


@dataclass
class Job:
    id: str
    status: str
    params: dict
    progress: float = 0.0
    stage: str | None = None
    input_image: str | None = None
    video_path: str | None = None
    error: str | None = None
    error_type: str | None = None
    retryable: bool | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    device: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    timings: dict = field(default_factory=dict)
    idempotency_key: str | None = None
    cancel_requested: bool = False
    deleted: bool = False
    seq: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["timings"] = json.loads(d["timings"]) if d["timings"] else {}
        d["retryable"] = None if d["retryable"] is None else bool(d["retryable"])
        d["cancel_requested"], d["deleted"] = bool(d["cancel_requested"]), bool(d["deleted"])
        return cls(**d)


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # accepted means on disk
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _transaction(self):
        """One IMMEDIATE transaction (the write lock up front, so read-then-write is atomic): committed when
        the block ends, returns included; rolled back when it raises."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _write(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._transaction() as conn:
            return conn.execute(sql, args).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------ API side
    def create(self, params: dict, input_image: str | None = None, idempotency_key: str | None = None,
               job_id: str | None = None, queue_max: int | None = None) -> tuple[Job, bool]:
        """Insert a queued job. Returns (job, created); an existing Idempotency-Key returns its job.
        Raises QueueFull when queue_max queued jobs are waiting."""
        with self._transaction() as conn:
            if idempotency_key:
                row = conn.execute("SELECT * FROM jobs WHERE idempotency_key=? AND deleted=0", (idempotency_key,)).fetchone()
                if row is not None:
                    return Job.from_row(row), False
            if queue_max is not None:
                (queued,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE status='queued' AND deleted=0").fetchone()
                if queued >= queue_max:
                    raise QueueFull(queued)
            job_id = job_id or str(uuid.uuid4())
            conn.execute(
                "INSERT INTO jobs (id, status, params, input_image, created_at, idempotency_key) VALUES (?,?,?,?,?,?)",
                (job_id, "queued", json.dumps(params), input_image, time.time(), idempotency_key),
            )
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return Job.from_row(row), True

    def get(self, job_id: str, include_deleted: bool = False) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        job = Job.from_row(row)
        return None if job.deleted and not include_deleted else job

    def get_by_idempotency_key(self, key: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE idempotency_key=? AND deleted=0", (key,)).fetchone()
        return None if row is None else Job.from_row(row)

    def list(self, status: str | None = None, limit: int | None = None, offset: int = 0) -> tuple[list[Job], int]:
        where, args = "deleted=0", []
        if status:
            where += " AND status=?"
            args.append(status)
        conn = self._conn()
        (total,) = conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", args).fetchone()
        sql = f"SELECT * FROM jobs WHERE {where} ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args += [limit, offset]
        return [Job.from_row(r) for r in conn.execute(sql, args).fetchall()], total

    def queue_position(self, job: Job) -> int:
        """1 = next to run."""
        (ahead,) = self._conn().execute(
            "SELECT COUNT(*) FROM jobs WHERE status='queued' AND deleted=0 AND seq<?", (job.seq,)).fetchone()
        return ahead + 1

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        for status, n in self._conn().execute("SELECT status, COUNT(*) FROM jobs WHERE deleted=0 GROUP BY status"):
            counts[status] = n
        return counts

    def delete(self, job_id: str) -> Job | None:
        """Hide the job from the API at once. A running job is asked to cancel (its worker removes the
        files and the row); any other job's row is removed now and returned so the caller deletes files."""
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=? AND deleted=0", (job_id,)).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            if job.status == "processing":
                conn.execute("UPDATE jobs SET deleted=1, cancel_requested=1 WHERE id=?", (job_id,))
            else:
                conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            return job

    def cancel(self, job_id: str) -> Job | None:
        """Cancel without deleting: queued -> cancelled now; processing -> the worker stops within a step."""
        self._write("UPDATE jobs SET status='cancelled', finished_at=?, error='Cancelled by request', "
                    "error_type='cancelled', retryable=0 WHERE id=? AND status='queued' AND deleted=0",
                    (time.time(), job_id))
        self._write("UPDATE jobs SET cancel_requested=1 WHERE id=? AND status='processing'", (job_id,))
        return self.get(job_id)

    def expire(self, older_than_s: float) -> list[Job]:
        """Remove finished jobs whose finished_at is older than the TTL; returns them for file cleanup."""
        cutoff = time.time() - older_than_s
        rows = self._write("DELETE FROM jobs WHERE status IN ('completed','error','cancelled') "
                           "AND finished_at < ? RETURNING *", (cutoff,))
        return [Job.from_row(r) for r in rows]

    # ------------------------------------------------------------------ worker side
    def claim(self, worker_id: str, lease_s: float, device: str | None = None) -> Job | None:
        """Atomically take the oldest queued job, or one whose worker's lease ran out."""
        now = time.time()
        with self._transaction() as conn:
            # Jobs whose worker vanished too often end as errors instead of being retried forever.
            conn.execute(
                "UPDATE jobs SET status='error', finished_at=?, error=?, error_type='worker_lost', retryable=1, "
                "lease_until=NULL WHERE ((status='processing' AND lease_until<?) OR status='queued') AND attempts>=? AND deleted=0",
                (now, f"The worker running this job died {MAX_ATTEMPTS} times", now, MAX_ATTEMPTS))
            row = conn.execute(
                "SELECT id FROM jobs WHERE deleted=0 AND (status='queued' OR (status='processing' AND lease_until<?)) "
                "ORDER BY seq LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            row = conn.execute(
                "UPDATE jobs SET status='processing', worker_id=?, device=?, lease_until=?, attempts=attempts+1, "
                "started_at=COALESCE(started_at, ?), progress=0, stage='starting' WHERE id=? RETURNING *",
                (worker_id, device, now + lease_s, now, row["id"])).fetchone()
            return Job.from_row(row)

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, progress: float | None = None,
                  stage: str | None = None) -> bool:
        """Extend the lease (and record progress). Returns False when the worker should stop: the job was
        cancelled/deleted, or it is no longer this worker's (its lease ran out and another took it)."""
        rows = self._write(
            "UPDATE jobs SET lease_until=?, progress=COALESCE(?, progress), stage=COALESCE(?, stage) "
            "WHERE id=? AND worker_id=? AND status='processing' RETURNING cancel_requested",
            (time.time() + lease_s, progress, stage, job_id, worker_id))
        return bool(rows) and not rows[0]["cancel_requested"]

    def complete(self, job_id: str, worker_id: str, video_path: str, timings: dict, params: dict | None = None) -> bool:
        rows = self._write(
            "UPDATE jobs SET status='completed', progress=100, stage='done', video_path=?, timings=?, finished_at=?, "
            "lease_until=NULL, params=COALESCE(?, params) WHERE id=? AND worker_id=? AND status='processing' RETURNING id",
            (video_path, json.dumps(timings), time.time(), json.dumps(params) if params else None, job_id, worker_id))
        return bool(rows)

    def fail(self, job_id: str, worker_id: str, error: str, error_type: str, retryable: bool, timings: dict | None = None) -> bool:
        rows = self._write(
            "UPDATE jobs SET status='error', error=?, error_type=?, retryable=?, timings=?, finished_at=?, lease_until=NULL "
            "WHERE id=? AND worker_id=? AND status='processing' RETURNING id",
            (error, error_type, int(retryable), json.dumps(timings or {}), time.time(), job_id, worker_id))
        return bool(rows)

    def finish_cancelled(self, job_id: str, worker_id: str) -> Job | None:
        """The worker stopped a cancelled job: deleted jobs vanish, others end as 'cancelled'."""
        job = self.get(job_id, include_deleted=True)
        if job is None:
            return None
        if job.deleted:
            self._write("DELETE FROM jobs WHERE id=?", (job_id,))
        else:
            self._write("UPDATE jobs SET status='cancelled', finished_at=?, error='Cancelled by request', "
                        "error_type='cancelled', retryable=0, lease_until=NULL WHERE id=? AND worker_id=?",
                        (time.time(), job_id, worker_id))
        return job

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a job back to the queue (graceful shutdown); it does not count as an attempt."""
        rows = self._write(
            "UPDATE jobs SET status='queued', worker_id=NULL, lease_until=NULL, progress=0, stage=NULL, "
            "attempts=MAX(attempts-1, 0) WHERE id=? AND worker_id=? AND status='processing' RETURNING id",
            (job_id, worker_id))
        return bool(rows)

    def report_worker(self, worker_id: str, info: dict) -> None:
        """What a worker runs (device, backend, compile counts, jobs done), for /metrics and /debug/workers."""
        self._write("INSERT INTO workers (id, info, updated_at) VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET "
                    "info=excluded.info, updated_at=excluded.updated_at", (worker_id, json.dumps(info), time.time()))

    def workers(self) -> list[dict]:
        rows = self._conn().execute("SELECT id, info, updated_at FROM workers ORDER BY id").fetchall()
        return [{"id": r["id"], "updated_at": r["updated_at"], **json.loads(r["info"])} for r in rows]

    def release_orphans(self, worker_id: str) -> int:
        """At worker start: jobs still marked as ours belong to our previous, dead, life."""
        rows = self._write(
            "UPDATE jobs SET status='queued', worker_id=NULL, lease_until=NULL, progress=0, stage=NULL "
            "WHERE worker_id=? AND status='processing' RETURNING id", (worker_id,))
        return len(rows)


class QueueFull(Exception):
    def __init__(self, queued: int):
        super().__init__(f"queue is full ({queued} jobs waiting)")
        self.queued = queued

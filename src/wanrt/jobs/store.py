"""Durable job records in SQLite (WAL): the embedded default queue between the API and the workers.

A job is written (and fsynced) before /generate answers. Workers claim the oldest queued job with a lease
that their heartbeat extends; a job whose lease ran out (its worker died) is claimed again, up to
MAX_ATTEMPTS, so nothing accepted is lost and a job that kills every worker does not loop forever.
Each thread gets its own connection; every read-then-write is one short IMMEDIATE transaction. Per-state
counts live in a table that triggers keep in step, so counts() and list()'s total are constant time.
SqliteJobStore implements jobs.protocol.JobStore.
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
CREATE INDEX IF NOT EXISTS jobs_status_live_seq ON jobs(status, deleted, seq);
CREATE INDEX IF NOT EXISTS jobs_live_seq ON jobs(deleted, seq);
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs(finished_at);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS stage_totals (stage TEXT PRIMARY KEY, seconds REAL NOT NULL, count INTEGER NOT NULL);
"""

SCHEMA_VERSION = 2
# Run once, in one IMMEDIATE transaction, by the first process that opens a version-1 (or new) database.
# job_counts is kept by triggers in the same transaction as every change, so counts() and list()'s total are
# constant time instead of a COUNT over every job kept.
MIGRATE = (
    "DROP INDEX IF EXISTS jobs_status_seq",  # superseded by jobs_status_live_seq (covers the deleted filter)
    "UPDATE jobs SET idempotency_key=NULL WHERE deleted=1",  # a hidden job no longer holds its key
    """CREATE TRIGGER IF NOT EXISTS jobs_count_insert AFTER INSERT ON jobs BEGIN
         UPDATE job_counts SET n = n + (NEW.deleted = 0) WHERE status = NEW.status; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_count_delete AFTER DELETE ON jobs BEGIN
         UPDATE job_counts SET n = n - (OLD.deleted = 0) WHERE status = OLD.status; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_count_update AFTER UPDATE OF status, deleted ON jobs
         WHEN OLD.status IS NOT NEW.status OR OLD.deleted IS NOT NEW.deleted BEGIN
         UPDATE job_counts SET n = n - (OLD.deleted = 0) WHERE status = OLD.status;
         UPDATE job_counts SET n = n + (NEW.deleted = 0) WHERE status = NEW.status; END""",
    # seed from the jobs already kept, so upgraded databases keep their numbers
    """INSERT OR REPLACE INTO stage_totals (stage, seconds, count)
         SELECT CASE WHEN substr(t.key, -2) = '_s' THEN substr(t.key, 1, length(t.key) - 2) ELSE t.key END AS st,
                SUM(t.value), COUNT(*)
         FROM jobs, json_each(jobs.timings) AS t
         WHERE jobs.status = 'completed' AND jobs.deleted = 0 AND t.type IN ('real', 'integer') GROUP BY st""",
)


def stage_seconds(timings: dict) -> dict[str, float]:
    """Pipeline timings ({"vae_decode_s": 1.2, ...}) as {stage: seconds}, the shape stage_totals() sums."""
    return {k.removesuffix("_s"): float(v) for k, v in (timings or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


class SqliteJobStore:
    """The JobStore protocol (jobs.protocol) on one SQLite file."""

    EXPIRE_BATCH = 500  # jobs removed per write transaction, so the write lock is held briefly
    notifies_changes = False  # no cross-process notification: wait_for_change only sleeps

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return
            for sql in MIGRATE:
                conn.execute(sql)
            for status in STATES:
                conn.execute("INSERT OR REPLACE INTO job_counts (status, n) "
                             "SELECT ?, COUNT(*) FROM jobs WHERE status=? AND deleted=0", (status, status))
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
                queued = self._count(conn, "queued")
                if queued >= queue_max:
                    raise QueueFull(queued)
            job_id = job_id or str(uuid.uuid4())
            row = conn.execute(
                "INSERT INTO jobs (id, status, params, input_image, created_at, idempotency_key) VALUES (?,?,?,?,?,?) "
                "RETURNING *", (job_id, "queued", json.dumps(params), input_image, time.time(), idempotency_key),
            ).fetchone()
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

    @staticmethod
    def _count(conn: sqlite3.Connection, status: str | None) -> int:
        if status is None:
            (n,) = conn.execute("SELECT COALESCE(SUM(n), 0) FROM job_counts").fetchone()
        else:
            row = conn.execute("SELECT n FROM job_counts WHERE status=?", (status,)).fetchone()
            n = row[0] if row else 0
        return n

    def list(self, status: str | None = None, limit: int | None = None, offset: int = 0) -> tuple[list[Job], int]:
        """A page walks jobs_status_live_seq (or jobs_live_seq) from offset; the total comes from job_counts.
        One read transaction, so page and total agree."""
        where, args = "deleted=0", []
        if status:
            where += " AND status=?"
            args.append(status)
        sql = f"SELECT * FROM jobs WHERE {where} ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args += [limit, offset]
        conn = self._conn()
        conn.execute("BEGIN")  # deferred: a read snapshot, no write lock
        try:
            total = self._count(conn, status or None)
            rows = conn.execute(sql, args).fetchall()
        finally:
            conn.execute("COMMIT")
        return [Job.from_row(r) for r in rows], total

    def queue_position(self, job: Job) -> int:
        """1 = next to run. A count over the queued part of jobs_status_live_seq, in proportion to the position."""
        (ahead,) = self._conn().execute(
            "SELECT COUNT(*) FROM jobs WHERE status='queued' AND deleted=0 AND seq<?", (job.seq,)).fetchone()
        return ahead + 1

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        for status, n in self._conn().execute("SELECT status, n FROM job_counts"):
            counts[status] = n
        return counts

    def stage_totals(self) -> dict[str, tuple[float, int]]:
        rows = self._conn().execute("SELECT stage, seconds, count FROM stage_totals ORDER BY stage").fetchall()
        return {r["stage"]: (r["seconds"], r["count"]) for r in rows}

    def wait_for_change(self, job_id: str, timeout: float) -> None:
        """No notifications across processes in SQLite: sleep; the caller backs off."""
        time.sleep(max(0.0, timeout))

    def delete(self, job_id: str) -> Job | None:
        """Hide the job from the API at once. A running job is asked to cancel (its worker removes the
        files and the row); any other job's row is removed now and returned so the caller deletes files."""
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=? AND deleted=0", (job_id,)).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            if job.status == "processing":
                # the key is free again at once (a hidden job must not answer, nor block, a new request)
                conn.execute("UPDATE jobs SET deleted=1, cancel_requested=1, idempotency_key=NULL WHERE id=?", (job_id,))
            else:
                conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            return job

    def cancel(self, job_id: str) -> Job | None:
        """Cancel without deleting: queued -> cancelled now; processing -> the worker stops within a step."""
        with self._transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET status='cancelled', finished_at=?, error='Cancelled by request', error_type='cancelled', "
                "retryable=0 WHERE id=? AND status='queued' AND deleted=0 RETURNING *", (time.time(), job_id)).fetchone()
            if row is None:
                row = conn.execute("UPDATE jobs SET cancel_requested=1 WHERE id=? AND status='processing' AND deleted=0 "
                                   "RETURNING *", (job_id,)).fetchone()
            if row is None:
                row = conn.execute("SELECT * FROM jobs WHERE id=? AND deleted=0", (job_id,)).fetchone()
            return None if row is None else Job.from_row(row)

    def expire(self, older_than_s: float) -> list[Job]:
        """Remove finished jobs whose finished_at is older than the TTL, and deleted jobs whose worker died
        (lease over) that long ago; returns them for file cleanup. Batches keep each write lock short; each
        DELETE re-checks its condition, so a job that changed meanwhile stays."""
        cutoff = time.time() - older_than_s
        out: list[Job] = []
        while True:
            rows = self._write(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE finished_at < ? "  # '+': walk jobs_finished_at
                "AND +status IN ('completed','error','cancelled') LIMIT ?) RETURNING *", (cutoff, self.EXPIRE_BATCH))
            out += [Job.from_row(r) for r in rows]
            if len(rows) < self.EXPIRE_BATCH:
                break
        rows = self._write("DELETE FROM jobs WHERE status='processing' AND deleted=1 AND lease_until < ? RETURNING *",
                           (cutoff,))
        return out + [Job.from_row(r) for r in rows]

    # ------------------------------------------------------------------ worker side
    def claim(self, worker_id: str, lease_s: float, device: str | None = None) -> Job | None:
        """Atomically take the oldest queued job, or one whose worker's lease ran out."""
        now = time.time()
        with self._transaction() as conn:
            # Jobs whose worker died (few: one per dead worker slot): a cancel asked meanwhile ends them as
            # cancelled; those that lost their worker too often end as errors instead of being retried forever.
            conn.execute(
                "UPDATE jobs SET status='cancelled', finished_at=?, error='Cancelled by request', error_type='cancelled', "
                "retryable=0, lease_until=NULL WHERE status='processing' AND deleted=0 AND lease_until<? AND cancel_requested=1",
                (now, now))
            self._poison(conn, "status='processing' AND deleted=0 AND lease_until<? AND attempts>=?", (now, MAX_ATTEMPTS), now)
            while True:
                # two index lookups, not one OR (which would walk every finished job older than the queue)
                rows = [r for r in (
                    conn.execute("SELECT seq, id, attempts FROM jobs WHERE status='queued' AND deleted=0 "
                                 "ORDER BY seq LIMIT 1").fetchone(),
                    conn.execute("SELECT seq, id, attempts FROM jobs WHERE status='processing' AND deleted=0 "
                                 "AND lease_until<? ORDER BY seq LIMIT 1", (now,)).fetchone()) if r is not None]
                if not rows:
                    return None
                row = min(rows, key=lambda r: r["seq"])
                if row["attempts"] < MAX_ATTEMPTS:
                    break
                self._poison(conn, "id=?", (row["id"],), now)  # re-queued orphan that died too often
            row = conn.execute(
                "UPDATE jobs SET status='processing', worker_id=?, device=?, lease_until=?, attempts=attempts+1, "
                "started_at=COALESCE(started_at, ?), progress=0, stage='starting' WHERE id=? RETURNING *",
                (worker_id, device, now + lease_s, now, row["id"])).fetchone()
            return Job.from_row(row)

    @staticmethod
    def _poison(conn: sqlite3.Connection, where: str, args: tuple, now: float) -> None:
        conn.execute(f"UPDATE jobs SET status='error', finished_at=?, error=?, error_type='worker_lost', retryable=1, "
                     f"lease_until=NULL WHERE {where}", (now, f"The worker running this job died {MAX_ATTEMPTS} times", *args))

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, progress: float | None = None,
                  stage: str | None = None) -> bool:
        """Extend the lease (and record progress). Returns False when the worker should stop: the job was
        cancelled/deleted, or it is no longer this worker's (its lease ran out and another took it)."""
        rows = self._write(
            "UPDATE jobs SET lease_until=?, progress=COALESCE(?, progress), stage=COALESCE(?, stage) "
            "WHERE id=? AND worker_id=? AND status='processing' RETURNING cancel_requested",
            (time.time() + lease_s, progress, stage, job_id, worker_id))
        return bool(rows) and not rows[0]["cancel_requested"]

    # complete/fail/release only act on a job this worker owns that nobody asked to cancel (deleted implies
    # cancel_requested): otherwise they return False and the worker goes the cancel path (finish_cancelled).
    _OURS = "id=? AND worker_id=? AND status='processing' AND cancel_requested=0"

    def complete(self, job_id: str, worker_id: str, video_path: str, timings: dict, params: dict | None = None) -> bool:
        with self._transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET status='completed', progress=100, stage='done', video_path=?, timings=?, finished_at=?, "
                f"lease_until=NULL, params=COALESCE(?, params) WHERE {self._OURS} RETURNING id",
                (video_path, json.dumps(timings), time.time(), json.dumps(params) if params else None, job_id,
                 worker_id)).fetchone()
            if row is None:
                return False
            conn.executemany(
                "INSERT INTO stage_totals (stage, seconds, count) VALUES (?, ?, 1) ON CONFLICT(stage) DO UPDATE SET "
                "seconds=seconds+excluded.seconds, count=count+1", list(stage_seconds(timings).items()))
            return True

    def fail(self, job_id: str, worker_id: str, error: str, error_type: str, retryable: bool, timings: dict | None = None) -> bool:
        rows = self._write(
            "UPDATE jobs SET status='error', error=?, error_type=?, retryable=?, timings=?, finished_at=?, lease_until=NULL "
            f"WHERE {self._OURS} RETURNING id",
            (error, error_type, int(retryable), json.dumps(timings or {}), time.time(), job_id, worker_id))
        return bool(rows)

    def finish_cancelled(self, job_id: str, worker_id: str) -> Job | None:
        """The worker stopped a cancelled job: deleted jobs vanish, others end as 'cancelled'. Returns the job
        as it was, or None when it is not (or no longer) this worker's."""
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=? AND worker_id=? AND status='processing'",
                               (job_id, worker_id)).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            if job.deleted:
                conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            else:
                conn.execute("UPDATE jobs SET status='cancelled', finished_at=?, error='Cancelled by request', "
                             "error_type='cancelled', retryable=0, lease_until=NULL WHERE id=?", (time.time(), job_id))
            return job

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a job back to the queue (graceful shutdown); it does not count as an attempt."""
        rows = self._write(
            "UPDATE jobs SET status='queued', worker_id=NULL, lease_until=NULL, progress=0, stage=NULL, "
            f"attempts=MAX(attempts-1, 0) WHERE {self._OURS} RETURNING id", (job_id, worker_id))
        return bool(rows)

    def report_worker(self, worker_id: str, info: dict) -> None:
        """What a worker runs (device, backend, compile counts, jobs done), for /metrics and /debug/workers."""
        self._write("INSERT INTO workers (id, info, updated_at) VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET "
                    "info=excluded.info, updated_at=excluded.updated_at", (worker_id, json.dumps(info), time.time()))

    def workers(self) -> list[dict]:
        rows = self._conn().execute("SELECT id, info, updated_at FROM workers ORDER BY id").fetchall()
        return [{"id": r["id"], "updated_at": r["updated_at"], **json.loads(r["info"])} for r in rows]

    def release_orphans(self, worker_id: str) -> int:
        """At worker start: jobs still marked as ours belong to our previous, dead, life. Re-queued, unless a
        cancel was asked: those end as cancelled, and deleted ones get a lapsed lease so expire() removes them
        with their files."""
        now = time.time()
        with self._transaction() as conn:
            rows = conn.execute(
                "UPDATE jobs SET status='queued', worker_id=NULL, lease_until=NULL, progress=0, stage=NULL "
                "WHERE worker_id=? AND status='processing' AND cancel_requested=0 RETURNING id", (worker_id,)).fetchall()
            conn.execute(
                "UPDATE jobs SET status='cancelled', finished_at=?, error='Cancelled by request', error_type='cancelled', "
                "retryable=0, lease_until=NULL WHERE worker_id=? AND status='processing' AND cancel_requested=1 AND deleted=0",
                (now, worker_id))
            conn.execute("UPDATE jobs SET lease_until=0 WHERE worker_id=? AND status='processing' AND deleted=1", (worker_id,))
            return len(rows)


class QueueFull(Exception):
    def __init__(self, queued: int):
        super().__init__(f"queue is full ({queued} jobs waiting)")
        self.queued = queued

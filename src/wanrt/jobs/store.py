"""Durable job records in SQLite (WAL): the embedded default queue between the API and the workers.

A job is written (and fsynced) before /generate answers. Workers claim the oldest queued job with a lease
that their heartbeat extends; a job whose lease ran out (its worker died) is claimed again, up to
MAX_ATTEMPTS, so nothing accepted is lost and a job that kills every worker does not loop forever.
Each thread gets its own connection; every read-then-write is one short IMMEDIATE transaction. Per-state
counts live in a table that triggers keep in step, so counts() and list()'s total are constant time.
Webhook deliveries are rows too, queued by triggers in the very transaction that changes the job's state (so
no event is lost or sent for a change that rolled back), and claimed by API processes with a lease.
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

from wanrt.lora_request import LIVE_REPORT_S, pick_next

MAX_ATTEMPTS = 3
CAPABLE_WINDOW = 64  # queued jobs a worker without LoRA slots looks through for one it can run
NO_LORAS = "COALESCE(json_array_length(params, '$.loras'), 0) = 0"  # a job without a LoRA set (SQL)
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

SCHEMA_VERSION = 4
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

# Webhook events are queued by the transaction that makes them (SQL's julianday clock is time.time()'s).
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_EVENT = "CASE NEW.status WHEN 'processing' THEN 'progress' ELSE NEW.status END"
_DELIVERY = ("INSERT INTO webhook_deliveries (id, job_id, event, url, next_at, created_at, updated_at) VALUES "
             "('msg_' || lower(hex(randomblob(12))), NEW.id, {event}, NEW.webhook, {now}, {now}, {now})")
# Version 3: webhooks (per job: URL and events; deliveries with attempts and a lease), GPU-seconds and cost per
# job, and the usage counters /metrics reads.
MIGRATE_V3 = (
    "ALTER TABLE jobs ADD COLUMN webhook TEXT",
    "ALTER TABLE jobs ADD COLUMN webhook_events TEXT",  # comma-separated: completed,error,cancelled,progress
    "ALTER TABLE jobs ADD COLUMN gpu_seconds TEXT",  # JSON {stage: seconds}, summed over the job's runs
    "ALTER TABLE jobs ADD COLUMN cost_usd REAL",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         id TEXT UNIQUE NOT NULL,
         job_id TEXT NOT NULL,
         event TEXT NOT NULL,
         url TEXT NOT NULL,
         state TEXT NOT NULL DEFAULT 'pending',
         attempts INTEGER NOT NULL DEFAULT 0,
         next_at REAL NOT NULL,
         created_at REAL NOT NULL,
         updated_at REAL NOT NULL,
         owner TEXT,
         body TEXT,
         last_error TEXT)""",
    "CREATE INDEX IF NOT EXISTS webhook_state_next ON webhook_deliveries(state, next_at)",
    "CREATE INDEX IF NOT EXISTS webhook_job ON webhook_deliveries(job_id)",
    # queued -> processing is the first 'progress' event; the terminal states are their own events. A job
    # deleted while it runs is gone, not cancelled: no event.
    f"""CREATE TRIGGER IF NOT EXISTS jobs_webhook_status AFTER UPDATE OF status ON jobs
         WHEN NEW.webhook IS NOT NULL AND NEW.deleted = 0 AND OLD.status IS NOT NEW.status AND NEW.status != 'queued'
              AND instr(',' || NEW.webhook_events || ',', ',' || {_EVENT} || ',') > 0
         BEGIN {_DELIVERY.format(event=_EVENT, now=_NOW)}; END""",
    # then one 'progress' event each time a heartbeat's progress passes another 10 %
    f"""CREATE TRIGGER IF NOT EXISTS jobs_webhook_progress AFTER UPDATE OF progress ON jobs
         WHEN NEW.webhook IS NOT NULL AND NEW.deleted = 0 AND NEW.status = 'processing' AND OLD.status = 'processing'
              AND CAST(NEW.progress / 10 AS INTEGER) > CAST(OLD.progress / 10 AS INTEGER)
              AND instr(',' || NEW.webhook_events || ',', ',progress,') > 0
         BEGIN {_DELIVERY.format(event="'progress'", now=_NOW)}; END""",
    "CREATE TABLE IF NOT EXISTS usage_totals (key TEXT PRIMARY KEY, value REAL NOT NULL)",
)
# Version 4: LoRA affinity (claim with loaded_key): how many claims took a younger job ahead of this one.
# And a version of the queued set, bumped by triggers whenever a job enters or leaves it, so a queue position
# read again while the queue has not moved is answered from memory (queue_position).
MIGRATE_V4 = (
    "ALTER TABLE jobs ADD COLUMN passed_over INTEGER NOT NULL DEFAULT 0",
    "CREATE TABLE IF NOT EXISTS queue_version (id INTEGER PRIMARY KEY CHECK (id = 0), v INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO queue_version (id, v) VALUES (0, 0)",
    """CREATE TRIGGER IF NOT EXISTS jobs_queue_insert AFTER INSERT ON jobs WHEN NEW.status = 'queued' BEGIN
         UPDATE queue_version SET v = v + 1; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_queue_delete AFTER DELETE ON jobs WHEN OLD.status = 'queued' BEGIN
         UPDATE queue_version SET v = v + 1; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_queue_update AFTER UPDATE OF status, deleted ON jobs
         WHEN (OLD.status = 'queued' OR NEW.status = 'queued')
              AND (OLD.status IS NOT NEW.status OR OLD.deleted IS NOT NEW.deleted) BEGIN
         UPDATE queue_version SET v = v + 1; END""",
)
DELIVERY_STATES = ("pending", "delivered", "failed", "dropped")  # dropped: its job was gone before a first try

# /metrics histogram of GPU-seconds per job run, sized to the seed's presets: seconds on an H100 (fast ~10,
# default ~30) up to the seed's own 4090/3080 times (30-240 s), with room below for tiny and CPU runs.
GPU_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300, 600, 1200)


def affinity_window(queued: list[dict], skip: int) -> list[dict]:
    """The window of queued jobs (oldest first, each with `passed_over`) that a claim with LoRA affinity hands
    lora_request.pick_next: the oldest skip + 1, cut after the first job already passed over `skip` times. So
    one claim passes over at most `skip` jobs (pick_next) and no job is ever passed over more than `skip` times
    in all, however many younger jobs share the loaded set (pick_next alone bounds that only by max_wait_s)."""
    window = queued[: skip + 1]
    for i, job in enumerate(window):
        if int(job.get("passed_over") or 0) >= skip:
            return window[: i + 1]
    return window


def usage_bucket(seconds: float) -> str:
    """The histogram bucket (its `le` label) a run of `seconds` falls in: the smallest bound >= seconds."""
    return next((f"{b:g}" for b in GPU_SECONDS_BUCKETS if seconds <= b), "+Inf")


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
    webhook: str | None = None  # the URL (shown only in /debug/job: it may carry a token)
    webhook_events: str | None = None  # comma-separated
    gpu_seconds: dict = field(default_factory=dict)  # {stage: device seconds}, summed over the job's runs
    cost_usd: float | None = None

    @property
    def gpu_seconds_total(self) -> float | None:
        return round(sum(self.gpu_seconds.values()), 6) if self.gpu_seconds else None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d.pop("passed_over", None)  # the queue's bookkeeping (claim with LoRA affinity), not part of the job
        d["params"] = json.loads(d["params"])
        d["timings"] = json.loads(d["timings"]) if d["timings"] else {}
        d["gpu_seconds"] = json.loads(d["gpu_seconds"]) if d.get("gpu_seconds") else {}
        d["retryable"] = None if d["retryable"] is None else bool(d["retryable"])
        d["cancel_requested"], d["deleted"] = bool(d["cancel_requested"]), bool(d["deleted"])
        return cls(**d)


@dataclass
class WebhookDelivery:
    """One event of one job to its webhook URL; `id` is the Standard Webhooks `webhook-id` (the same on retries)."""

    id: str
    job_id: str
    event: str  # completed | error | cancelled | progress
    url: str
    state: str = "pending"  # DELIVERY_STATES
    attempts: int = 0  # claims so far (the claim counts the attempt it starts)
    next_at: float = 0.0  # due time; while claimed, the end of the claim's lease
    created_at: float = 0.0
    updated_at: float = 0.0
    owner: str | None = None  # the claim that may report the attempt's outcome
    body: str | None = None  # frozen at the first attempt, so retries send (and sign) the same bytes
    last_error: str | None = None

    @classmethod
    def from_mapping(cls, d: dict) -> "WebhookDelivery":
        kw = {k: d.get(k) for k in cls.__dataclass_fields__ if d.get(k) not in (None, "")}
        for k in ("attempts",):
            kw[k] = int(kw.get(k, 0))
        for k in ("next_at", "created_at", "updated_at"):
            kw[k] = float(kw.get(k, 0.0))
        return cls(**kw)


class SqliteJobStore:
    """The JobStore protocol (jobs.protocol) on one SQLite file."""

    EXPIRE_BATCH = 500  # jobs removed per write transaction, so the write lock is held briefly
    notifies_changes = False  # no cross-process notification: wait_for_change only sleeps

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._positions: dict[int, tuple[int, int]] = {}  # seq -> (queue_version, position), see queue_position
        self._conn().executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                return
            if version < 2:
                for sql in MIGRATE:
                    conn.execute(sql)
                for status in STATES:
                    conn.execute("INSERT OR REPLACE INTO job_counts (status, n) "
                                 "SELECT ?, COUNT(*) FROM jobs WHERE status=? AND deleted=0", (status, status))
            columns = {r["name"] for r in conn.execute("PRAGMA table_info(jobs)")}
            for sql in (MIGRATE_V3 if version < 3 else ()) + MIGRATE_V4:
                if sql.startswith("ALTER TABLE jobs ADD COLUMN ") and sql.split()[5] in columns:
                    continue
                conn.execute(sql)
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
               job_id: str | None = None, queue_max: int | None = None, webhook: str | None = None,
               webhook_events: tuple[str, ...] = ()) -> tuple[Job, bool]:
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
                "INSERT INTO jobs (id, status, params, input_image, created_at, idempotency_key, webhook, webhook_events) "
                "VALUES (?,?,?,?,?,?,?,?) RETURNING *",
                (job_id, "queued", json.dumps(params), input_image, time.time(), idempotency_key, webhook or None,
                 ",".join(webhook_events) if webhook else None),
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
        rows, total = self._page("*", status, limit, offset, sqlite3.Row)
        return [Job.from_row(r) for r in rows], total

    def summaries(self, status: str | None = None, limit: int | None = None,
                  offset: int = 0) -> tuple[list[tuple[str, str, float, str | None]], int]:
        """list() for the /jobs listing: (id, status, progress, input_image) rows only, as plain tuples (no Job
        objects, no JSON decoding), from the same index walk; the total from job_counts, in one read snapshot."""
        return self._page("id, status, progress, input_image", status, limit, offset, None)  # tuples: cheaper

    def _page(self, columns: str, status: str | None, limit: int | None, offset: int, row_factory) -> tuple[list, int]:
        where, args = "deleted=0", []
        if status:
            where += " AND status=?"
            args.append(status)
        sql = f"SELECT {columns} FROM jobs WHERE {where} ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args += [limit, offset]
        conn = self._conn()
        cur = conn.cursor()
        cur.row_factory = row_factory
        conn.execute("BEGIN")  # deferred: a read snapshot, no write lock
        try:
            total = self._count(conn, status or None)
            rows = cur.execute(sql, args).fetchall()
        finally:
            conn.execute("COMMIT")
        return rows, total

    POSITIONS_KEPT = 10_000  # queue positions remembered (per process) until the queue moves

    def queue_position(self, job: Job) -> int:
        """1 = next to run. A count over the queued part of jobs_status_live_seq (a covering index: no row is
        read), in proportion to the position; remembered until the queue moves (queue_version, kept by
        triggers), so a job polled again while nothing entered or left the queue costs one row read."""
        conn = self._conn()
        conn.execute("BEGIN")  # the version and the count from one snapshot
        try:
            return self._position(conn, self._queue_version(conn), job.seq)
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _queue_version(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT v FROM queue_version").fetchone()[0]

    def _position(self, conn: sqlite3.Connection, version: int, seq: int) -> int:
        known = self._positions.get(seq)
        if known is not None and known[0] == version:
            return known[1]
        (ahead,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE status='queued' AND deleted=0 AND seq<?",
                                (seq,)).fetchone()
        if len(self._positions) >= self.POSITIONS_KEPT:
            self._positions.clear()
        self._positions[seq] = (version, ahead + 1)
        return ahead + 1

    def get_with_positions(self, job_ids: list[str]) -> list[tuple[Job | None, int | None]]:
        """Per id: (the live job or None, its queue position when it is queued): what /status reads; all from
        one read snapshot."""
        out: list[tuple[Job | None, int | None]] = []
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            version = None
            for job_id in job_ids:
                row = conn.execute("SELECT * FROM jobs WHERE id=? AND deleted=0", (job_id,)).fetchone()
                if row is None:
                    out.append((None, None))
                    continue
                job = Job.from_row(row)
                if job.status != "queued":
                    out.append((job, None))
                    continue
                version = self._queue_version(conn) if version is None else version
                out.append((job, self._position(conn, version, job.seq)))
        finally:
            conn.execute("COMMIT")
        return out

    def metrics_snapshot(self) -> dict:
        """What one /metrics scrape reads, in one read snapshot: counts, stage_totals, workers, usage_totals."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            return {"counts": self.counts(), "stage_totals": self.stage_totals(), "workers": self.workers(),
                    "usage_totals": self.usage_totals()}
        finally:
            conn.execute("COMMIT")

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
        # finished deliveries go a TTL after their last attempt (next_at is set to that time when they finish)
        self._write("DELETE FROM webhook_deliveries WHERE state IN ('delivered','failed','dropped') AND next_at < ?",
                    (cutoff,))
        # worker reports not refreshed for that long (workers re-report every 30 s while they run): ids are per
        # process, so restarts would pile them up, and /status reads them all
        self._write("DELETE FROM workers WHERE updated_at < ?", (time.time() - max(older_than_s, LIVE_REPORT_S),))
        return out + [Job.from_row(r) for r in rows]

    # ------------------------------------------------------------------ worker side
    def claim(self, worker_id: str, lease_s: float, device: str | None = None, loaded_key: str | None = None,
              affinity_skip: int = 0, affinity_wait_s: float = 60.0, serves_loras: bool = True) -> Job | None:
        """Atomically take the oldest queued job, or one whose worker's lease ran out. With `loaded_key` (the
        worker's loaded LoRA set) and affinity_skip > 0, the queued job is the one lora_request.pick_next
        chooses from the oldest affinity_skip + 1 (see affinity_window), in the same transaction."""
        with self._transaction() as conn:
            # the clock is read holding the write lock: a lease starts when it is granted (a slow lock wait would
            # shorten it), and started_at is never before the created_at of a job whose insert we waited for
            now = time.time()
            # Jobs whose worker died (few: one per dead worker slot): a cancel asked meanwhile ends them as
            # cancelled; those that lost their worker too often end as errors instead of being retried forever.
            conn.execute(
                "UPDATE jobs SET status='cancelled', finished_at=?, error='Cancelled by request', error_type='cancelled', "
                "retryable=0, lease_until=NULL WHERE status='processing' AND deleted=0 AND lease_until<? AND cancel_requested=1",
                (now, now))
            self._poison(conn, "status='processing' AND deleted=0 AND lease_until<? AND attempts>=?", (now, MAX_ATTEMPTS), now)
            # a worker without LoRA slots skips LoRA jobs (among the first CAPABLE_WINDOW queued: bounded work)
            plain = "" if serves_loras else f" AND {NO_LORAS}"
            queued = ("SELECT seq, id, attempts, status FROM jobs WHERE status='queued' AND deleted=0 ORDER BY seq "
                      "LIMIT 1") if serves_loras else (
                f"SELECT * FROM (SELECT seq, id, attempts, status, params FROM jobs WHERE status='queued' AND "
                f"deleted=0 ORDER BY seq LIMIT {CAPABLE_WINDOW}) WHERE {NO_LORAS} ORDER BY seq LIMIT 1")
            while True:
                # two index lookups, not one OR (which would walk every finished job older than the queue)
                rows = [r for r in (
                    conn.execute(queued).fetchone(),
                    conn.execute("SELECT seq, id, attempts, status FROM jobs WHERE status='processing' AND deleted=0 "
                                 f"AND lease_until<?{plain} ORDER BY seq LIMIT 1", (now,)).fetchone()) if r is not None]
                if not rows:
                    return None
                row = min(rows, key=lambda r: r["seq"])
                passed: list[str] = []
                if serves_loras and loaded_key is not None and affinity_skip > 0 and row["status"] == "queued":
                    row, passed = self._affinity_pick(conn, loaded_key, affinity_skip, affinity_wait_s, now)
                if row["attempts"] < MAX_ATTEMPTS:
                    break
                self._poison(conn, "id=?", (row["id"],), now)  # re-queued orphan that died too often
            if passed:
                conn.executemany("UPDATE jobs SET passed_over=passed_over+1 WHERE id=?", [(i,) for i in passed])
            row = conn.execute(
                "UPDATE jobs SET status='processing', worker_id=?, device=?, lease_until=?, attempts=attempts+1, "
                "started_at=COALESCE(started_at, ?), progress=0, stage='starting' WHERE id=? RETURNING *",
                (worker_id, device, now + lease_s, now, row["id"])).fetchone()
            return Job.from_row(row)

    @staticmethod
    def _affinity_pick(conn: sqlite3.Connection, loaded_key: str, skip: int, wait_s: float,
                       now: float) -> tuple[sqlite3.Row, list[str]]:
        """(the queued job pick_next chooses, the ids of the older queued jobs it passes over)."""
        rows = conn.execute("SELECT seq, id, attempts, status, params, created_at, passed_over FROM jobs "
                            "WHERE status='queued' AND deleted=0 ORDER BY seq LIMIT ?", (skip + 1,)).fetchall()
        window = affinity_window([{"id": r["id"], "params": json.loads(r["params"]), "created_at": r["created_at"],
                                   "passed_over": r["passed_over"]} for r in rows], skip)
        chosen = pick_next(window, loaded_key, skip, wait_s, now)
        i = next(i for i, w in enumerate(window) if w is chosen)
        return rows[i], [w["id"] for w in window[:i]]

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
        now = time.time()  # one host's clock (the database file is local): the age is measured on it
        return [{"id": r["id"], "updated_at": r["updated_at"], **json.loads(r["info"]),
                 "age_s": max(0.0, now - r["updated_at"])} for r in rows]

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


    # ------------------------------------------------------------------ usage (GPU-seconds, cost)
    def add_usage(self, job_id: str, seconds: dict[str, float], cost_usd: float | None = None) -> None:
        """Add one run's device seconds per stage (and cost) to the job, and to the totals and histogram."""
        total = float(sum(seconds.values()))
        with self._transaction() as conn:
            row = conn.execute("SELECT gpu_seconds, cost_usd FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is not None:  # a job re-run after a restart adds its runs up
                merged = json.loads(row["gpu_seconds"]) if row["gpu_seconds"] else {}
                for stage, value in seconds.items():
                    merged[stage] = merged.get(stage, 0.0) + float(value)
                cost = None if cost_usd is None else (row["cost_usd"] or 0.0) + cost_usd
                conn.execute("UPDATE jobs SET gpu_seconds=?, cost_usd=COALESCE(?, cost_usd) WHERE id=?",
                             (json.dumps(merged), cost, job_id))
            adds = [("gpu_seconds", total), ("runs", 1.0), (f"le:{usage_bucket(total)}", 1.0)]
            if cost_usd is not None:
                adds.append(("cost_usd", cost_usd))
            conn.executemany("INSERT INTO usage_totals (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                             "value=value+excluded.value", adds)

    def usage_totals(self) -> dict:
        rows = self._conn().execute("SELECT key, value FROM usage_totals").fetchall()
        return usage_summary({r["key"]: r["value"] for r in rows})

    # ------------------------------------------------------------------ webhook deliveries (API side)
    def claim_webhooks(self, owner: str, limit: int, lease_s: float) -> list[WebhookDelivery]:
        """Take up to `limit` due deliveries for one attempt each: the lease (next_at) hides them from every
        other claimer until the attempt reports, or the lease ends (its claimer died)."""
        now = time.time()
        if self._conn().execute("SELECT 1 FROM webhook_deliveries WHERE state='pending' AND next_at<=? LIMIT 1",
                                (now,)).fetchone() is None:
            return []  # the usual answer, without taking the write lock (every API process asks twice a second)
        rows = self._write(
            "UPDATE webhook_deliveries SET owner=?, attempts=attempts+1, next_at=?, updated_at=? WHERE seq IN ("
            "SELECT seq FROM webhook_deliveries WHERE state='pending' AND next_at<=? ORDER BY next_at LIMIT ?) "
            "RETURNING *", (owner, now + lease_s, now, now, limit))
        return sorted((WebhookDelivery.from_mapping(dict(r)) for r in rows), key=lambda d: d.created_at)

    def finish_webhook(self, delivery_id: str, owner: str, state: str, error: str | None = None,
                       body: str | None = None, retry_at: float | None = None) -> bool:
        """Report a claimed attempt: state 'pending' retries at retry_at; delivered, failed and dropped are
        final. False when the claim is no longer `owner`'s (its lease ended and another took it)."""
        now = time.time()
        rows = self._write(
            "UPDATE webhook_deliveries SET state=?, last_error=?, body=COALESCE(?, body), next_at=?, updated_at=? "
            "WHERE id=? AND owner=? AND state='pending' RETURNING id",
            (state, error, body, retry_at if state == "pending" and retry_at is not None else now, now,
             delivery_id, owner))
        return bool(rows)

    def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        rows = self._conn().execute("SELECT * FROM webhook_deliveries WHERE job_id=? ORDER BY seq", (job_id,)).fetchall()
        return [WebhookDelivery.from_mapping(dict(r)) for r in rows]


def usage_summary(raw: dict[str, float]) -> dict:
    """Counters as kept ({gpu_seconds, cost_usd, runs, le:<bound>}) -> {gpu_seconds, cost_usd, runs, buckets},
    buckets cumulative per bound as Prometheus wants them, '+Inf' last."""
    per_bucket = {k.removeprefix("le:"): int(v) for k, v in raw.items() if k.startswith("le:")}
    buckets, running = {}, 0
    for bound in [f"{b:g}" for b in GPU_SECONDS_BUCKETS] + ["+Inf"]:
        running += per_bucket.get(bound, 0)
        buckets[bound] = running
    return {"gpu_seconds": float(raw.get("gpu_seconds", 0.0)), "cost_usd": float(raw.get("cost_usd", 0.0)),
            "runs": int(raw.get("runs", 0)), "buckets": buckets}


class QueueFull(Exception):
    def __init__(self, queued: int):
        super().__init__(f"queue is full ({queued} jobs waiting)")
        self.queued = queued

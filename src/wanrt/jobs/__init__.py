"""Durable job records and the queue between the API and the workers (SQLite by default, Redis to scale out)."""

from __future__ import annotations

from pathlib import Path

from wanrt.jobs.protocol import JobStore


def open_store(settings, db_path: Path | None = None) -> JobStore:
    """SQLite under the data dir, or Redis when `settings.queue` is a redis:// URL."""
    queue = settings.queue or "sqlite"
    if queue.startswith(("redis://", "rediss://", "unix://")):
        from wanrt.jobs.redis_queue import RedisJobStore

        return RedisJobStore(queue)
    if queue != "sqlite":
        raise ValueError(f"queue must be 'sqlite' or a redis:// URL, not {queue!r}")
    from wanrt.jobs.paths import DataPaths
    from wanrt.jobs.store import SqliteJobStore

    return SqliteJobStore(db_path or DataPaths(settings.data_dir).ensure().db)


def backoff_s(tries: int, first: float, longest: float) -> float:
    """The wait before retry number `tries` (1, 2, ...): `first`, doubling, at most `longest`."""
    return min(longest, first * 2 ** max(0, tries - 1))

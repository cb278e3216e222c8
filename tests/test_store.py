"""The job store contract, run on both backends: SQLite on a real file and a real Redis server."""

import threading
import time

import pytest

from wanrt.jobs.store import MAX_ATTEMPTS, JobStore, QueueFull


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield JobStore(tmp_path / "jobs.sqlite3")
        return
    import redis

    from wanrt.jobs.redis_queue import RedisJobStore

    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    s = RedisJobStore(url)
    yield s
    s.close()


def test_wal_and_durable_create(tmp_path):
    s = JobStore(tmp_path / "j.sqlite3")
    job, created = s.create({"prompt": "x"}, input_image="a.png")
    assert created and job.status == "queued"
    assert s._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # a second, independent connection (another process in production) sees it at once
    assert JobStore(tmp_path / "j.sqlite3").get(job.id).params == {"prompt": "x"}


def test_claim_is_fifo_and_exclusive(store):
    ids = [store.create({"n": i})[0].id for i in range(5)]
    assert [store.queue_position(store.get(i)) for i in ids] == [1, 2, 3, 4, 5]
    claimed = []
    lock = threading.Lock()

    def worker(name):
        while True:
            job = store.claim(name, lease_s=30)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(claimed) == sorted(ids) and len(claimed) == 5  # each exactly once


def test_expired_lease_is_reclaimed_and_old_worker_loses_it(store):
    job = store.create({})[0]
    assert store.claim("w1", lease_s=0.2).id == job.id
    assert store.claim("w2", lease_s=30) is None  # lease still valid
    time.sleep(0.3)
    again = store.claim("w2", lease_s=30)
    assert again.id == job.id and again.attempts == 2 and again.worker_id == "w2"
    assert store.heartbeat(job.id, "w1", 30) is False  # the dead worker's heartbeat is refused
    assert store.complete(job.id, "w1", "/x.mp4", {}) is False
    assert store.complete(job.id, "w2", "/y.mp4", {"total_s": 1.0}) is True
    done = store.get(job.id)
    assert done.status == "completed" and done.video_path == "/y.mp4" and done.progress == 100


def test_poison_job_ends_as_error_after_max_attempts(store):
    job = store.create({})[0]
    for _ in range(MAX_ATTEMPTS):
        assert store.claim("w", lease_s=0.05).id == job.id
        time.sleep(0.1)
    assert store.claim("w", lease_s=0.05) is None
    dead = store.get(job.id)
    assert dead.status == "error" and dead.error_type == "worker_lost" and dead.retryable


def test_restarted_worker_takes_back_its_orphan_first(store):
    a, b = store.create({})[0], store.create({})[0]
    assert store.claim("w0", 30).id == a.id
    store.release_orphans("w0")  # a new life of w0 (SQLite re-queues; Redis re-reads its pending entries)
    again = store.claim("w0", 30)
    assert again.id == a.id and again.attempts == 2
    assert store.claim("w1", 30).id == b.id


def test_graceful_release(store):
    a = store.create({})[0]
    got = store.claim("w0", 30)
    assert store.release(got.id, "w0")
    assert store.get(got.id).attempts == 0  # graceful release does not count against the job


def test_heartbeat_progress_and_cancel(store):
    job = store.create({})[0]
    store.claim("w", 30)
    assert store.heartbeat(job.id, "w", 30, progress=42.5, stage="denoise")
    assert store.get(job.id).progress == 42.5
    store.cancel(job.id)
    assert store.heartbeat(job.id, "w", 30) is False
    store.finish_cancelled(job.id, "w")
    assert store.get(job.id).status == "cancelled"


def test_delete_running_hides_then_worker_removes(store):
    job = store.create({})[0]
    store.claim("w", 30)
    assert store.delete(job.id).status == "processing"
    assert store.get(job.id) is None and store.get(job.id, include_deleted=True).cancel_requested
    assert store.heartbeat(job.id, "w", 30) is False
    store.finish_cancelled(job.id, "w")
    assert store.get(job.id, include_deleted=True) is None
    assert store.delete("nope") is None


def test_idempotency_key_and_queue_bound(store):
    a, created_a = store.create({"p": 1}, idempotency_key="k1")
    b, created_b = store.create({"p": 2}, idempotency_key="k1")
    assert created_a and not created_b and a.id == b.id
    with pytest.raises(QueueFull):
        store.create({}, queue_max=1)


def test_expire_removes_only_old_finished(store):
    old = store.create({})[0]
    store.claim("w", 30)
    store.complete(old.id, "w", "/v.mp4", {})
    time.sleep(0.3)
    fresh = store.create({})[0]
    expired = store.expire(0.2)
    assert [j.id for j in expired] == [old.id]
    assert store.get(old.id) is None and store.get(fresh.id) is not None


def test_list_filter_and_paging(store):
    ids = [store.create({})[0].id for _ in range(5)]
    store.claim("w", 30)
    jobs, total = store.list(status="queued", limit=2, offset=1)
    assert total == 4 and [j.id for j in jobs] == ids[2:4]
    assert store.counts()["processing"] == 1


def test_worker_reports(store):
    store.report_worker("w0", {"device": "cpu", "jobs_done": 1, "backend": {"backend": "eager"}})
    store.report_worker("w0", {"device": "cpu", "jobs_done": 2, "backend": {"backend": "eager"}})
    store.report_worker("w1", {"device": "cuda:1", "jobs_done": 0, "backend": {"dynamo_graphs": 4}})
    workers = store.workers()
    assert [w["id"] for w in workers] == ["w0", "w1"] and workers[0]["jobs_done"] == 2
    assert workers[1]["backend"]["dynamo_graphs"] == 4 and workers[0]["updated_at"] > 0

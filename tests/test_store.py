"""The job store contract, run on both backends: SQLite on a real file and a real Redis server."""

import inspect
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from wanrt.jobs.protocol import JobStore
from wanrt.jobs.redis_queue import RedisJobStore
from wanrt.jobs.store import MAX_ATTEMPTS, STATES, TERMINAL, QueueFull, SqliteJobStore
from wanrt.lora_request import request_key


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield SqliteJobStore(tmp_path / "jobs.sqlite3")
        return
    import redis

    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    s = RedisJobStore(url)
    yield s
    s.close()


def test_wal_and_durable_create(tmp_path):
    s = SqliteJobStore(tmp_path / "j.sqlite3")
    job, created = s.create({"prompt": "x"}, input_image="a.png")
    assert created and job.status == "queued"
    assert s._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # a second, independent connection (another process in production) sees it at once
    assert SqliteJobStore(tmp_path / "j.sqlite3").get(job.id).params == {"prompt": "x"}


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
    assert store.claim("w1", lease_s=1.0).id == job.id  # a lease long enough to outlive a busy CI's slow commit
    assert store.claim("w2", lease_s=30) is None  # lease still valid
    time.sleep(1.1)
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
    store.create({})
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


def test_expire_drops_worker_reports_not_refreshed_for_the_ttl(store):
    """Worker ids are per process (host-pid): without pruning, every restart leaves a report behind, and /status
    reads them all. A report refreshed within the TTL (and never one younger than LIVE_REPORT_S) stays."""
    import json

    from wanrt.lora_request import LIVE_REPORT_S

    store.report_worker("live", {"state": "idle"})
    store.report_worker("gone", {"state": "idle"})
    store.report_worker("recent", {"state": "idle"})
    old, recent = time.time() - 3 * LIVE_REPORT_S, time.time() - LIVE_REPORT_S / 2
    if isinstance(store, SqliteJobStore):
        store._write("UPDATE workers SET updated_at=? WHERE id='gone'", (old,))
        store._write("UPDATE workers SET updated_at=? WHERE id='recent'", (recent,))
    else:
        store.r.hset("wanrt:workers", mapping={"gone": json.dumps({"state": "idle", "updated_at": old}),
                                               "recent": json.dumps({"state": "idle", "updated_at": recent})})
    store.expire(1.0)  # a short TTL still keeps what the API counts as live
    assert [w["id"] for w in store.workers()] == ["live", "recent"]
    store.expire(24 * 3600)
    assert [w["id"] for w in store.workers()] == ["live", "recent"]


def test_worker_liveness_is_measured_on_the_stores_clock(store, monkeypatch):
    """Scaled out, workers and API processes run on several hosts: a report's age is measured on the store's
    clock (Redis TIME), so an API host whose clock runs 10 minutes ahead (or behind) still sees a worker that
    reported a moment ago as live, and the one that went quiet as gone."""
    from wanrt.lora_request import LIVE_REPORT_S, live_workers

    if not isinstance(store, RedisJobStore):
        pytest.skip("SQLite: the database file is local, one host's clock")
    store.report_worker("fresh", {"state": "idle"})
    real = time.time
    for skew in (600.0, -600.0):
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)
        workers = store.workers()
        assert [w["id"] for w in live_workers(workers, time.time())] == ["fresh"] and workers[0]["age_s"] < 5
        assert store.metrics_snapshot()["workers"][0]["age_s"] < 5
    monkeypatch.setattr(time, "time", real)
    store.r.hset("wanrt:workers", "quiet", '{"state": "idle", "updated_at": %f}' % (real() - 2 * LIVE_REPORT_S))
    assert [w["id"] for w in live_workers(store.workers(), real() - 3 * LIVE_REPORT_S)] == ["fresh"]


# ---------------------------------------------------------------------- one protocol, bounded reads, new methods
PROTOCOL_METHODS = sorted(n for n, v in vars(JobStore).items() if callable(v) and not n.startswith("_"))


@pytest.mark.parametrize("cls", [SqliteJobStore, RedisJobStore])
def test_both_stores_define_every_protocol_method_alike(cls):
    assert "wait_for_change" in PROTOCOL_METHODS and "stage_totals" in PROTOCOL_METHODS
    for name in PROTOCOL_METHODS:
        want = list(inspect.signature(getattr(JobStore, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == want, name


def test_store_is_a_jobstore(store):
    assert isinstance(store, JobStore)


def _assert_consistent(store):
    """counts(), list()'s totals and pages agree with each other (index and records in step)."""
    counts = store.counts()
    jobs, total = store.list()
    assert total == len(jobs) == sum(counts.values())
    for s in STATES:
        page, n = store.list(status=s)
        assert n == counts[s] == len(page) and all(j.status == s for j in page), (s, counts, [j.status for j in page])


def test_list_pages_counts_and_positions(store):
    ids = [store.create({"n": i})[0].id for i in range(6)]
    store.claim("w", 30)  # ids[0]
    store.cancel(ids[1])
    store.delete(ids[2])  # queued: removed now
    store.claim("w2", 30)  # ids[3]
    store.delete(ids[3])  # running: hidden now
    jobs, total = store.list()
    assert total == 4 and [j.id for j in jobs] == [ids[0], ids[1], ids[4], ids[5]]  # limit=None lists everything
    jobs, total = store.list(limit=2, offset=1)
    assert total == 4 and [j.id for j in jobs] == [ids[1], ids[4]]
    assert store.list(status="queued", limit=0) == ([], 2)
    assert store.list(status="nope") == ([], 0)
    assert store.counts() == {"queued": 2, "processing": 1, "completed": 0, "error": 0, "cancelled": 1}
    assert [store.queue_position(store.get(i)) for i in ids[4:]] == [1, 2]
    _assert_consistent(store)


def test_stage_totals_add_up_completed_jobs_only(store):
    assert store.stage_totals() == {}
    for timings in ({"denoise_high_s": 1.5, "total_s": 2.0}, {"total_s": 3.0}):
        job = _running(store)
        assert store.complete(job.id, "w", "/v.mp4", timings)
    job = _running(store)
    store.fail(job.id, "w", "boom", "internal_error", True, {"total_s": 100.0})
    totals = {"denoise_high": (1.5, 1), "total": (5.0, 2)}
    assert store.stage_totals() == totals
    time.sleep(0.01)
    assert len(store.expire(0)) == 3
    assert store.stage_totals() == totals  # a counter: expiry does not take completed work back


def test_wait_for_change(store):
    job = _running(store)
    t0 = time.monotonic()
    store.wait_for_change(job.id, 0.2)  # nothing happens: returns after the timeout
    assert 0.15 <= time.monotonic() - t0 < 2
    if isinstance(store, SqliteJobStore):
        return  # no cross-process notification: a plain sleep, the caller backs off
    for change in (lambda: store.heartbeat(job.id, "w", 30, progress=10.0), lambda: store.cancel(job.id),
                   lambda: store.finish_cancelled(job.id, "w")):
        timer = threading.Timer(1.0, change)  # after the subscription is made (a new connection on a busy CI)
        timer.start()
        t0 = time.monotonic()
        store.wait_for_change(job.id, 10)
        assert time.monotonic() - t0 < 5  # woken by the publish, not the timeout
        timer.join()


# ---------------------------------------------------------------------- atomic state changes
# Each test races two operations on one job many times (a barrier starts both together) and checks that the
# outcome is one of the serial ones. Old code lost some of these races (noted per test).
ROUNDS = 150


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=8) as p:
        yield p


def _race(pool, *fns):
    barrier = threading.Barrier(len(fns))

    def go(fn):
        barrier.wait()
        time.sleep(random.random() * 0.002)  # vary which step of one meets which step of the other
        return fn()

    return [f.result() for f in [pool.submit(go, fn) for fn in fns]]


def _claim(store, job_id, worker="w"):
    """Claim job_id, the only job queued (Redis may first read the stream entry of a job removed meanwhile)."""
    for _ in range(5):
        got = store.claim(worker, 30)
        if got is not None:
            assert got.id == job_id
            return got
    raise AssertionError("could not claim the job")


def _running(store, worker="w"):
    return _claim(store, store.create({})[0].id, worker)


@pytest.mark.parametrize("op", ["delete", "cancel"])
def test_race_delete_or_cancel_vs_complete_or_fail(store, pool, op):
    """A job asked to stop is never finished by its worker (old code: complete/fail won anyway, leaving a hidden
    completed job and its files, or a cancel that was answered and then ignored)."""
    for i in range(ROUNDS):
        job = _running(store)
        end = (partial(store.complete, job.id, "w", "/v.mp4", {"total_s": 1.0}) if i % 2 else
               partial(store.fail, job.id, "w", "boom", "internal_error", True))
        asked, finished = _race(pool, partial(getattr(store, op), job.id), end)
        if finished:  # the worker was first: the request saw a finished job
            assert asked.status in TERMINAL
            final = store.get(job.id, include_deleted=True)
            assert final is None if op == "delete" else final.status == asked.status
        else:  # the request was first: the worker goes the cancel path
            assert asked.status == "processing"
            assert store.get(job.id, include_deleted=True).cancel_requested
            gone = store.finish_cancelled(job.id, "w")
            assert gone is not None and gone.deleted == (op == "delete")
            final = store.get(job.id, include_deleted=True)
            assert final is None if op == "delete" else final.status == "cancelled"
    _assert_consistent(store)


@pytest.mark.parametrize("op", ["delete", "cancel"])
def test_race_delete_or_cancel_vs_claim(store, pool, op):
    """A queued job is either taken (and then asked to stop) or stopped, never both (old Redis: cancel/delete
    read 'queued', a worker took the job, then it was marked cancelled or removed under the worker)."""
    for _ in range(ROUNDS):
        job = store.create({})[0]
        asked, claimed = _race(pool, partial(getattr(store, op), job.id), partial(store.claim, "w", 30))
        if claimed is not None:
            assert claimed.id == job.id and asked.status == "processing"
            assert store.heartbeat(job.id, "w", 30) is False
            assert store.finish_cancelled(job.id, "w").deleted == (op == "delete")
        else:
            assert asked.status == ("queued" if op == "delete" else "cancelled")
        final = store.get(job.id, include_deleted=True)
        assert final is None if op == "delete" else final.status == "cancelled"
        assert store.claim("w", 30) is None  # nothing left to run
    _assert_consistent(store)


def test_race_release_vs_complete(store, pool):
    """Exactly one of release and complete wins (old Redis: both did; a completed job sat in the queue)."""
    for _ in range(ROUNDS):
        job = _running(store)
        released, completed = _race(pool, partial(store.release, job.id, "w"),
                                    partial(store.complete, job.id, "w", "/v.mp4", {}))
        assert released != completed
        final = store.get(job.id)
        if released:
            assert final.status == "queued" and final.attempts == 0 and store.queue_position(final) == 1
            _claim(store, job.id, "w2")
            assert store.complete(job.id, "w2", "/v.mp4", {})
        else:
            assert final.status == "completed"
        assert store.counts()["queued"] == 0
    _assert_consistent(store)


def test_race_release_vs_delete(store, pool):
    """A deleted job is never re-queued (old code: release put it back as a hidden queued job, kept forever)."""
    for _ in range(ROUNDS):
        job = _running(store)
        released, deleted = _race(pool, partial(store.release, job.id, "w"), partial(store.delete, job.id))
        if released:  # delete came second and removed the queued job
            assert deleted.status == "queued"
        else:
            assert deleted.status == "processing"
            assert store.finish_cancelled(job.id, "w").deleted
        assert store.get(job.id, include_deleted=True) is None
    _assert_consistent(store)


def test_race_finish_cancelled_vs_delete(store, pool):
    """Whichever comes first, a deleted job is removed (old code: finish_cancelled read 'not deleted', delete
    then hid the job, finish_cancelled marked it cancelled: a hidden row left until expiry, input file kept)."""
    for _ in range(ROUNDS):
        job = _running(store)
        store.cancel(job.id)  # the worker stops at its next step...
        finished, deleted = _race(pool, partial(store.finish_cancelled, job.id, "w"), partial(store.delete, job.id))
        assert finished is not None and deleted is not None
        assert finished.deleted == (deleted.status == "processing")  # deleted first: the worker removed it
        assert store.get(job.id, include_deleted=True) is None
    _assert_consistent(store)


def test_race_expire_vs_delete(store, pool):
    """A finished job is removed (and its files handed back) exactly once (old Redis: by both)."""
    for _ in range(ROUNDS):
        job = _running(store)
        store.complete(job.id, "w", "/v.mp4", {})
        time.sleep(0.002)
        expired, deleted = _race(pool, partial(store.expire, 0), partial(store.delete, job.id))
        assert [j.id for j in expired].count(job.id) + (deleted is not None) == 1
        assert store.get(job.id, include_deleted=True) is None
    _assert_consistent(store)


def test_concurrent_create_with_one_idempotency_key(store, pool):
    """N requests with one key make one job; deleting it frees the key at once, also while its worker still
    runs it (old code: SQLite raised IntegrityError, Redis answered with the deleted job)."""
    n = 8
    previous = set()
    for r in range(ROUNDS // 4):
        results = _race(pool, *[partial(store.create, {"i": i}, idempotency_key="k") for i in range(n)])
        assert sum(created for _, created in results) == 1
        (job_id,) = {job.id for job, _ in results}
        assert job_id not in previous and store.get_by_idempotency_key("k").id == job_id
        previous.add(job_id)
        if r % 2:
            store.delete(job_id)  # queued: removed now
        else:
            _claim(store, job_id)
            store.delete(job_id)  # running: hidden, its worker removes it later
            assert store.get_by_idempotency_key("k") is None
            new, created = store.create({}, idempotency_key="k")
            assert created and new.id != job_id
            assert store.finish_cancelled(job_id, "w").deleted
            assert store.get_by_idempotency_key("k").id == new.id  # not dropped with the old job
            store.delete(new.id)
    _assert_consistent(store)


# ---------------------------------------------------------------------- LoRA affinity (issue 15)
A, B, C = [{"name": "a"}], [{"name": "b", "strength": 0.5}], [{"name": "c", "expert": "low"}]
KEY = {"A": request_key(A), "B": request_key(B), "C": request_key(C)}
SETS = {"A": A, "B": B, "C": C}


def _queue(store, names: str) -> list[str]:
    """One queued job per letter, in order: 'ABAB' -> jobs with LoRA sets A, B, A, B; '-' a job without LoRAs."""
    return [store.create({"prompt": f"{i}{n}", **({"loras": SETS[n]} if n in SETS else {})})[0].id
            for i, n in enumerate(names)]


def _drain(store, key, skip, wait_s=60.0, worker="w"):
    """Claim (and complete) until the queue is empty; the ids in the order claimed."""
    order = []
    while (job := store.claim(worker, 30, loaded_key=key, affinity_skip=skip, affinity_wait_s=wait_s)) is not None:
        order.append(job.id)
        assert store.complete(job.id, worker, "/v.mp4", {})
    return order


def _passes(created: list[str], claimed: list[str]) -> dict[str, int]:
    """Per job: how many claims took a younger job while it waited."""
    rank = {j: i for i, j in enumerate(created)}
    return {j: sum(1 for k in claimed[: claimed.index(j)] if rank[k] > rank[j]) for j in created}


@pytest.mark.parametrize("skip", [2, 4])
def test_affinity_takes_the_loaded_set_first_within_the_bound(store, skip):
    ids = _queue(store, "ABABABAB")
    a, b = ids[0::2], ids[1::2]
    order = _drain(store, KEY["A"], skip)
    assert sorted(order) == sorted(ids)
    # the A jobs come first, until the oldest B has been passed over `skip` times
    first_b = order.index(b[0])
    assert first_b == min(skip, 3) + 1 and order[:first_b] == a[:first_b]
    assert max(_passes(ids, order).values()) == min(skip, 3)  # the bound is reached, never passed
    assert order == {2: [a[0], a[1], a[2], b[0], a[3], b[1], b[2], b[3]],
                     4: [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]}[skip]


def test_affinity_passes_no_job_over_more_than_skip_times(store):
    """pick_next alone bounds each claim (at most `skip` jobs passed over) but not how often one job is passed
    over by successive claims: the store cuts the window at a job already passed over `skip` times."""
    ids = _queue(store, "BAAAAAAA")
    order = _drain(store, KEY["A"], 3)
    assert order == [ids[1], ids[2], ids[3], ids[0], *ids[4:]]
    assert _passes(ids, order)[ids[0]] == 3


def test_affinity_bound_holds_for_random_queues_and_workers(store):
    rng = random.Random(15)
    for _ in range(3):
        names = "".join(rng.choice("ABC-") for _ in range(30))
        ids = _queue(store, names)
        order, skip = [], rng.choice([1, 2, 3])
        queued = list(ids)
        while queued:
            key = KEY[rng.choice("ABC")] if rng.random() < 0.8 else rng.choice([None, ""])
            job = store.claim(rng.choice(["w1", "w2"]), 30, loaded_key=key, affinity_skip=skip)
            assert job is not None and queued.index(job.id) <= skip  # one claim passes over at most `skip` jobs
            queued.remove(job.id)
            order.append(job.id)
            assert store.complete(job.id, job.worker_id, "/v.mp4", {})
        assert store.claim("w1", 30, loaded_key=KEY["A"], affinity_skip=skip) is None
        assert max(_passes(ids, order).values()) <= skip
    _assert_consistent(store)


def test_affinity_takes_an_overdue_job_first(store):
    old = _queue(store, "B")[0]
    time.sleep(0.3)
    fresh = _queue(store, "AA")
    assert store.claim("w", 30, loaded_key=KEY["A"], affinity_skip=4, affinity_wait_s=60).id == fresh[0]
    assert store.claim("w", 30, loaded_key=KEY["A"], affinity_skip=4, affinity_wait_s=0.2).id == old  # waited 0.3 s
    assert store.claim("w", 30, loaded_key=KEY["A"], affinity_skip=4, affinity_wait_s=0.2).id == fresh[1]


@pytest.mark.parametrize("key,skip", [(None, 4), ("A", 0)])
def test_affinity_off_is_fifo(store, key, skip):
    ids = _queue(store, "ABAB-C")
    assert _drain(store, KEY.get(key), skip) == ids


def test_affinity_with_no_loras_loaded_prefers_jobs_without_loras(store):
    ids = _queue(store, "A-B-")
    assert _drain(store, "", 2) == [ids[1], ids[3], ids[0], ids[2]]


def test_affinity_claimed_job_is_recovered_when_its_worker_dies(store):
    ids = _queue(store, "BA")
    job = store.claim("w1", 1.0, loaded_key=KEY["A"], affinity_skip=2)
    assert job.id == ids[1] and job.worker_id == "w1"
    assert store.claim("w2", 30).id == ids[0]  # the stream reader skips the job taken out of order
    assert store.claim("w2", 30) is None  # w1's lease still runs
    time.sleep(1.1)
    again = store.claim("w2", 30)
    assert again.id == ids[1] and again.attempts == 2 and again.worker_id == "w2"
    assert store.complete(again.id, "w2", "/v.mp4", {}) and not store.complete(again.id, "w1", "/v.mp4", {})
    assert store.claim("w3", 30) is None
    _assert_consistent(store)


def _drain_as(store, key, worker):
    return _drain(store, key, 3, worker=worker)


def test_concurrent_affinity_claimers_never_share_a_job(store):
    for _ in range(5):
        ids = _queue(store, "".join(random.choice("AB-") for _ in range(40)))
        keys = [KEY["A"], KEY["B"], None, "", KEY["A"], KEY["C"]]
        with ThreadPoolExecutor(len(keys)) as threads:
            runs = list(threads.map(_drain_as, [store] * len(keys), keys, [f"w{i}" for i in range(len(keys))]))
        claimed = [j for run in runs for j in run]
        assert sorted(claimed) == sorted(ids)  # each exactly once, none lost
        assert store.counts()["queued"] == 0
    _assert_consistent(store)


def test_queue_positions_follow_every_change_of_the_queue(store):
    """SQLite remembers positions until the queue moves (queue_version): each way a job enters or leaves the
    queue must show in the next read, also through a second store on the same data (another process)."""
    other = SqliteJobStore(store.path) if isinstance(store, SqliteJobStore) else store
    ids = [store.create({})[0].id for _ in range(6)]

    def positions():
        return [(i, p) for i in ids if (j := other.get(i)) is not None and j.status == "queued"
                for (_, p) in [other.get_with_positions([i])[0]]]

    def expect():  # the queue order by the listing (no position read)
        queued = {j.id for j in store.list(status="queued")[0]}
        return [(i, n + 1) for n, i in enumerate(i for i in ids if i in queued)]

    for change in (lambda: store.claim("w", 30), lambda: store.cancel(ids[2]), lambda: store.delete(ids[3]),
                   lambda: store.release(ids[0], "w"), lambda: ids.append(store.create({})[0].id),
                   lambda: store.claim("w", 30, loaded_key="", affinity_skip=3)):
        assert positions() == positions() == expect()  # read twice: the second from memory on SQLite
        change()
        assert positions() == expect()


# ---------------------------------------------------------------------- workers without LoRA slots
def test_a_worker_without_lora_slots_leaves_lora_jobs_to_the_others(store):
    """A LoRA job would fail on a worker without slots (invalid_lora) although another could run it: such a worker
    takes the oldest job without a set, passes the LoRA jobs by without counting it against their affinity
    bound, and leaves them queued, in order, for a worker with slots."""
    a1, plain1, b1, plain2, a2 = _queue(store, "A-B-A")
    no_slots = dict(serves_loras=False)
    first = store.claim("plain", 30, **no_slots)
    assert first.id == plain1 and store.complete(plain1, "plain", "/v.mp4", {})
    assert store.claim("plain", 30, **no_slots).id == plain2
    assert store.claim("plain", 30, **no_slots) is None  # only LoRA jobs are left: nothing for it
    assert [store.get(j).status for j in (a1, b1, a2)] == ["queued"] * 3
    assert [store.queue_position(store.get(j)) for j in (a1, b1, a2)] == [1, 2, 3]
    # a worker with slots takes them in order, FIFO (nothing was counted as passed over)
    assert _drain(store, KEY["B"], skip=0) == [a1, b1, a2]


def test_a_worker_without_lora_slots_does_not_take_over_a_dead_workers_lora_job(store):
    (lora_job,) = _queue(store, "A")
    assert store.claim("w1", lease_s=0.2).id == lora_job  # its worker dies
    time.sleep(0.3)
    assert store.claim("plain", 30, serves_loras=False) is None
    again = store.claim("w2", 30)
    assert again.id == lora_job and again.worker_id == "w2" and again.attempts == 2


# ---------------------------------------------------------------------- claim order and leases across hosts
def test_a_released_job_runs_before_the_jobs_queued_after_it(store):
    """A job handed back on shutdown keeps its place, as queue_position says (SQLite: its seq). Old Redis gave it a
    new stream entry: it ran after every job queued before the release."""
    a, b, c = (store.create({"n": i})[0].id for i in range(3))
    assert store.claim("w0", 30).id == a and store.release(a, "w0")
    assert [store.queue_position(store.get(j)) for j in (a, b, c)] == [1, 2, 3]
    assert [store.claim(w, 30).id for w in ("w1", "w2", "w3")] == [a, b, c]
    # ...but no further: one taken out of order (LoRA affinity) and released goes back behind the older jobs
    older, picked = _queue(store, "BA")
    assert store.claim("w4", 30, loaded_key=KEY["A"], affinity_skip=2).id == picked and store.release(picked, "w4")
    assert [store.claim("w5", 30).id, store.claim("w6", 30).id] == [older, picked]
    _assert_consistent(store)


def _redis_only(store):
    if not isinstance(store, RedisJobStore):
        pytest.skip("Redis only: its stream entries, several hosts' clocks, its previous layout")


def test_a_job_whose_reader_died_before_taking_it_keeps_its_place(store):
    """A worker that read a job's stream entry and died before taking it: the job is next all the same (old Redis: the
    entry was recovered only after idling for a lease, while younger jobs ran)."""
    _redis_only(store)
    a, b = store.create({})[0].id, store.create({})[0].id
    store.r.xreadgroup("workers", "dead", {"wanrt:queue": ">"}, count=1)  # a's entry, never taken
    assert [store.claim("w", 30).id, store.claim("w", 30).id] == [a, b]
    assert store.claim("w", 30) is None


def test_stream_entries_do_not_outlive_their_jobs(store):
    """Dead workers' jobs are found by lease, not by scanning pending entries, so the scripts that end a job drop its
    entry whoever holds it: nothing is left pending for a dead reader or worker."""
    _redis_only(store)
    cancelled, hidden, released = (store.create({})[0].id for _ in range(3))
    store.r.xreadgroup("workers", "dead", {"wanrt:queue": ">"}, count=1)  # cancelled's entry, never taken
    store.cancel(cancelled)
    assert store.claim("dead", 0.2).id == hidden and store.delete(hidden).status == "processing"
    assert store.claim("w", 30).id == released and store.release(released, "w")
    time.sleep(0.3)
    assert store.claim("w", 30).id == released  # hidden's lease ran out: its entry is dropped on the way
    assert store.complete(released, "w", "/v.mp4", {})
    assert store.r.xpending("wanrt:queue", "workers")["pending"] == 0 and store.r.xlen("wanrt:queue") == 0
    assert sorted(j.id for j in store.expire(0)) == sorted([cancelled, hidden, released])
    assert store.r.zcard("wanrt:leases") == 0


@pytest.mark.parametrize("skew", [35.0, -35.0])
def test_leases_are_measured_on_the_stores_clock(store, monkeypatch, skew):
    """Workers and API nodes on several hosts share one Redis, so leases are on its clock. A host 35 s ahead (past a
    30 s lease) takes neither a live worker's job nor another API node's webhook attempt; a worker 35 s behind keeps
    its job and its heartbeats count (old code: lease_until from the writer's clock, compared with the reader's)."""
    _redis_only(store)
    other = RedisJobStore(store.url)  # another host
    real = time.time

    def on(host_skew, fn, *args, **kw):
        monkeypatch.setattr(time, "time", lambda: real() + host_skew)
        try:
            return fn(*args, **kw)
        finally:
            monkeypatch.setattr(time, "time", real)

    worker, claimer = (0.0, skew) if skew > 0 else (skew, 0.0)  # the skewed host: the claimer ahead, the worker behind
    job = store.create({}, webhook="http://hooks.example/x", webhook_events=("progress",))[0]
    assert on(worker, store.claim, "w1", 30).id == job.id
    assert on(claimer, other.claim, "w2", 30) is None
    assert on(worker, store.heartbeat, job.id, "w1", 30, progress=50.0)
    assert on(claimer, other.claim, "w2", 30) is None
    got = store.get(job.id)
    assert got.worker_id == "w1" and got.attempts == 1
    assert on(worker, store.complete, job.id, "w1", "/v.mp4", {})
    assert len(on(worker, store.claim_webhooks, "node1", 10, 30)) == 2  # started, 50 %
    assert on(claimer, other.claim_webhooks, "node2", 10, 30) == []
    # LoRA affinity waits too: a job queued just now (created on an API host `skew` off) has not waited 60 s for a
    # worker with another set loaded, whatever that worker's clock says
    old = on(-skew, _queue, store, "B")[0]
    on(-skew, _queue, store, "A")
    assert on(skew, other.claim, "w3", 30, loaded_key=KEY["A"], affinity_skip=4, affinity_wait_s=30).id != old
    other.close()


def test_a_dead_workers_job_is_recovered_behind_many_live_ones(store):
    """Expired leases are found by their deadline (old Redis looked only at the first 100 pending stream entries, three
    round trips each: a dead worker's job behind 100 live ones waited until they finished)."""
    ids = [store.create({"n": i})[0].id for i in range(101)]
    for job_id in ids[:100]:
        assert store.claim("live", 30).id == job_id
    assert store.claim("dead", 0.2).id == ids[100]
    time.sleep(0.3)
    again = store.claim("idle", 30)
    assert again is not None and again.id == ids[100] and again.attempts == 2


def test_a_job_an_old_version_worker_took_is_indexed_by_expiry_and_recovered(store):
    """During a rolling upgrade a schema-2 worker beside new ones takes jobs without indexing their lease; if it
    then dies, no claim found the job (it stayed processing for good). The API's minutely expire() indexes it."""
    _redis_only(store)
    job = store.create({})[0]
    assert store.claim("old", 0.2).id == job.id
    store.r.zrem("wanrt:leases", job.id)  # as an old worker's take leaves it
    store.expire(3600)
    time.sleep(0.3)
    again = store.claim("w", 30)
    assert again is not None and again.id == job.id and again.attempts == 2


def test_running_jobs_of_the_previous_layout_are_recovered(store):
    """A Redis written by the previous version (no lease index) still hands a dead worker's job on."""
    _redis_only(store)
    job = store.create({})[0]
    assert store.claim("dead", 0.2).id == job.id
    store.r.delete("wanrt:leases")
    store.r.set("wanrt:schema", "2")
    upgraded = RedisJobStore(store.url)
    time.sleep(0.3)
    again = upgraded.claim("w", 30)
    assert again is not None and again.id == job.id and again.attempts == 2
    upgraded.close()


def test_a_redis_that_stops_answering_raises_instead_of_hanging(monkeypatch):
    """A Redis that accepts and never answers (a frozen host, a partition without a reset) hung every call for
    ever: no socket timeout. Now calls raise after RedisJobStore.TIMEOUTS (shortened here), and callers retry."""
    import socket

    import redis

    monkeypatch.setattr(RedisJobStore, "TIMEOUTS", {**RedisJobStore.TIMEOUTS, "socket_timeout": 0.5})
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.time()
        with pytest.raises(redis.TimeoutError):
            RedisJobStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        assert time.time() - t0 < 5

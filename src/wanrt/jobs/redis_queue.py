"""Jobs on Redis for scale-out: stateless API nodes and GPU workers on many machines share one Redis.

- Job records are hashes (`wanrt:job:<id>`); the queue is a stream (`wanrt:queue`) read by the consumer
  group `workers`, one consumer per worker slot.
- A claimed entry stays pending until the job ends (XACK). The worker's heartbeat re-claims its own entry
  (XCLAIM JUSTID, which resets the idle time); a worker that dies stops doing that, and after the lease any
  other worker takes the entry with XAUTOCLAIM. A restarted worker first reads its own pending entries.
- State changes that must be atomic (claim, complete, heartbeat ownership, queue bound) are Lua scripts.
- Progress and cancel flags travel in the hash, so an API node anywhere sees them.
Same interface as jobs.store.JobStore; tests/test_store_contract.py runs one suite on both.
"""

from __future__ import annotations

import json
import time
import uuid

from wanrt.jobs.store import MAX_ATTEMPTS, STATES, TERMINAL, Job, QueueFull

P = "wanrt"
STREAM, GROUP = f"{P}:queue", "workers"
JOBS, QUEUED, FINISHED, SEQ = f"{P}:jobs", f"{P}:queued", f"{P}:finished", f"{P}:seq"

_JSON_FIELDS = ("params", "timings")
_FLOAT_FIELDS = ("progress", "created_at", "started_at", "finished_at", "lease_until")
_INT_FIELDS = ("attempts", "seq")
_BOOL_FIELDS = ("retryable", "cancel_requested", "deleted")


def _key(job_id: str) -> str:
    return f"{P}:job:{job_id}"


def _state_key(status: str) -> str:
    return f"{P}:state:{status}"


# KEYS: job hash, queued zset, jobs zset, state:queued set, idem key | ARGV: id, seq-less fields json, queue_max, now
_CREATE = """
if ARGV[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {0, existing} end
end
if tonumber(ARGV[3]) >= 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return {-1, ''} end
local seq = redis.call('INCR', KEYS[6])
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], ARGV[1]) end
redis.call('XADD', KEYS[7], '*', 'id', ARGV[1])
return {1, ARGV[1]}
"""

# Take a delivered entry: KEYS job hash, queued zset, state prefix | ARGV worker, device, lease_until, now, max_attempts
_TAKE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or redis.call('HGET', KEYS[1], 'deleted') == '1' then return 'gone' end
if status ~= 'queued' and status ~= 'processing' then return 'gone' end
if status == 'processing' and redis.call('HGET', KEYS[1], 'worker_id') ~= ARGV[1] then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '') or 0
  if lease >= tonumber(ARGV[4]) then return 'busy' end  -- another live worker has it
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local id = redis.call('HGET', KEYS[1], 'id')
if attempts >= tonumber(ARGV[5]) then
  redis.call('SREM', KEYS[3] .. status, id)
  redis.call('SADD', KEYS[3] .. 'error', id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HSET', KEYS[1], 'status', 'error', 'finished_at', ARGV[4], 'error_type', 'worker_lost', 'retryable', '1',
             'error', 'The worker running this job died ' .. ARGV[5] .. ' times')
  redis.call('ZADD', KEYS[4], ARGV[4], id)
  return 'poison'
end
redis.call('SREM', KEYS[3] .. status, id)
redis.call('SADD', KEYS[3] .. 'processing', id)
redis.call('ZREM', KEYS[2], id)
redis.call('HSET', KEYS[1], 'status', 'processing', 'worker_id', ARGV[1], 'device', ARGV[2], 'lease_until', ARGV[3],
           'attempts', attempts + 1, 'progress', '0', 'stage', 'starting')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[4]) end
return 'ok'
"""

# Finish a job this worker owns: KEYS job hash, state prefix, finished zset | ARGV worker, new status, now, fields json
_FINISH = """
if redis.call('HGET', KEYS[1], 'worker_id') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'processing' then
  return 0
end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('SREM', KEYS[2] .. 'processing', id)
redis.call('SADD', KEYS[2] .. ARGV[2], id)
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'lease_until', '')
for k, v in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[3], ARGV[3], id)
return 1
"""

_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'worker_id') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'processing' then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'stage', ARGV[4]) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 0 end
return 1
"""


class RedisJobStore:
    def __init__(self, url: str):
        import redis

        self.url = url
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.r.ping()
        try:
            self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._create = self.r.register_script(_CREATE)
        self._take = self.r.register_script(_TAKE)
        self._finish = self.r.register_script(_FINISH)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._entry: dict[str, str] = {}  # job id -> stream entry id, for this process's running jobs
        self._orphans: dict[str, list] = {}

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _encode(fields: dict) -> dict[str, str]:
        out = {}
        for k, v in fields.items():
            if v is None:
                continue
            if k in _JSON_FIELDS:
                out[k] = json.dumps(v)
            elif k in _BOOL_FIELDS:
                out[k] = "1" if v else "0"
            else:
                out[k] = str(v)
        return out

    @staticmethod
    def _decode(h: dict[str, str]) -> Job | None:
        if not h or "id" not in h:
            return None
        d: dict = {}
        for k, v in h.items():
            if v == "":
                d[k] = None
            elif k in _JSON_FIELDS:
                d[k] = json.loads(v)
            elif k in _FLOAT_FIELDS:
                d[k] = float(v)
            elif k in _INT_FIELDS:
                d[k] = int(v)
            elif k in _BOOL_FIELDS:
                d[k] = v == "1"
            else:
                d[k] = v
        d.setdefault("timings", {})
        d["timings"] = d["timings"] or {}
        d["cancel_requested"] = bool(d.get("cancel_requested"))
        d["deleted"] = bool(d.get("deleted"))
        return Job(**{k: v for k, v in d.items() if k in Job.__dataclass_fields__})

    # ------------------------------------------------------------------ API side
    def create(self, params: dict, input_image: str | None = None, idempotency_key: str | None = None,
               job_id: str | None = None, queue_max: int | None = None) -> tuple[Job, bool]:
        job_id = job_id or str(uuid.uuid4())
        fields = self._encode({"id": job_id, "status": "queued", "params": params, "progress": 0.0,
                               "input_image": input_image, "created_at": time.time(), "attempts": 0,
                               "idempotency_key": idempotency_key, "cancel_requested": False, "deleted": False})
        code, found = self._create(
            keys=[_key(job_id), QUEUED, JOBS, _state_key("queued"), f"{P}:idem:{idempotency_key or ''}", SEQ, STREAM],
            args=[job_id, json.dumps(fields), -1 if queue_max is None else queue_max, time.time(), idempotency_key or ""])
        if int(code) == -1:
            raise QueueFull(self.r.zcard(QUEUED))
        return self.get(found, include_deleted=True), int(code) == 1

    def get(self, job_id: str, include_deleted: bool = False) -> Job | None:
        job = self._decode(self.r.hgetall(_key(job_id)))
        if job is None or (job.deleted and not include_deleted):
            return None
        return job

    def get_by_idempotency_key(self, key: str) -> Job | None:
        job_id = self.r.get(f"{P}:idem:{key}")
        return self.get(job_id) if job_id else None

    def list(self, status: str | None = None, limit: int | None = None, offset: int = 0) -> tuple[list[Job], int]:
        ids = self.r.zrange(JOBS, 0, -1)
        pipe = self.r.pipeline()
        for i in ids:
            pipe.hgetall(_key(i))
        jobs = [j for j in (self._decode(h) for h in pipe.execute()) if j is not None and not j.deleted]
        if status:
            jobs = [j for j in jobs if j.status == status]
        total = len(jobs)
        if limit is not None:
            jobs = jobs[offset:offset + limit]
        return jobs, total

    def queue_position(self, job: Job) -> int:
        rank = self.r.zrank(QUEUED, job.id)
        return 0 if rank is None else rank + 1

    def counts(self) -> dict[str, int]:
        pipe = self.r.pipeline()
        for s in STATES:
            pipe.scard(_state_key(s))
        return dict(zip(STATES, pipe.execute()))

    def _remove(self, job: Job) -> None:
        pipe = self.r.pipeline()
        pipe.delete(_key(job.id))
        pipe.zrem(JOBS, job.id)
        pipe.zrem(QUEUED, job.id)
        pipe.zrem(FINISHED, job.id)
        for s in STATES:
            pipe.srem(_state_key(s), job.id)
        if job.idempotency_key:
            pipe.delete(f"{P}:idem:{job.idempotency_key}")
        pipe.execute()

    def delete(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None:
            return None
        if job.status == "processing":
            self.r.hset(_key(job_id), mapping={"deleted": "1", "cancel_requested": "1"})
            for s in STATES:
                self.r.srem(_state_key(s), job_id)  # hidden from counts at once
        else:
            self._remove(job)  # a queued entry left in the stream is skipped when a worker reads it
        return job

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None:
            return None
        if job.status == "queued":
            now = time.time()
            pipe = self.r.pipeline()
            pipe.hset(_key(job_id), mapping={"status": "cancelled", "finished_at": now, "error": "Cancelled by request",
                                             "error_type": "cancelled", "retryable": "0"})
            pipe.zrem(QUEUED, job_id)
            pipe.smove(_state_key("queued"), _state_key("cancelled"), job_id)
            pipe.zadd(FINISHED, {job_id: now})
            pipe.execute()
        elif job.status == "processing":
            self.r.hset(_key(job_id), "cancel_requested", "1")
        return self.get(job_id)

    def expire(self, older_than_s: float) -> list[Job]:
        cutoff = time.time() - older_than_s
        out = []
        for job_id in self.r.zrangebyscore(FINISHED, "-inf", cutoff):
            job = self.get(job_id, include_deleted=True)
            if job is not None and job.status in TERMINAL:
                self._remove(job)
                out.append(job)
            else:
                self.r.zrem(FINISHED, job_id)
        return out

    # ------------------------------------------------------------------ worker side
    def claim(self, worker_id: str, lease_s: float, device: str | None = None) -> Job | None:
        """Entries whose job's lease ran out (their worker died; or our own previous life's, found by
        release_orphans) first, then new ones."""
        candidates = self._orphans.pop(worker_id, []) + self._stale_entries(worker_id, lease_s)
        if not candidates:
            new = self.r.xreadgroup(GROUP, worker_id, {STREAM: ">"}, count=1)
            candidates = [m for _, msgs in new for m in msgs]
        for entry_id, fields in candidates:
            job_id = (fields or {}).get("id")
            now = time.time()
            result = self._take(keys=[_key(job_id), QUEUED, f"{P}:state:", FINISHED],
                                args=[worker_id, device or "", now + lease_s, now, MAX_ATTEMPTS]) if job_id else "gone"
            if result == "busy":  # a live worker took it first: not ours to drop
                continue
            if result != "ok":  # deleted, already finished, or failed too often: drop the entry
                self._ack(entry_id)
                continue
            self._entry[job_id] = entry_id
            return self.get(job_id, include_deleted=True)
        return None

    def _stale_entries(self, worker_id: str, lease_s: float, limit: int = 100) -> list:
        """Pending entries whose worker is gone: the job's lease has passed, or (read but never taken, the
        reader died in between) the entry has been idle for a lease. XCLAIM them to us."""
        stale = []
        now = time.time()
        for p in self.r.xpending_range(STREAM, GROUP, min="-", max="+", count=limit):
            entry_id, idle_ms = p["message_id"], p["time_since_delivered"]
            found = self.r.xrange(STREAM, entry_id, entry_id)
            if not found:
                self._ack(entry_id)
                continue
            job_id = found[0][1].get("id")
            lease = self.r.hget(_key(job_id), "lease_until")
            status = self.r.hget(_key(job_id), "status")
            if status == "processing" and lease and float(lease) >= now:
                continue  # alive
            if status == "queued" and idle_ms < lease_s * 1000:
                continue  # being taken by the worker that just read it
            claimed = self.r.xclaim(STREAM, GROUP, worker_id, 0, [entry_id])
            stale += [m for m in claimed if m and m[1]]
            if stale:
                break
        return stale

    def _ack(self, entry_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.xack(STREAM, GROUP, entry_id)
        pipe.xdel(STREAM, entry_id)
        pipe.execute()

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, progress: float | None = None,
                  stage: str | None = None) -> bool:
        ok = int(self._heartbeat(keys=[_key(job_id)], args=[worker_id, time.time() + lease_s,
                                                             "" if progress is None else progress, stage or ""]))
        entry = self._entry.get(job_id)
        if ok and entry:  # still ours: reset the entry's idle time too (XPENDING shows live workers)
            self.r.xclaim(STREAM, GROUP, worker_id, 0, [entry], justid=True)
        return bool(ok)

    def _end(self, job_id: str, worker_id: str, status: str, fields: dict) -> bool:
        ok = int(self._finish(keys=[_key(job_id), f"{P}:state:", FINISHED],
                              args=[worker_id, status, time.time(), json.dumps(self._encode(fields))]))
        entry = self._entry.pop(job_id, None)
        if ok and entry:
            self._ack(entry)
        return bool(ok)

    def complete(self, job_id: str, worker_id: str, video_path: str, timings: dict, params: dict | None = None) -> bool:
        return self._end(job_id, worker_id, "completed", {"progress": 100.0, "stage": "done", "video_path": video_path,
                                                          "timings": timings, **({"params": params} if params else {})})

    def fail(self, job_id: str, worker_id: str, error: str, error_type: str, retryable: bool, timings: dict | None = None) -> bool:
        return self._end(job_id, worker_id, "error", {"error": error, "error_type": error_type, "retryable": retryable,
                                                      "timings": timings or {}})

    def finish_cancelled(self, job_id: str, worker_id: str) -> Job | None:
        job = self.get(job_id, include_deleted=True)
        if job is None:
            return None
        entry = self._entry.pop(job_id, None)
        if entry:
            self._ack(entry)
        if job.deleted:
            self._remove(job)
        else:
            self._end(job_id, worker_id, "cancelled", {"error": "Cancelled by request", "error_type": "cancelled",
                                                       "retryable": False})
        return job

    def release(self, job_id: str, worker_id: str) -> bool:
        """Back to the queue now (graceful shutdown), without counting an attempt."""
        job = self.get(job_id, include_deleted=True)
        if job is None or job.worker_id != worker_id or job.status != "processing":
            return False
        pipe = self.r.pipeline()
        pipe.hset(_key(job_id), mapping={"status": "queued", "worker_id": "", "lease_until": "", "progress": "0",
                                         "stage": "", "attempts": max(0, job.attempts - 1)})
        pipe.smove(_state_key("processing"), _state_key("queued"), job_id)
        pipe.zadd(QUEUED, {job_id: job.seq})
        pipe.execute()
        entry = self._entry.pop(job_id, None)
        if entry:
            self._ack(entry)
        self.r.xadd(STREAM, {"id": job_id})
        return True

    def report_worker(self, worker_id: str, info: dict) -> None:
        self.r.hset(f"{P}:workers", worker_id, json.dumps({**info, "updated_at": time.time()}))

    def workers(self) -> list[dict]:
        return [{"id": k, **json.loads(v)} for k, v in sorted(self.r.hgetall(f"{P}:workers").items())]

    def release_orphans(self, worker_id: str) -> int:
        """At worker start: entries still pending for this consumer belong to its previous, dead, life;
        the next claims take them first (same stream entry, so queue order is kept)."""
        own = [m for _, msgs in self.r.xreadgroup(GROUP, worker_id, {STREAM: "0"}, count=100) for m in msgs]
        for entry_id, fields in own:
            if not fields:  # deleted from the stream while pending
                self._ack(entry_id)
        self._orphans[worker_id] = [m for m in own if m[1]]
        return len(self._orphans[worker_id])

    def close(self) -> None:
        self.r.close()

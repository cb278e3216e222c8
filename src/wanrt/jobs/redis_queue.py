"""Jobs on Redis for scale-out: stateless API nodes and GPU workers on many machines share one Redis.

- Job records are hashes (`wanrt:job:<id>`); the queue is a stream (`wanrt:queue`) read by the consumer
  group `workers`, one consumer per worker slot.
- Indexes, all sorted by the job's creation seq so a page is one ZRANGE: `wanrt:jobs` (every live job) and
  `wanrt:state:<status>` (live jobs per state; `wanrt:state:queued` gives queue positions and the bound).
  `wanrt:finished` holds finished (and hidden, deleted) jobs by time, for expiry. Deleted jobs leave the
  indexes at once, so list/counts never see them.
- Leases are on the Redis server's clock (TIME, read inside the scripts), never a host's: hosts' clocks differ,
  and a lease written from one and read against another was stolen or never ran out. `wanrt:leases` holds each
  running job's lease deadline, so a claim finds a dead worker's job with one ZRANGEBYSCORE (any number of live
  jobs), and takes it before queued ones. Every time a script writes (started_at, finished_at, webhook due
  times, created_at) is the server's too.
- Claims run jobs in seq order, as queue_position counts them: in stream order, except the queue's head when
  the stream would not hand it out next (_TAKE_HEAD): a job released back to the queue (`requeued`: its new
  entry is behind the jobs queued meanwhile) or one whose entry a reader took and never ran (it died, or has
  no LoRA slots for it).
- A claimed entry stays pending for its worker until the job ends; the script that ends or removes a job acks
  and deletes its entry, whoever holds it. A restarted worker first reads its own pending entries.
- Every change to a job's record and indexes is one Lua script (atomic: nothing reads a half-made change,
  and each script re-checks the state it acts on), and publishes on `wanrt:events:<id>` for wait_for_change.
- Progress and cancel flags travel in the hash, so an API node anywhere sees them.
- Webhook deliveries are hashes (`wanrt:webhook:<id>`), queued by the same script that changes the job's
  state, due in the zset `wanrt:webhooks:due` (score: next attempt, or the end of a claim's lease), listed per
  job in `wanrt:webhooks:job:<job id>`; finished ones wait in `wanrt:webhooks:done` for expiry. A claim is one
  script, so API nodes sharing this Redis never take the same attempt twice.
RedisJobStore implements jobs.protocol.JobStore; tests/test_store.py runs one suite on both stores.
"""

from __future__ import annotations

import json
import time
import uuid

from wanrt.jobs.store import (
    CAPABLE_WINDOW,
    MAX_ATTEMPTS,
    STATES,
    TERMINAL,
    Job,
    QueueFull,
    WebhookDelivery,
    affinity_window,
    stage_seconds,
    usage_bucket,
    usage_summary,
)
from wanrt.lora_request import LIVE_REPORT_S, pick_next

P = "wanrt"
STREAM, GROUP = f"{P}:queue", "workers"
JOBS, FINISHED, SCHEMA = f"{P}:jobs", f"{P}:finished", f"{P}:schema"
STAGE_SECONDS, STAGE_COUNT = f"{P}:stage_seconds", f"{P}:stage_count"
USAGE, WEBHOOKS_DUE, WEBHOOKS_DONE = f"{P}:usage", f"{P}:webhooks:due", f"{P}:webhooks:done"
SCHEMA_VERSION = "3"

_JSON_FIELDS = ("params", "timings", "gpu_seconds")
_FLOAT_FIELDS = ("progress", "created_at", "started_at", "finished_at", "lease_until", "cost_usd")
_INT_FIELDS = ("attempts", "seq")
_BOOL_FIELDS = ("retryable", "cancel_requested", "deleted")
# field -> how its string becomes the Job's value (others stay strings; "" is None)
_DECODERS = {**dict.fromkeys(_JSON_FIELDS, json.loads), **dict.fromkeys(_FLOAT_FIELDS, float),
             **dict.fromkeys(_INT_FIELDS, int), **dict.fromkeys(_BOOL_FIELDS, "1".__eq__)}


def _key(job_id: str) -> str:
    return f"{P}:job:{job_id}"


def _state_key(status: str) -> str:
    return f"{P}:state:{status}"


QUEUED = _state_key("queued")

# Shared by every script. Scripts name their keys from the prefix (one Redis, not a cluster).
_LIB = """
local P = '%(P)s'
local STATES = {%(states)s}
local TERMINAL = {%(terminal)s}
local LEASES = P .. ':leases'
local function jkey(id) return P .. ':job:' .. id end
local function skey(s) return P .. ':state:' .. s end
local function publish(id, what) redis.call('PUBLISH', P .. ':events:' .. id, what) end
local function job(id)  -- the hash as a table (nil when gone) and as the flat reply Python decodes
  local flat = redis.call('HGETALL', jkey(id))
  if #flat == 0 then return nil, flat end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h, flat
end
local function clock()  -- the server's time: the one clock every host's scripts share
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function drop_entry(h)  -- the job's stream entry is done with: acked whichever reader holds it (dead or alive)
  if h.entry and h.entry ~= '' then
    redis.call('XACK', P .. ':queue', 'workers', h.entry)
    redis.call('XDEL', P .. ':queue', h.entry)
  end
end
local function has_loras(params)  -- RedisJobStore._params_have_loras
  local ok, p = pcall(cjson.decode, params or '')
  if not ok or type(p) ~= 'table' then return false end
  local l = p.loras
  if type(l) == 'table' then return next(l) ~= nil end
  return l ~= nil and l ~= cjson.null and l ~= false and l ~= '' and l ~= 0
end
local function is_terminal(s)
  for _, t in ipairs(TERMINAL) do if s == t then return true end end
  return false
end
local function set_status(id, h, to)  -- a live job moves between state indexes
  redis.call('ZREM', skey(h.status), id)
  redis.call('ZADD', skey(to), h.seq, id)
  redis.call('HSET', jkey(id), 'status', to)
end
local function unindex(id)
  redis.call('ZREM', P .. ':jobs', id)
  for _, s in ipairs(STATES) do redis.call('ZREM', skey(s), id) end
end
local function drop_idem(id, h)  -- only if the key still names this job
  if h.idempotency_key and h.idempotency_key ~= '' then
    local k = P .. ':idem:' .. h.idempotency_key
    if redis.call('GET', k) == id then redis.call('DEL', k) end
  end
end
local function remove(id, h)
  redis.call('DEL', jkey(id))
  unindex(id)
  redis.call('ZREM', P .. ':finished', id)
  redis.call('ZREM', LEASES, id)
  drop_entry(h)
  drop_idem(id, h)
  publish(id, 'removed')
end
local function webhook(id, h, event, now)  -- queue a delivery when the job asked for this event
  if h.deleted == '1' or not h.webhook or h.webhook == '' then return end
  if not string.find(',' .. (h.webhook_events or '') .. ',', ',' .. event .. ',', 1, true) then return end
  local did = 'msg_' .. redis.call('INCR', P .. ':webhook_seq') .. '_' .. id
  redis.call('HSET', P .. ':webhook:' .. did, 'id', did, 'job_id', id, 'event', event, 'url', h.webhook,
             'state', 'pending', 'attempts', 0, 'next_at', now, 'created_at', now, 'updated_at', now)
  redis.call('ZADD', P .. ':webhooks:due', now, did)
  redis.call('SADD', P .. ':webhooks:job:' .. id, did)
end
local function finish(id, h, to, now, fields)
  set_status(id, h, to)
  redis.call('HSET', jkey(id), 'finished_at', now, 'lease_until', '', unpack(fields))
  redis.call('ZADD', P .. ':finished', now, id)
  redis.call('ZREM', LEASES, id)
  drop_entry(h)
  publish(id, to)
  webhook(id, h, to, now)
end
local CANCELLED = {'error', 'Cancelled by request', 'error_type', 'cancelled', 'retryable', '0'}
local function take(id, worker, device, lease_s, now, max_attempts)  -- a claim's state change (now: clock())
  local h = job(id)
  if not h or h.deleted == '1' or (h.status ~= 'queued' and h.status ~= 'processing') then
    redis.call('ZREM', LEASES, id)  -- nothing to run (a deleted running job: its worker or expire removes it)
    if h then drop_entry(h) end
    return 'gone'
  end
  if h.status == 'processing' and h.worker_id ~= worker then
    local lease = tonumber(h.lease_until or '') or 0
    if lease >= now then  -- another live worker has it
      redis.call('ZADD', LEASES, lease, id)  -- in step with the hash (a previous version's heartbeat wrote it alone)
      return 'busy'
    end
  end
  if h.cancel_requested == '1' then  -- asked to cancel while its worker was dead: nothing left to run
    finish(id, h, 'cancelled', now, CANCELLED)
    return 'cancelled'
  end
  local attempts = tonumber(h.attempts or '0')
  if attempts >= tonumber(max_attempts) then
    finish(id, h, 'error', now, {'error_type', 'worker_lost', 'retryable', '1',
                                 'error', 'The worker running this job died ' .. max_attempts .. ' times'})
    return 'poison'
  end
  local was, lease_until = h.status, now + tonumber(lease_s)
  set_status(id, h, 'processing')
  redis.call('HSET', jkey(id), 'worker_id', worker, 'device', device, 'lease_until', lease_until,
             'attempts', attempts + 1, 'progress', '0', 'stage', 'starting')
  redis.call('HDEL', jkey(id), 'requeued')
  redis.call('ZADD', LEASES, lease_until, id)
  if not h.started_at or h.started_at == '' then redis.call('HSET', jkey(id), 'started_at', now) end
  publish(id, 'processing')
  if was == 'queued' then webhook(id, h, 'progress', now) end  -- the first 'progress' event: it started
  return 'ok'
end
-- take, and the job's stream entry (undelivered, or pending for any reader) becomes this worker's pending entry
-- (XCLAIM FORCE; an entry no longer in the stream is ignored), so XACK works as for an entry it read itself.
-- A worker that reads the entry later finds the job taken ('busy'). Returns take's result and the entry.
local function take_entry(id, worker, device, lease_s, now, max_attempts)
  local result = take(id, worker, device, lease_s, now, max_attempts)
  local entry = redis.call('HGET', jkey(id), 'entry') or ''
  if result == 'ok' and entry ~= '' then
    redis.call('XCLAIM', P .. ':queue', 'workers', worker, 0, entry, 'FORCE', 'JUSTID')
  end
  return result, entry
end
local function add_stages(stages)  -- {stage: seconds} into the /metrics totals
  for stage, seconds in pairs(stages) do
    redis.call('HINCRBYFLOAT', P .. ':stage_seconds', stage, seconds)
    redis.call('HINCRBY', P .. ':stage_count', stage, 1)
  end
end
""" % {"P": P, "states": ", ".join(f"'{s}'" for s in STATES), "terminal": ", ".join(f"'{s}'" for s in TERMINAL)}

# ARGV: id, fields json, queue_max (-1: none), idempotency key ('' : none). Returns {code, job}: 1 created,
# 0 the key's existing job, -1 queue full.
_CREATE = """
local id, idem = ARGV[1], ARGV[4] ~= '' and (P .. ':idem:' .. ARGV[4]) or nil
if idem then
  local existing = redis.call('GET', idem)
  if existing then
    local h, flat = job(existing)
    if h and h.deleted ~= '1' then return {0, flat} end  -- a key left by a hidden job is free
  end
end
if tonumber(ARGV[3]) >= 0 and redis.call('ZCARD', skey('queued')) >= tonumber(ARGV[3]) then return {-1, {}} end
local seq = redis.call('INCR', P .. ':seq')
for k, v in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', jkey(id), k, v) end
redis.call('HSET', jkey(id), 'seq', seq, 'created_at', clock())  -- the server's: affinity waits are measured on it
redis.call('ZADD', P .. ':jobs', seq, id)
redis.call('ZADD', skey('queued'), seq, id)
if idem then redis.call('SET', idem, id) end
redis.call('HSET', jkey(id), 'entry', redis.call('XADD', P .. ':queue', '*', 'id', id))  -- for affinity picks
publish(id, 'queued')
local _, flat = job(id)
return {1, flat}
"""

# Take a delivered entry's job. ARGV: id, worker, device, lease_s, max_attempts
_TAKE = """
return take(ARGV[1], ARGV[2], ARGV[3], ARGV[4], clock(), ARGV[5])
"""

# A job whose lease ran out (its worker died), by deadline: the first of up to ARGV[6] that this worker may take.
# ARGV: worker, device, lease_s, max_attempts, serves_loras (1/0), limit. Returns {take's result, id, entry}.
_RECLAIM = """
local now = clock()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))) do
  if ARGV[5] == '1' or not has_loras(redis.call('HGET', jkey(id), 'params')) then
    local result, entry = take_entry(id, ARGV[1], ARGV[2], ARGV[3], now, ARGV[4])
    if result == 'ok' then return {result, id, entry} end
  end
end
return {'none', '', ''}
"""

# The queue's head, when reading the stream would not hand it out next: released back to the queue (its new entry
# is behind the jobs queued meanwhile), or its entry read by a worker that did not take it (died in between; or has
# no LoRA slots for it). Else {'stream', '', ''}: the caller reads the stream, which hands the head out next. ARGV:
# worker, device, lease_s, max_attempts, serves_loras (1/0). Returns {take's result, id, entry}.
_TAKE_HEAD = """
local now = clock()
for _ = 1, 4 do  -- a head that died too often ends as an error ('poison'): the next one
  local id = redis.call('ZRANGE', skey('queued'), 0, 0)[1]
  if not id then break end
  local requeued, entry, params = unpack(redis.call('HMGET', jkey(id), 'requeued', 'entry', 'params'))
  if not entry or entry == '' or #redis.call('XRANGE', P .. ':queue', entry, entry) == 0 then break end
  if requeued ~= '1' and #redis.call('XPENDING', P .. ':queue', 'workers', entry, entry, 1) == 0 then break end
  if ARGV[5] ~= '1' and has_loras(params) then break end
  local result = take_entry(id, ARGV[1], ARGV[2], ARGV[3], now, ARGV[4])
  if result ~= 'poison' then return {result, id, entry} end
end
return {'stream', '', ''}
"""

# LoRA affinity: the oldest queued jobs (ARGV: how many), each as {id, params, created_at, passed_over, entry}
_WINDOW = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', skey('queued'), 0, tonumber(ARGV[1]) - 1)) do
  local f = redis.call('HMGET', jkey(id), 'params', 'created_at', 'passed_over', 'entry')
  out[#out + 1] = {id, f[1] or '', f[2] or '', f[3] or '0', f[4] or ''}
end
return out
"""

# Take the job pick_next chose from _WINDOW, out of stream order (with its entry: take_entry), only if the queue
# still starts with the jobs it passes over (none taken, none inserted, none passed over `skip` times meanwhile):
# else {'moved'} and the caller reads the window again. ARGV: id, worker, device, lease_s, max_attempts, skip (-1:
# passes not counted), passed id... Returns {take's result, entry}.
_TAKE_PICK = """
local id, skip, n = ARGV[1], tonumber(ARGV[6]), #ARGV - 6
local counted = skip >= 0  -- skip -1: a worker without LoRA slots passing LoRA jobs by (not an affinity pass)
local ahead = redis.call('ZRANGE', skey('queued'), 0, n)
if #ahead ~= n + 1 or ahead[n + 1] ~= id then return {'moved', ''} end
for i = 1, n do
  if ahead[i] ~= ARGV[6 + i] then return {'moved', ''} end
  if counted and (tonumber(redis.call('HGET', jkey(ahead[i]), 'passed_over') or '0') or 0) >= skip then
    return {'moved', ''}
  end
end
local entry = redis.call('HGET', jkey(id), 'entry')
if not entry or entry == '' or #redis.call('XRANGE', P .. ':queue', entry, entry) == 0 then return {'no_entry', ''} end
local result = take_entry(id, ARGV[2], ARGV[3], ARGV[4], clock(), ARGV[5])
if result == 'ok' and counted then
  for i = 1, n do redis.call('HINCRBY', jkey(ARGV[6 + i]), 'passed_over', 1) end
end
return {result, entry}
"""

# complete/fail a job this worker owns, unless it was deleted or asked to cancel meanwhile (then 0: the
# worker goes the cancel path). ARGV: id, worker, new status, fields json, stages json
_FINISH = """
local id = ARGV[1]
local h = job(id)
if not h or h.worker_id ~= ARGV[2] or h.status ~= 'processing' or h.cancel_requested == '1' or h.deleted == '1' then
  return 0
end
local fields = {}
for k, v in pairs(cjson.decode(ARGV[4])) do fields[#fields + 1] = k; fields[#fields + 1] = v end
finish(id, h, ARGV[3], clock(), fields)
if ARGV[3] == 'completed' then add_stages(cjson.decode(ARGV[5])) end
return 1
"""

# ARGV: id, worker. Returns the job as it was, or false when it is not this worker's.
_FINISH_CANCELLED = """
local id = ARGV[1]
local h, flat = job(id)
if not h or h.worker_id ~= ARGV[2] or h.status ~= 'processing' then return false end
if h.deleted == '1' then remove(id, h) else finish(id, h, 'cancelled', clock(), CANCELLED) end
return flat
"""

# ARGV: id, worker_id, lease_s, progress, stage
_HEARTBEAT = """
local id, now = ARGV[1], clock()
local h = job(id)
if not h or h.worker_id ~= ARGV[2] or h.status ~= 'processing' then return 0 end
local lease_until = now + tonumber(ARGV[3])
redis.call('HSET', jkey(id), 'lease_until', lease_until)
redis.call('ZADD', LEASES, lease_until, id)
if ARGV[4] ~= '' and math.floor(tonumber(ARGV[4]) / 10) > math.floor((tonumber(h.progress or '0') or 0) / 10) then
  webhook(id, h, 'progress', now)  -- one 'progress' event each time progress passes another 10 %
end
if ARGV[4] ~= '' then redis.call('HSET', jkey(id), 'progress', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', jkey(id), 'stage', ARGV[5]) end
if ARGV[4] ~= '' or ARGV[5] ~= '' then publish(id, 'progress') end
if h.cancel_requested == '1' then return 0 end
return 1
"""

# ARGV: id. Returns the job as it was, or false. A running job is hidden (out of every index, its Idempotency-Key
# freed) and asked to cancel; it also goes into `finished`, so that expire removes it should its worker die before
# finish_cancelled (its lease stays: a claim after it ran out drops its stream entry). Any other job is removed now.
_DELETE = """
local id = ARGV[1]
local h, flat = job(id)
if not h or h.deleted == '1' then return false end
if h.status == 'processing' then
  redis.call('HSET', jkey(id), 'deleted', '1', 'cancel_requested', '1')
  unindex(id)
  drop_idem(id, h)
  redis.call('ZADD', P .. ':finished', clock(), id)
  publish(id, 'deleted')
else
  remove(id, h)
end
return flat
"""

# ARGV: id. Returns the job after, or false.
_CANCEL = """
local id = ARGV[1]
local h = job(id)
if not h or h.deleted == '1' then return false end
if h.status == 'queued' then
  finish(id, h, 'cancelled', clock(), CANCELLED)
elseif h.status == 'processing' and h.cancel_requested ~= '1' then
  redis.call('HSET', jkey(id), 'cancel_requested', '1')
  publish(id, 'cancel_requested')
end
local _, flat = job(id)
return flat
"""

# Back to the queue without counting an attempt, with a new stream entry, at the stream's end: marked `requeued`,
# so that claims take it when it reaches the queue's head (_TAKE_HEAD), where its seq keeps it. ARGV: id, worker
_RELEASE = """
local id = ARGV[1]
local h = job(id)
if not h or h.worker_id ~= ARGV[2] or h.status ~= 'processing' or h.cancel_requested == '1' or h.deleted == '1' then
  return 0
end
set_status(id, h, 'queued')
redis.call('ZREM', LEASES, id)
drop_entry(h)
redis.call('HSET', jkey(id), 'worker_id', '', 'lease_until', '', 'progress', '0', 'stage', '', 'requeued', '1',
           'attempts', math.max(0, (tonumber(h.attempts or '0') or 0) - 1))
redis.call('HSET', jkey(id), 'entry', redis.call('XADD', P .. ':queue', '*', 'id', id))
publish(id, 'queued')
return 1
"""

# One batch of expiry: finished a TTL ago on the server's clock. ARGV: ttl, limit. Returns {entries scanned, removed
# job, removed job, ...}. Each job's state is checked here, so nothing that changed since the caller decided is removed.
_EXPIRE = """
local cutoff = clock() - tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', P .. ':finished', '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {#ids}
for _, id in ipairs(ids) do
  local h, flat = job(id)
  if h and (is_terminal(h.status) or (h.deleted == '1' and (tonumber(h.lease_until or '') or 0) < cutoff)) then
    remove(id, h)
    out[#out + 1] = flat
  elseif h and h.deleted == '1' then  -- hidden, its worker still alive: look again a TTL after its lease
    redis.call('ZADD', P .. ':finished', h.lease_until, id)
  else
    redis.call('ZREM', P .. ':finished', id)
  end
end
return out
"""

# Once per Redis. From the first layout: per-state SETs (and a separate queued zset) become seq-sorted zsets,
# deleted jobs leave the indexes, /metrics stage totals are seeded from the completed jobs kept. From 2: the
# running jobs' leases go into `leases` as their workers last wrote them (a dead worker's job is found again).
_MIGRATE = """
local version = redis.call('GET', P .. ':schema')
if version == '%(version)s' then return 0 end
if version ~= '2' then
  for _, s in ipairs(STATES) do
    local k = skey(s)
    if redis.call('TYPE', k).ok == 'set' then
      local ids = redis.call('SMEMBERS', k)
      redis.call('DEL', k)
      for _, id in ipairs(ids) do
        local h = job(id)
        if h and h.deleted ~= '1' then redis.call('ZADD', k, h.seq, id) end
      end
    end
  end
  redis.call('DEL', P .. ':queued')
  for _, id in ipairs(redis.call('ZRANGE', P .. ':jobs', 0, -1)) do
    local h = job(id)
    if not h then
      redis.call('ZREM', P .. ':jobs', id)
    elseif h.deleted == '1' then
      unindex(id)
      redis.call('ZADD', P .. ':finished', clock(), id)
    elseif h.status == 'completed' and h.timings and h.timings ~= '' then
      local stages = {}
      for k, v in pairs(cjson.decode(h.timings)) do
        if type(v) == 'number' then stages[string.gsub(k, '_s$', '')] = v end
      end
      add_stages(stages)
    end
  end
end
for _, id in ipairs(redis.call('ZRANGE', skey('processing'), 0, -1)) do
  redis.call('ZADD', LEASES, tonumber(redis.call('HGET', jkey(id), 'lease_until') or '') or 0, id)
end
redis.call('SET', P .. ':schema', '%(version)s')
return 1
""" % {"version": SCHEMA_VERSION}


# ARGV: id, seconds json ({stage: s}), total, bucket label, cost ('' : none)
_USAGE = """
local id = ARGV[1]
local h = job(id)
if h then  -- a job re-run after a restart adds its runs up
  local merged = (h.gpu_seconds and h.gpu_seconds ~= '') and cjson.decode(h.gpu_seconds) or {}
  for stage, seconds in pairs(cjson.decode(ARGV[2])) do merged[stage] = (merged[stage] or 0) + seconds end
  redis.call('HSET', jkey(id), 'gpu_seconds', cjson.encode(merged))
  if ARGV[5] ~= '' then redis.call('HSET', jkey(id), 'cost_usd', (tonumber(h.cost_usd or '') or 0) + tonumber(ARGV[5])) end
end
redis.call('HINCRBYFLOAT', P .. ':usage', 'gpu_seconds', ARGV[3])
redis.call('HINCRBYFLOAT', P .. ':usage', 'runs', 1)
redis.call('HINCRBYFLOAT', P .. ':usage', 'le:' .. ARGV[4], 1)
if ARGV[5] ~= '' then redis.call('HINCRBYFLOAT', P .. ':usage', 'cost_usd', ARGV[5]) end
return 1
"""

# ARGV: limit, lease_s, owner. Returns the claimed deliveries (flat hashes).
_CLAIM_WEBHOOKS = """
local due, now = P .. ':webhooks:due', clock()
local lease_until = now + tonumber(ARGV[2])
local out = {}
for _, did in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  local k = P .. ':webhook:' .. did
  if redis.call('HGET', k, 'state') == 'pending' then
    redis.call('ZADD', due, lease_until, did)
    redis.call('HINCRBY', k, 'attempts', 1)
    redis.call('HSET', k, 'owner', ARGV[3], 'next_at', lease_until, 'updated_at', now)
    out[#out + 1] = redis.call('HGETALL', k)
  else
    redis.call('ZREM', due, did)
  end
end
return out
"""

# ARGV: id, owner, state, error, body, retry in (seconds). 1 when reported, 0 when the claim is not owner's.
_FINISH_WEBHOOK = """
local k, now = P .. ':webhook:' .. ARGV[1], clock()
local owner, state = unpack(redis.call('HMGET', k, 'owner', 'state'))
if owner ~= ARGV[2] or state ~= 'pending' then return 0 end
redis.call('HSET', k, 'state', ARGV[3], 'last_error', ARGV[4], 'updated_at', now)
if ARGV[5] ~= '' then redis.call('HSET', k, 'body', ARGV[5]) end
if ARGV[3] == 'pending' then
  local retry_at = now + tonumber(ARGV[6])
  redis.call('HSET', k, 'next_at', retry_at)
  redis.call('ZADD', P .. ':webhooks:due', retry_at, ARGV[1])
else
  redis.call('HSET', k, 'next_at', now)
  redis.call('ZREM', P .. ':webhooks:due', ARGV[1])
  redis.call('ZADD', P .. ':webhooks:done', now, ARGV[1])
end
return 1
"""

# Worker reports not refreshed for ARGV[1] seconds of the server's clock (workers re-report every 30 s while they
# run): each report is one JSON value with its updated_at; a report refreshed meanwhile stays (one step)
# Running jobs missing from `leases` get their hash's lease there: a worker of the previous version (schema 2)
# beside new ones takes jobs without indexing them, and a job of a worker that then dies would never be reclaimed.
# Run with each expiry (the API's minute); returns how many were added.
_INDEX_LEASES = """
local added = 0
for _, id in ipairs(redis.call('ZRANGE', skey('processing'), 0, -1)) do
  if not redis.call('ZSCORE', LEASES, id) then
    redis.call('ZADD', LEASES, tonumber(redis.call('HGET', jkey(id), 'lease_until') or '') or 0, id)
    added = added + 1
  end
end
return added
"""

_EXPIRE_WORKERS = """
local key, removed = P .. ':workers', 0
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(ARGV[1])
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local ok, info = pcall(cjson.decode, all[i + 1])
  if not ok or type(info) ~= 'table' or (tonumber(info['updated_at']) or 0) < cutoff then
    redis.call('HDEL', key, all[i])
    removed = removed + 1
  end
end
return removed
"""

# Finished deliveries a TTL after their last attempt. ARGV: ttl, limit. Returns how many were scanned.
_EXPIRE_WEBHOOKS = """
local done = P .. ':webhooks:done'
local ids = redis.call('ZRANGEBYSCORE', done, '-inf', clock() - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, did in ipairs(ids) do
  local k = P .. ':webhook:' .. did
  local job_id = redis.call('HGET', k, 'job_id')
  if job_id then redis.call('SREM', P .. ':webhooks:job:' .. job_id, did) end
  redis.call('DEL', k)
  redis.call('ZREM', done, did)
end
return #ids
"""

# One /jobs page, atomically (page and total from one instant, no record read twice). ARGV: index key, start,
# stop (-1: to the end), status ('' : any). Returns {total, ids scanned, id, status, progress, input_image, ...}.
_SUMMARIES = """
local ids = redis.call('ZRANGE', ARGV[1], ARGV[2], ARGV[3])
local out = {redis.call('ZCARD', ARGV[1]), #ids}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', jkey(id), 'status', 'progress', 'input_image', 'deleted')
  if f[1] and f[4] ~= '1' and (ARGV[4] == '' or f[1] == ARGV[4]) then
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = f[2] or ''
    out[#out + 1] = f[3] or ''
  end
end
return out
"""

_STATUSES = """
local out = {}
for _, id in ipairs(ARGV) do
  out[#out + 1] = redis.call('HGETALL', jkey(id))
  out[#out + 1] = redis.call('ZRANK', skey('queued'), id) or -1
end
return out
"""


def _pairs(flat) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisJobStore:
    """The JobStore protocol (jobs.protocol) on one Redis server."""

    EXPIRE_BATCH = 500  # jobs per expiry script, so Redis is never blocked for long
    notifies_changes = True  # every job change is published: wait_for_change wakes on it

    # A Redis that stops answering (a partition without a reset, a host frozen) must raise, not hang: a claim,
    # heartbeat or report blocked for ever stalls a worker slot, and its callers retry on errors. The longest
    # script (expiry, EXPIRE_BATCH jobs) takes milliseconds. Options in the URL (?socket_timeout=...) win.
    TIMEOUTS = dict(socket_timeout=10.0, socket_connect_timeout=5.0, socket_keepalive=True, health_check_interval=30)

    def __init__(self, url: str):
        import redis

        self.url = url
        self.r = redis.Redis.from_url(url, decode_responses=True, **self.TIMEOUTS)
        self.r.ping()
        try:
            self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._script = {name: self.r.register_script(_LIB + body) for name, body in (
            ("create", _CREATE), ("take", _TAKE), ("finish", _FINISH), ("finish_cancelled", _FINISH_CANCELLED),
            ("heartbeat", _HEARTBEAT), ("delete", _DELETE), ("cancel", _CANCEL), ("release", _RELEASE),
            ("expire", _EXPIRE), ("migrate", _MIGRATE), ("usage", _USAGE), ("claim_webhooks", _CLAIM_WEBHOOKS),
            ("finish_webhook", _FINISH_WEBHOOK), ("expire_webhooks", _EXPIRE_WEBHOOKS), ("summaries", _SUMMARIES),
            ("expire_workers", _EXPIRE_WORKERS), ("index_leases", _INDEX_LEASES),
            ("reclaim", _RECLAIM), ("take_head", _TAKE_HEAD),
            ("window", _WINDOW), ("take_pick", _TAKE_PICK), ("statuses", _STATUSES))}
        self._run("migrate")
        self._entry: dict[str, str] = {}  # job id -> stream entry id, for this process's running jobs
        self._orphans: dict[str, list] = {}

    def _run(self, name: str, *args):
        """One Lua script (EVALSHA, loaded on first use): the whole read-check-write runs atomically."""
        return self._script[name](keys=[], args=list(args))

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
        conv, fields = _DECODERS.get, Job.__dataclass_fields__  # /status decodes a hash per poll: one pass
        d = {k: None if v == "" else (f(v) if (f := conv(k)) else v) for k, v in h.items() if k in fields}
        d["timings"] = d.get("timings") or {}
        d["gpu_seconds"] = d.get("gpu_seconds") or {}
        d["cancel_requested"] = bool(d.get("cancel_requested"))
        d["deleted"] = bool(d.get("deleted"))
        return Job(**d)

    # ------------------------------------------------------------------ API side
    def create(self, params: dict, input_image: str | None = None, idempotency_key: str | None = None,
               job_id: str | None = None, queue_max: int | None = None, webhook: str | None = None,
               webhook_events: tuple[str, ...] = ()) -> tuple[Job, bool]:
        job_id = job_id or str(uuid.uuid4())
        fields = self._encode({"id": job_id, "status": "queued", "params": params, "progress": 0.0,
                               "input_image": input_image, "created_at": time.time(), "attempts": 0,
                               "idempotency_key": idempotency_key, "cancel_requested": False, "deleted": False,
                               "webhook": webhook or None,
                               "webhook_events": ",".join(webhook_events) if webhook else None})
        code, flat = self._run("create", job_id, json.dumps(fields), -1 if queue_max is None else queue_max,
                               idempotency_key or "")
        if int(code) == -1:
            raise QueueFull(self.r.zcard(QUEUED))
        return self._decode(_pairs(flat)), int(code) == 1

    def get(self, job_id: str, include_deleted: bool = False) -> Job | None:
        job = self._decode(self.r.hgetall(_key(job_id)))
        if job is None or (job.deleted and not include_deleted):
            return None
        return job

    def get_by_idempotency_key(self, key: str) -> Job | None:
        job_id = self.r.get(f"{P}:idem:{key}")
        return self.get(job_id) if job_id else None

    def list(self, status: str | None = None, limit: int | None = None, offset: int = 0) -> tuple[list[Job], int]:
        """ZRANGE of the page on the state's (or all jobs') index, then the page's hashes; total is ZCARD."""
        index = _state_key(status) if status else JOBS
        if limit is not None and limit <= 0:
            return [], self.r.zcard(index)
        pipe = self.r.pipeline(transaction=True)  # page and total from one instant
        pipe.zrange(index, offset, -1 if limit is None else offset + limit - 1)
        pipe.zcard(index)
        ids, total = pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(_key(i))
        # a job deleted or moved on between the two round trips is left out of this page
        jobs = [j for j in map(self._decode, pipe.execute())
                if j is not None and not j.deleted and (not status or j.status == status)]
        return jobs, total

    SUMMARY_CHUNK = 1000  # ids per summaries script: a listing of every job never blocks Redis for long

    def summaries(self, status: str | None = None, limit: int | None = None,
                  offset: int = 0) -> tuple[list[tuple[str, str, float, str | None]], int]:
        """list() for the /jobs listing: (id, status, progress, input_image) rows, HMGET of those fields only,
        in one script (one round trip) per SUMMARY_CHUNK jobs."""
        index = _state_key(status) if status else JOBS
        if limit is not None and limit <= 0:
            return [], self.r.zcard(index)
        rows: list[tuple[str, str, float, str | None]] = []
        start, total = offset, 0
        while True:
            n = self.SUMMARY_CHUNK if limit is None else min(self.SUMMARY_CHUNK, offset + limit - start)
            total, scanned, *flat = self._run("summaries", index, start, start + n - 1, status or "")
            for i in range(0, len(flat), 4):
                rows.append((flat[i], flat[i + 1], float(flat[i + 2] or 0.0), flat[i + 3] or None))
            start += int(scanned)
            if int(scanned) < n or (limit is not None and start >= offset + limit):
                return rows, int(total)

    def queue_position(self, job: Job) -> int:
        rank = self.r.zrank(QUEUED, job.id)
        return 0 if rank is None else rank + 1

    def get_with_positions(self, job_ids: list[str]) -> list[tuple[Job | None, int | None]]:
        """The jobs and their queue positions (HGETALL and ZRANK each), all in one script call: one command to
        pack and one reply to parse, where a pipeline had two per job (most of /status's client-side cost)."""
        replies = self._run("statuses", *job_ids)
        out: list[tuple[Job | None, int | None]] = []
        for flat, rank in zip(replies[::2], replies[1::2], strict=True):
            job = self._decode(_pairs(flat))
            if job is None or job.deleted:
                out.append((None, None))
            else:
                out.append((job, (0 if rank < 0 else rank + 1) if job.status == "queued" else None))
        return out

    def counts(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=True)
        self._pipe_counts(pipe)
        return self._counts(pipe.execute())

    @staticmethod
    def _pipe_counts(pipe) -> None:
        for s in STATES:
            pipe.zcard(_state_key(s))

    @staticmethod
    def _counts(replies) -> dict[str, int]:
        return dict(zip(STATES, replies, strict=True))

    def stage_totals(self) -> dict[str, tuple[float, int]]:
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(STAGE_SECONDS)
        pipe.hgetall(STAGE_COUNT)
        return self._stage_totals(*pipe.execute())

    @staticmethod
    def _stage_totals(seconds: dict, count: dict) -> dict[str, tuple[float, int]]:
        return {stage: (float(seconds[stage]), int(count.get(stage, 0))) for stage in sorted(seconds)}

    def metrics_snapshot(self) -> dict:
        """What one /metrics scrape reads (counts, stage totals, workers, usage) in one MULTI: one round trip,
        one instant."""
        pipe = self.r.pipeline(transaction=True)
        self._pipe_counts(pipe)
        pipe.hgetall(STAGE_SECONDS)
        pipe.hgetall(STAGE_COUNT)
        pipe.time()
        pipe.hgetall(f"{P}:workers")
        pipe.hgetall(USAGE)
        *counts, seconds, count, now, workers, usage = pipe.execute()
        return {"counts": self._counts(counts), "stage_totals": self._stage_totals(seconds, count),
                "workers": self._workers(workers, self._seconds(now)), "usage_totals": self._usage(usage)}

    def wait_for_change(self, job_id: str, timeout: float) -> None:
        """Wake on the job's event channel (every script that changes the job publishes there)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(f"{P}:events:{job_id}")
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if pubsub.get_message(timeout=left) is not None:
                    return
        finally:
            pubsub.close()

    def delete(self, job_id: str) -> Job | None:
        flat = self._run("delete", job_id)
        return self._decode(_pairs(flat)) if flat else None

    def cancel(self, job_id: str) -> Job | None:
        flat = self._run("cancel", job_id)
        return self._decode(_pairs(flat)) if flat else None

    def expire(self, older_than_s: float) -> list[Job]:
        out: list[Job] = []
        while True:
            scanned, *removed = self._run("expire", older_than_s, self.EXPIRE_BATCH)
            out += [self._decode(_pairs(flat)) for flat in removed]
            if int(scanned) < self.EXPIRE_BATCH:
                break
        while int(self._run("expire_webhooks", older_than_s, self.EXPIRE_BATCH)) >= self.EXPIRE_BATCH:
            pass
        self._run("expire_workers", max(older_than_s, LIVE_REPORT_S))
        self._run("index_leases")
        return out

    # ------------------------------------------------------------------ worker side
    NEW_ENTRIES_PER_CLAIM = 16  # stream entries one claim reads past (jobs gone or taken out of order)
    RECLAIM_SCAN = 100  # expired leases one claim looks through (a worker without LoRA slots passes LoRA jobs by)

    def claim(self, worker_id: str, lease_s: float, device: str | None = None, loaded_key: str | None = None,
              affinity_skip: int = 0, affinity_wait_s: float = 60.0, serves_loras: bool = True) -> Job | None:
        """Our own previous life's jobs (found by release_orphans) first, then jobs whose lease ran out (their
        worker died: _RECLAIM); then, with LoRA affinity, the job pick_next chooses from the queue's head
        (_claim_pick); else the queue's head (_TAKE_HEAD, when the stream would not hand it out next) or new
        entries in stream order. Without LoRA slots (serves_loras False): no LoRA job is taken, and the queued job
        is the oldest without a set, picked from the queue (_claim_plain)."""
        orphans = self._orphans.pop(worker_id, [])
        if not serves_loras:  # left pending: once their lease runs out, a worker with slots takes them over
            orphans = [(e, f) for e, f in orphans if not self._has_loras((f or {}).get("id"))]
        job = self._take_first(orphans, worker_id, lease_s, device) or self._taken(self._run(
            "reclaim", worker_id, device or "", lease_s, MAX_ATTEMPTS, int(serves_loras), self.RECLAIM_SCAN))
        if job is not None:
            return job
        if not serves_loras:
            window = self._run("window", CAPABLE_WINDOW)
            if any(self._params_have_loras(w[1]) for w in window):  # else the stream's order, as any worker
                return self._claim_plain(worker_id, lease_s, device, window)
        if loaded_key is not None and affinity_skip > 0:
            job = self._claim_pick(worker_id, lease_s, device, loaded_key, affinity_skip, affinity_wait_s)
            if job is not None:
                return job
        job = self._taken(self._run("take_head", worker_id, device or "", lease_s, MAX_ATTEMPTS, int(serves_loras)))
        if job is not None:
            return job
        for _ in range(self.NEW_ENTRIES_PER_CLAIM):
            new = [m for _, msgs in self.r.xreadgroup(GROUP, worker_id, {STREAM: ">"}, count=1) for m in msgs]
            if not new:
                return None
            # the entry of a job this process took out of order and still runs: not a new job (take would see
            # our own worker id and take it again)
            new = [(e, f) for e, f in new if self._entry.get((f or {}).get("id")) != e]
            if not serves_loras:  # a LoRA job queued since the window was read: its entry stays pending, and
                # a worker with slots takes it when it reaches the queue's head (_TAKE_HEAD)
                new = [(e, f) for e, f in new if not self._has_loras((f or {}).get("id"))]
            job = self._take_first(new, worker_id, lease_s, device)
            if job is not None:
                return job
        return None

    def _take_first(self, candidates: list, worker_id: str, lease_s: float, device: str | None) -> Job | None:
        for entry_id, fields in candidates:
            job_id = (fields or {}).get("id")
            result = self._run("take", job_id, worker_id, device or "", lease_s, MAX_ATTEMPTS) if job_id else "gone"
            if result == "busy":  # a live worker took it first: not ours to drop
                continue
            if result != "ok":  # deleted, already finished, cancelled or failed too often: drop the entry
                self._ack(entry_id)
                continue
            self._entry[job_id] = entry_id
            return self.get(job_id, include_deleted=True)
        return None

    def _taken(self, reply: list) -> Job | None:
        """The job a script took with its stream entry ({take's result, id, entry}), or None."""
        result, job_id, entry = reply
        if result != "ok":
            return None
        if entry:
            self._entry[job_id] = entry
        return self.get(job_id, include_deleted=True)

    def _claim_pick(self, worker_id: str, lease_s: float, device: str | None, loaded_key: str, skip: int,
                    wait_s: float) -> Job | None:
        """The queued job pick_next chooses (store.affinity_window of the zset's head). None: the choice is the
        head (the caller reads the stream in order), or as _pick."""

        def choose(raw: list) -> tuple[str, str, list[str]] | None:
            window = affinity_window([{"id": i, "params": json.loads(params) if params else {},
                                       "created_at": float(created) if created else 0.0, "passed_over": int(passed),
                                       "entry": entry} for i, params, created, passed, entry in raw], skip)
            # created_at is the Redis clock's (_CREATE): so is the wait, whatever this host's clock says
            chosen = pick_next(window, loaded_key, skip, wait_s, self._seconds(self.r.time()))
            if chosen is None or chosen is window[0]:
                return None
            return chosen["id"], chosen["entry"], [w["id"] for w in window[: window.index(chosen)]]

        return self._pick(worker_id, lease_s, device, skip + 1, skip, choose)

    @staticmethod
    def _params_have_loras(params: str | None) -> bool:
        return bool(params and (json.loads(params) or {}).get("loras"))

    def _has_loras(self, job_id: str | None) -> bool:
        return self._params_have_loras(self.r.hget(_key(job_id), "params") if job_id else None)

    def _claim_plain(self, worker_id: str, lease_s: float, device: str | None, window: list) -> Job | None:
        """A worker without LoRA slots, with LoRA jobs near the queue's head: the oldest queued job without a
        set among the first CAPABLE_WINDOW (`window`, _WINDOW's reply), its passes over LoRA jobs not counted
        against their affinity bound (skip -1)."""

        def choose(raw: list) -> tuple[str, str, list[str]] | None:
            for i, (job_id, params, _, _, entry) in enumerate(raw):
                if not self._params_have_loras(params):
                    return job_id, entry, [w[0] for w in raw[:i]]
            return None

        return self._pick(worker_id, lease_s, device, CAPABLE_WINDOW, -1, choose, window)

    def _pick(self, worker_id: str, lease_s: float, device: str | None, size: int, skip: int, choose,
              window: list | None = None, tries: int = 5) -> Job | None:
        """A job `choose(window)` picks out of stream order from the queue's first `size` (_WINDOW; `window`: a
        reply already read) as (id, entry, ids passed over), taken by _TAKE_PICK, which re-checks that the queue
        still starts with the passed jobs (else the window is read again). None: nothing chosen, the job predates
        stored entries, or the queue kept moving under us."""
        for attempt in range(tries):
            if window is None or attempt:
                window = self._run("window", size)
            picked = choose(window)
            if picked is None or not picked[1]:
                return None
            job_id, _, passed = picked
            result, entry = self._run("take_pick", job_id, worker_id, device or "", lease_s, MAX_ATTEMPTS, skip, *passed)
            if result == "ok":
                self._entry[job_id] = entry
                return self.get(job_id, include_deleted=True)
            if result in ("gone", "cancelled", "poison"):  # its entry has nothing left to run
                self._ack(entry)
            elif result == "no_entry":
                return None
        return None

    def _ack(self, entry_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.xack(STREAM, GROUP, entry_id)
        pipe.xdel(STREAM, entry_id)
        pipe.execute()

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, progress: float | None = None,
                  stage: str | None = None) -> bool:
        ok = int(self._run("heartbeat", job_id, worker_id, lease_s, "" if progress is None else progress, stage or ""))
        entry = self._entry.get(job_id)
        if ok and entry:  # still ours: reset the entry's idle time too (XPENDING shows live workers)
            self.r.xclaim(STREAM, GROUP, worker_id, 0, [entry], justid=True)
        return bool(ok)

    def _done_with(self, job_id: str) -> None:
        """Ack this process's stream entry for a job it has finished with (only then: an entry another
        worker took over must stay pending for it)."""
        entry = self._entry.pop(job_id, None)
        if entry:
            self._ack(entry)

    def _end(self, job_id: str, worker_id: str, status: str, fields: dict, stages: dict) -> bool:
        ok = int(self._run("finish", job_id, worker_id, status, json.dumps(self._encode(fields)), json.dumps(stages)))
        if ok:
            self._done_with(job_id)
        return bool(ok)

    def complete(self, job_id: str, worker_id: str, video_path: str, timings: dict, params: dict | None = None) -> bool:
        return self._end(job_id, worker_id, "completed", {"progress": 100.0, "stage": "done", "video_path": video_path,
                                                          "timings": timings, **({"params": params} if params else {})},
                         stage_seconds(timings))

    def fail(self, job_id: str, worker_id: str, error: str, error_type: str, retryable: bool, timings: dict | None = None) -> bool:
        return self._end(job_id, worker_id, "error", {"error": error, "error_type": error_type, "retryable": retryable,
                                                      "timings": timings or {}}, {})

    def finish_cancelled(self, job_id: str, worker_id: str) -> Job | None:
        flat = self._run("finish_cancelled", job_id, worker_id)
        if not flat:
            self._entry.pop(job_id, None)
            return None
        self._done_with(job_id)
        return self._decode(_pairs(flat))

    def release(self, job_id: str, worker_id: str) -> bool:
        """Back to the queue now (graceful shutdown), without counting an attempt."""
        ok = int(self._run("release", job_id, worker_id))
        if ok:
            self._done_with(job_id)  # the script queued a new entry (and dropped the one the job had)
        return bool(ok)

    # Workers and API processes run on several hosts: a report's time is the Redis server's (TIME), and its age
    # is measured against that clock too, so hosts' clock skew never makes a live worker look gone.
    @staticmethod
    def _seconds(time_reply) -> float:
        """Redis TIME's (seconds, microseconds) as seconds."""
        sec, usec = time_reply
        return float(sec) + float(usec) / 1e6

    def report_worker(self, worker_id: str, info: dict) -> None:
        self.r.hset(f"{P}:workers", worker_id, json.dumps({**info, "updated_at": self._seconds(self.r.time())}))

    def workers(self) -> list[dict]:
        pipe = self.r.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(f"{P}:workers")
        now, h = pipe.execute()
        return self._workers(h, self._seconds(now))

    @staticmethod
    def _workers(h: dict, now: float) -> list[dict]:
        out = []
        for k, v in sorted(h.items()):
            report = {"id": k, **json.loads(v)}
            report["age_s"] = max(0.0, now - float(report.get("updated_at") or 0))
            out.append(report)
        return out

    def release_orphans(self, worker_id: str) -> int:
        """At worker start: entries still pending for this consumer belong to its previous, dead, life;
        the next claims take them first (same stream entry, so queue order is kept)."""
        own = [m for _, msgs in self.r.xreadgroup(GROUP, worker_id, {STREAM: "0"}, count=100) for m in msgs]
        for entry_id, fields in own:
            if not fields:  # deleted from the stream while pending
                self._ack(entry_id)
        self._orphans[worker_id] = [m for m in own if m[1]]
        return len(self._orphans[worker_id])

    # ------------------------------------------------------------------ usage (GPU-seconds, cost)
    def add_usage(self, job_id: str, seconds: dict[str, float], cost_usd: float | None = None) -> None:
        total = float(sum(seconds.values()))
        self._run("usage", job_id, json.dumps({k: float(v) for k, v in seconds.items()}), total, usage_bucket(total),
                  "" if cost_usd is None else cost_usd)

    def usage_totals(self) -> dict:
        return self._usage(self.r.hgetall(USAGE))

    @staticmethod
    def _usage(h: dict) -> dict:
        return usage_summary({k: float(v) for k, v in h.items()})

    # ------------------------------------------------------------------ webhook deliveries (API side)
    def claim_webhooks(self, owner: str, limit: int, lease_s: float) -> list[WebhookDelivery]:
        flats = self._run("claim_webhooks", limit, lease_s, owner)
        return [WebhookDelivery.from_mapping(_pairs(f)) for f in flats]

    def finish_webhook(self, delivery_id: str, owner: str, state: str, error: str | None = None,
                       body: str | None = None, retry_at: float | None = None) -> bool:
        # retry_at is on this host's clock: the script makes it the same delay on the server's
        delay = 0.0 if retry_at is None else retry_at - time.time()
        return bool(int(self._run("finish_webhook", delivery_id, owner, state, error or "", body or "", delay)))

    def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        ids = self.r.smembers(f"{P}:webhooks:job:{job_id}")
        pipe = self.r.pipeline(transaction=False)
        for did in ids:
            pipe.hgetall(f"{P}:webhook:{did}")
        found = [WebhookDelivery.from_mapping(h) for h in pipe.execute() if h]
        return sorted(found, key=lambda d: (d.created_at, d.id))

    def close(self) -> None:
        self.r.close()

"""The one interface of a job store, implemented by SqliteJobStore (jobs.store) and RedisJobStore (jobs.redis_queue).

Contract shared by both (tests/test_store.py runs one suite on each):
- Every read-then-write is atomic (one SQLite IMMEDIATE transaction or one Redis Lua script).
- Deleted jobs are hidden at once: get/list/counts never show them; a running one is only asked to stop.
- Reads the API serves per request (list, summaries, counts, queue_position, get_with_positions, stage_totals,
  usage_totals, metrics_snapshot) cost in proportion to the page asked for (or the queue position), or constant
  time, never to the number of jobs kept.
- A job created with a webhook gets a delivery queued, in the same atomic step, for each of its events:
  'progress' when it starts and each time a heartbeat's progress passes another 10 %, and 'completed',
  'error' or 'cancelled' when it ends (a deleted job sends nothing). API processes claim due deliveries
  (claim_webhooks: one attempt each, under a lease) and report each attempt (finish_webhook).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from wanrt.jobs.store import Job, WebhookDelivery


@runtime_checkable
class JobStore(Protocol):
    notifies_changes: bool  # True when wait_for_change wakes on a change (else it only sleeps: poll instead)

    # ------------------------------------------------------------------ API side
    def create(self, params: dict, input_image: str | None = None, idempotency_key: str | None = None,
               job_id: str | None = None, queue_max: int | None = None, webhook: str | None = None,
               webhook_events: tuple[str, ...] = ()) -> tuple[Job, bool]:
        """Queue a job: (job, True); an Idempotency-Key already in use gives (its job, False); QueueFull past
        queue_max. With `webhook` (a URL the API has checked), `webhook_events` are the events sent to it."""
        ...

    def get(self, job_id: str, include_deleted: bool = False) -> Job | None:
        """The job, or None (deleted jobs too, unless include_deleted)."""
        ...

    def get_by_idempotency_key(self, key: str) -> Job | None:
        """The live job created with this Idempotency-Key, or None."""
        ...

    def list(self, status: str | None = None, limit: int | None = None, offset: int = 0) -> tuple[list[Job], int]:
        """One page of jobs in creation order (all when limit is None) and the total matching, without deleted ones."""
        ...

    def summaries(self, status: str | None = None, limit: int | None = None,
                  offset: int = 0) -> tuple[list[tuple[str, str, float, str | None]], int]:
        """list() as the /jobs listing needs it: (id, status, progress, input_image) per job, in creation order,
        and the total matching; only those fields are read (no whole records decoded)."""
        ...

    def queue_position(self, job: Job) -> int:
        """1 = next to run (meaningful for a queued job)."""
        ...

    def get_with_positions(self, job_ids: list[str]) -> list[tuple[Job | None, int | None]]:
        """What /status reads, for several jobs at once (Redis: one round trip for all): per id, (the job or None
        when unknown or deleted, its queue_position when it is queued, else None)."""
        ...

    def metrics_snapshot(self) -> dict:
        """What one /metrics scrape reads, in one go (SQLite: one read snapshot; Redis: one MULTI round trip):
        {"counts": counts(), "stage_totals": stage_totals(), "workers": workers(), "usage_totals": usage_totals()}."""
        ...

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state in STATES), deleted ones excluded; constant time."""
        ...

    def stage_totals(self) -> dict[str, tuple[float, int]]:
        """Per pipeline stage ('_s' stripped from the timing key): (sum of seconds, count) over every job ever
        completed, expired ones included (a Prometheus summary); kept up to date by complete, constant time."""
        ...

    def delete(self, job_id: str) -> Job | None:
        """Hide the job now and return it as it was (None if unknown). A running job is asked to cancel and its
        worker removes it (finish_cancelled); any other is removed now and the caller deletes its files."""
        ...

    def cancel(self, job_id: str) -> Job | None:
        """Queued -> cancelled now; processing -> cancel_requested (its worker stops). Returns the job after."""
        ...

    def expire(self, older_than_s: float) -> list[Job]:
        """Remove finished jobs older than the TTL (and deleted jobs whose worker died that long ago); returns
        them so the caller deletes their files. Worker reports not refreshed for the TTL (at least
        lora_request.LIVE_REPORT_S) go too."""
        ...

    def wait_for_change(self, job_id: str, timeout: float) -> None:
        """Block (in a worker thread) until the job may have changed or timeout seconds passed. Redis wakes on
        the job's pub/sub channel (every state change and progress update publishes); SQLite has no cross-process
        notification and just sleeps for timeout, so the caller backs off (0.25 s to 2 s). A change made just
        before the call is not seen: callers re-read the job after each wait."""
        ...

    # ------------------------------------------------------------------ worker side
    def claim(self, worker_id: str, lease_s: float, device: str | None = None, loaded_key: str | None = None,
              affinity_skip: int = 0, affinity_wait_s: float = 60.0, serves_loras: bool = True) -> Job | None:
        """Take the oldest queued job, or one whose worker's lease ran out (up to MAX_ATTEMPTS), or None.

        serves_loras False (a worker without LoRA slots): jobs with a LoRA set are left for the workers that have
        them, never taken (they would fail there); the oldest job without one among the first CAPABLE_WINDOW
        queued is taken instead, and nothing counts as passed over.

        LoRA affinity: with `loaded_key` (lora_request.request_key of the set the worker has loaded) and
        affinity_skip > 0, the queued job taken is the one lora_request.pick_next chooses (with `now`) from the
        window store.affinity_window makes of the oldest affinity_skip + 1 queued jobs: the first whose set is
        loaded or that has waited affinity_wait_s, else the oldest. Atomic like every claim (two workers never
        take one job); one claim passes over at most affinity_skip jobs and no job is passed over more than
        affinity_skip times. loaded_key None or affinity_skip 0: plain FIFO."""
        ...

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, progress: float | None = None,
                  stage: str | None = None) -> bool:
        """Extend the lease and record progress; False = stop (cancel asked, deleted, or no longer ours)."""
        ...

    def complete(self, job_id: str, worker_id: str, video_path: str, timings: dict, params: dict | None = None) -> bool:
        """processing -> completed. False when the job is no longer ours or was deleted/asked to cancel
        meanwhile: the worker then takes the cancel path (finish_cancelled), so no hidden job is left."""
        ...

    def fail(self, job_id: str, worker_id: str, error: str, error_type: str, retryable: bool,
             timings: dict | None = None) -> bool:
        """processing -> error. False in the same cases as complete (then finish_cancelled)."""
        ...

    def finish_cancelled(self, job_id: str, worker_id: str) -> Job | None:
        """The worker stopped a job it owns: a deleted job is removed, any other ends as 'cancelled'. Returns
        the job as it was before (job.deleted: remove its input file too), or None when it was not ours."""
        ...

    def release(self, job_id: str, worker_id: str) -> bool:
        """Re-queue a job this worker owns (graceful shutdown) without counting an attempt. False when not ours,
        or deleted/asked to cancel meanwhile (then finish_cancelled instead)."""
        ...

    def release_orphans(self, worker_id: str) -> int:
        """At worker start: hand back jobs a previous life of this worker id left; returns how many."""
        ...

    def report_worker(self, worker_id: str, info: dict) -> None:
        """Record what a worker runs, for /metrics and /debug/workers."""
        ...

    def workers(self) -> list[dict]:
        """Every worker's last report (with id, updated_at and age_s: its age on the store's clock, which hosts'
        clock skew cannot bend), sorted by id."""
        ...

    def add_usage(self, job_id: str, seconds: dict[str, float], cost_usd: float | None = None) -> None:
        """One run of a job held a device for `seconds` ({stage: s}) costing cost_usd: added to the job's
        gpu_seconds and cost_usd (a job re-run after a restart sums its runs), to the GPU-seconds counter and
        to the per-run histogram (store.GPU_SECONDS_BUCKETS)."""
        ...

    def usage_totals(self) -> dict:
        """{gpu_seconds, cost_usd, runs, buckets: {le: cumulative runs}} over every run ever recorded; constant time."""
        ...

    # ------------------------------------------------------------------ webhook deliveries (API side)
    def claim_webhooks(self, owner: str, limit: int, lease_s: float) -> list[WebhookDelivery]:
        """Atomically take up to `limit` due deliveries for one attempt each (attempts + 1, owner set, hidden
        from other claimers for lease_s). A claimer that dies leaves them due again when the lease ends."""
        ...

    def finish_webhook(self, delivery_id: str, owner: str, state: str, error: str | None = None,
                       body: str | None = None, retry_at: float | None = None) -> bool:
        """Report the attempt `owner` claimed: state 'pending' (due again at retry_at), or a final 'delivered',
        'failed' or 'dropped'; `body` keeps the bytes sent so retries send the same. False when not owner's."""
        ...

    def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """The job's deliveries, oldest first (for /debug/job and tests)."""
        ...

    def close(self) -> None:
        """Release this process's connections."""
        ...

"""The seed's endpoints and our extensions. Thin: parse, call the job store off the event loop, shape the answer.

Dependencies (`store`, `settings`, `paths`, `limits`) are injected by the app; domain errors (ParamError,
FetchError, QueueFull, JobNotFound, Busy) become HTTP answers in `api/errors.py`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
from litestar import MediaType, Request, Response, delete, get, post, route
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, HTTPException, NotFoundException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, Stream
from litestar.response.base import ASGIResponse

from wanrt.api.errors import Busy, ClientGone, JobNotFound
from wanrt.api.fetch import (
    FetchError,
    FetchPolicy,
    _allowed_by_config,
    _literal_ip,
    decode_image,
    fetch_bytes,
    resolve_all,
)
from wanrt.api.schemas import (
    WEBHOOK_FIELDS,
    GenerateRequest,
    GenerateResponse,
    MessageResponse,
    field_error,
    request_fields,
)
from wanrt.jobs.paths import DataPaths
from wanrt.jobs.protocol import JobStore
from wanrt.jobs.store import STATES, TERMINAL, Job, QueueFull, WebhookDelivery
from wanrt.jobs.webhooks import Target, WebhookRefused, parse_events, split_url
from wanrt.lora_request import (
    LIVE_REPORT_S,
    live_workers,
    parse_loras,
    published_loras,
    rank_problem,
    report_age,
    serves_loras,
)
from wanrt.params import FIELDS_BY_NAME, GenerateParams, ParamError

log = logging.getLogger("wanrt.api")
API_TITLE = "WAN 2.2-14B LoRAs Image-to-Video API"
OPEN = {"open": True}
MAX_OFFSET = 2**53  # larger offsets overflow SQLite's integers; no store holds that many jobs


# Store reads and small file calls run in a few threads of their own: off the event loop, so one slow disk or
# Redis round-trip stalls nobody, and cheaper per call than anyio's 40-thread pool (fewer threads contend for
# the GIL: about 1.3x the requests/s on /status with 64 clients on 2 cores).
_STORE_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="wanrt-store")


def run(fn, *args, **kwargs):
    """Blocking store or file work in a store thread; awaitable."""
    return asyncio.get_running_loop().run_in_executor(_STORE_THREADS, partial(fn, *args, **kwargs))


_batches: dict[tuple, list[tuple[Any, asyncio.Future]]] = {}


def run_batched(many, shared: tuple, item):
    """`many(*shared, items)` (one result per item, in order) in a store thread, once for every call with the
    same `many` and `shared` made in this turn of the event loop: under load, concurrent requests share one
    thread hop (and, on Redis, one script call) instead of one each. Nothing waits for a batch to
    fill: the batch goes at the loop's next turn, and several batches may be in flight at once (so a slow
    one holds up only its own requests). Awaitable."""
    loop = asyncio.get_running_loop()
    key = (loop, many, *shared)
    future = loop.create_future()
    batch = _batches.get(key)
    if batch is None:
        batch = _batches[key] = []
        loop.call_soon(_send_batch, key)
    batch.append((item, future))
    return future


def _send_batch(key: tuple) -> None:
    loop, many, *shared = key
    batch = _batches.pop(key)
    done = _STORE_THREADS.submit(many, *shared, [item for item, _ in batch])
    done.add_done_callback(lambda d: loop.call_soon_threadsafe(_answer_batch, batch, d))


def _answer_batch(batch: list[tuple[Any, asyncio.Future]], done) -> None:
    try:
        results = done.result()
        if len(results) != len(batch):
            raise RuntimeError(f"batched store read gave {len(results)} results for {len(batch)} calls")
    except BaseException as error:  # every caller gets the error: none is left waiting
        results, failed = None, error
    for i, (_, future) in enumerate(batch):
        if future.done():  # its request was cancelled (client gone)
            continue
        if results is None:
            future.set_exception(failed)
        else:
            future.set_result(results[i])


def _encode(body: Any) -> bytes:
    """JSON as Litestar writes a returned dict (msgspec), done where the body is built: in the store thread."""
    return msgspec.json.encode(body)


def _json_response(body: bytes) -> ASGIResponse:
    """An already encoded JSON body, as the ASGI response itself (a Response would be turned into one per request:
    headers, cookies and encoders resolved again, ~7 % of /status's requests/s). The hot read handlers (/status,
    /jobs, /metrics) take `request` and read the store from the app state instead of injected dependencies:
    Litestar validates every injected value against its annotation (a runtime Protocol isinstance for the store)
    and resolves two or more in an anyio task group, per request; together more than the store read itself.
    Their 200 schema is declared with `responses=JSON_OBJECT` (the return annotation no longer carries it)."""
    return ASGIResponse(body=body, media_type=MediaType.JSON)


JSON_OBJECT = {200: ResponseSpec(data_container=dict[str, Any], description="Request fulfilled, document follows",
                                 generate_examples=False)}


async def _get_job(store: JobStore, job_id: str) -> Job:
    job = await run(store.get, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


@lru_cache(maxsize=16384)  # /status shows the same few timestamps of a job on every poll
def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------ limits
@dataclass
class Limits:
    """Bounded resources of one API process: image fetches and decodes (threads and memory), event streams."""

    fetch_slots: int
    decode_slots: int
    sse_per_client: int
    sse_total: int
    sse_max_s: float
    fetches: threading.BoundedSemaphore = field(init=False)
    decodes: threading.BoundedSemaphore = field(init=False)
    streams: dict[str, int] = field(default_factory=dict)
    _waiters: anyio.CapacityLimiter | None = None

    def __post_init__(self):
        self.fetches = threading.BoundedSemaphore(self.fetch_slots)
        self.decodes = threading.BoundedSemaphore(self.decode_slots)

    @classmethod
    def from_settings(cls, s) -> "Limits":
        return cls(s.fetch_concurrency, s.decode_concurrency, s.sse_per_client, s.sse_total, s.sse_max_s)

    def waiters(self) -> anyio.CapacityLimiter:
        """Threads for the event streams' waits, apart from the pool that serves requests (made in the loop)."""
        if self._waiters is None:
            self._waiters = anyio.CapacityLimiter(self.sse_total)
        return self._waiters

    def open_stream(self, client: str) -> None:
        """One more event stream for `client`, or Busy (429). Only the event loop thread calls this."""
        if sum(self.streams.values()) >= self.sse_total:
            raise Busy(f"Too many event streams open ({self.sse_total}); poll /status instead", 429)
        if self.streams.get(client, 0) >= self.sse_per_client:
            raise Busy(f"Too many event streams from this client ({self.sse_per_client}); poll /status instead", 429)
        self.streams[client] = self.streams.get(client, 0) + 1

    def close_stream(self, client: str) -> None:
        left = self.streams.get(client, 1) - 1
        if left > 0:
            self.streams[client] = left
        else:
            self.streams.pop(client, None)


# What handlers are given (app.py provides them): the job store, the data paths, the limits, the settings.
Store = NamedDependency[JobStore]
Paths = NamedDependency[DataPaths]
Limited = NamedDependency[Limits]
Config = NamedDependency[Any]


def get_image(limits: Limits, policy: FetchPolicy, image_url: str | None, upload: bytes | None):
    """Fetch (or take the upload) and decode, in the calling thread. The caller holds a fetch slot; decodes
    take one of fewer slots, as each can briefly cost hundreds of MB."""
    data, source = (upload, "upload") if upload is not None else fetch_bytes(image_url, policy)
    with limits.decodes:
        return decode_image(data, policy, source)


async def fetch_unless_gone(request: Request, limits: Limits, policy: FetchPolicy, image_url: str | None,
                            upload: bytes | None):
    """Run the fetch in a thread while watching the connection: a client that disconnects gets no job (a
    retrying client would otherwise make duplicates). Beyond `fetch_concurrency` fetches at once: 503."""
    if not limits.fetches.acquire(blocking=False):
        raise Busy(f"Too many image fetches in progress ({limits.fetch_slots}); retry later")
    # The slot passes to the thread when it starts; a request abandoned before that (the client gone while the
    # thread waited for the pool) gives it back here, or it would be lost for good (16 quick disconnects: 503s).
    handoff, started, abandoned = threading.Lock(), [False], [False]

    def work():
        with handoff:
            if abandoned[0]:
                return None
            started[0] = True
        try:
            return get_image(limits, policy, image_url, upload)
        finally:  # the slot is held until the thread ends, even when the request gave up on it
            limits.fetches.release()

    result: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        async def fetch():
            try:
                result["image"] = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            except Exception as e:  # re-raised below, outside the task group (no ExceptionGroup)
                result["error"] = e
            tg.cancel_scope.cancel()

        async def watch():  # the body is read: the next ASGI message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            result["gone"] = True
            tg.cancel_scope.cancel()

        tg.start_soon(fetch)
        tg.start_soon(watch)
    with handoff:
        if not started[0]:
            abandoned[0] = True
            limits.fetches.release()
    if "error" in result:
        raise result["error"]
    if "image" not in result:
        raise ClientGone()
    return result["image"]


# ------------------------------------------------------------------------------------------------ shapes
def _relative(paths: DataPaths, path: str | None) -> str | None:
    """The seed's video_path, relative to the data dir: clients never learn the server's layout."""
    if not path:
        return path
    return _relative_to(str(paths.root), path)


@lru_cache(maxsize=4096)  # pathlib parsing costs more than the rest of a /status body: once per video
def _relative_to(root: str, path: str) -> str:
    try:  # workers write absolute paths under the (resolved) data dir: no filesystem call needed
        return str(Path(path).relative_to(root))
    except ValueError:
        return Path(path).name


def job_status(job: Job, paths: DataPaths, queue_position: int | None = None) -> dict[str, Any]:
    """The seed's /status shapes, plus timestamps, parameters used, error_type/retryable, queue position, the
    live preview while processing and the GPU-seconds (and cost) used so far."""
    body: dict[str, Any] = {"status": job.status}
    if job.status == "queued":
        body.update(progress=0, queue_position=queue_position, input_image=job.input_image)
    elif job.status == "processing":
        body.update(progress=_progress(job.progress), stage=job.stage, input_image=job.input_image)
        preview = paths.preview_info(job.id)
        if preview is not None:  # ?step= changes with each step: a new URL for caches, a new body for /events
            body.update(preview_url=f"/preview/{job.id}?step={preview.get('step', 0)}",
                        preview_step=preview.get("step"), preview_steps=preview.get("steps"))
    elif job.status == "completed":
        body.update(progress=100, video_ready=True, download_url=f"/download/{job.id}",
                    video_path=_relative(paths, job.video_path), input_image=job.input_image)
    elif job.status in ("error", "cancelled"):
        body.update(error=job.error, error_type=job.error_type, retryable=job.retryable, input_image=job.input_image)
    params = {k: v for k, v in job.params.items() if k != IDEMPOTENCY_FINGERPRINT}
    body.update(job_id=job.id, created_at=_iso(job.created_at), started_at=_iso(job.started_at),
                finished_at=_iso(job.finished_at), params=params)
    if job.gpu_seconds:
        body.update(gpu_seconds=job.gpu_seconds_total,
                    gpu_seconds_by_stage={k: round(v, 6) for k, v in job.gpu_seconds.items()})
    if job.cost_usd is not None:
        body["cost_usd"] = round(job.cost_usd, 6)
    return body


def waiting_reason(job: Job, live: list[dict]) -> str | None:
    """Why a queued job cannot start now, where the live workers' reports (lora_request.live_workers) say (None
    when one can take it): none is live, or it asks for LoRAs and none has LoRA slots (those leave it queued)."""
    if not live:
        return (f"no worker has reported in the last {LIVE_REPORT_S:.0f} s: the job starts when one runs "
                f"(`wanrt worker` or `wanrt serve`)")
    if job.params.get("loras") and not any(serves_loras(w) for w in live):
        return ("no live worker serves LoRAs (each runs without --lora-dir / WANRT_LORA_DIR): the job starts when "
                "one that does runs")
    return None


_WORKERS_MAX_AGE_S = 1.0  # /status re-reads the workers' reports at most this often (per store)
_workers_read: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> (monotonic time, reports)


def _recent_workers(store: JobStore) -> list[dict] | None:
    """store.workers(), at most one read per _WORKERS_MAX_AGE_S (/status under load must not read it per batch);
    None when the store could not answer (then /status says nothing of waiting rather than fail)."""
    at, workers = _workers_read.get(store, (-1e9, None))
    if time.monotonic() - at > _WORKERS_MAX_AGE_S:
        _workers_read[store] = (time.monotonic(), workers)  # the other store threads keep the last read meanwhile
        try:
            workers = store.workers()
        except Exception as e:
            log.warning("/status: could not read the workers' reports (%s: %s)", type(e).__name__, e)
            workers = None
        _workers_read[store] = (time.monotonic(), workers)
    return workers


def status_bodies(store: JobStore, paths: DataPaths, job_ids: list[str]) -> list[dict[str, Any] | None]:
    """The /status bodies of several jobs (None for an unknown job): one store read for all and, when one is
    queued, the workers' reports (for `waiting`)."""
    found = store.get_with_positions(job_ids)
    workers = _recent_workers(store) if any(job is not None and job.status == "queued" for job, _ in found) else None
    live = None if workers is None else live_workers(workers, time.time())  # once for the batch
    out = []
    for job, position in found:
        body = None if job is None else job_status(job, paths, position)
        if body is not None and live is not None and job.status == "queued" and (why := waiting_reason(job, live)):
            body["waiting"] = why
        out.append(body)
    return out


def read_status(store: JobStore, paths: DataPaths, job_id: str) -> dict[str, Any] | None:
    """One job's /status body (None for an unknown job), read in one thread hop."""
    return status_bodies(store, paths, [job_id])[0]


def statuses_json(store: JobStore, paths: DataPaths, job_ids: list[str]) -> list[bytes | None]:
    """The /status bodies of several jobs, encoded: what run_batched sends for the /status calls of one turn."""
    return [None if body is None else _encode(body) for body in status_bodies(store, paths, job_ids)]


# ------------------------------------------------------------------------------------------------ seed
@route("/", http_method=["GET", "HEAD"], summary="Health check", opt=OPEN)
async def health() -> dict[str, str]:
    return {"message": API_TITLE, "status": "running"}


IDEMPOTENCY_FINGERPRINT = "request_fingerprint"  # kept in the job's params, never shown


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header ('' for any other scheme)."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _idempotency(request: Request, fields: dict, image: str | bytes) -> tuple[str | None, str]:
    """(the key as stored, scoped per API key when auth is on; a fingerprint of the request)."""
    key = request.headers.get("idempotency-key")
    body = json.dumps(fields, sort_keys=True).encode()
    image_id = hashlib.sha256(image if isinstance(image, bytes) else image.encode()).hexdigest()
    fingerprint = hashlib.sha256(body + b"\0" + image_id.encode()).hexdigest()
    if key is None:
        return None, fingerprint
    if not 0 < len(key) <= 255:
        raise HTTPException(status_code=400, detail="Idempotency-Key must be 1-255 characters")
    token = bearer_token(request.headers.get("authorization"))
    if request.app.state.settings.api_keys and token:
        key = f"{hashlib.sha256(token.encode()).hexdigest()[:16]}:{key}"
    return key, fingerprint


def webhook_check(settings):
    """The address rules of the image fetcher for a webhook target: every address the host resolves to must
    be public (or allowed by WANRT_ALLOW_HOSTS); plain http only when the host, or each of its addresses, is
    in the allow list. Returns the checked addresses (to connect to: no DNS rebinding); WebhookRefused else.
    Used at submit (422) and by the dispatcher before every attempt."""
    policy = FetchPolicy.from_settings(settings)

    def check(target: Target, deadline: float) -> list[str]:
        try:
            addresses = resolve_all(target.host, target.port, policy, deadline)
        except FetchError as e:
            raise WebhookRefused("webhook: " + str(e).removeprefix("Failed to download image: ")) from None
        if target.scheme == "http" and not (
                _allowed_by_config(target.host, _literal_ip(target.host), policy)
                or all(_allowed_by_config(target.host, _literal_ip(a.split("%")[0]), policy) for a in addresses)):
            raise WebhookRefused("webhook: plain http is only allowed for hosts in WANRT_ALLOW_HOSTS; use https")
        return addresses

    return check


def check_webhook(settings, url: str | None, events) -> tuple[str | None, tuple[str, ...]]:
    """(URL, events) of a request, checked (DNS included: call it in a thread); ParamError (422) when refused."""
    if url is None:
        if events is not None:
            raise ParamError("webhook_events", "webhook_events: needs a webhook URL")
        return None, ()
    if not settings.webhook_secret:
        raise ParamError("webhook", "webhook: webhooks are off on this server (it has no WANRT_WEBHOOK_SECRET to "
                                    "sign them with)")
    try:
        events = parse_events(events)
        target = split_url(url)
        webhook_check(settings)(target, time.monotonic() + min(10.0, settings.fetch_timeout_s))
    except WebhookRefused as e:
        raise ParamError("webhook", str(e)) from None
    return url.strip(), events


def webhook_body(store: JobStore, paths: DataPaths, delivery: WebhookDelivery) -> bytes | None:
    """What a delivery sends: the job's /status body (as at its first attempt) and the event; None when the
    job is gone."""
    job = store.get(delivery.job_id)
    if job is None:
        return None
    body = job_status(job, paths, store.queue_position(job) if job.status == "queued" else None)
    return json.dumps({**body, "event": delivery.event}, separators=(",", ":")).encode()


def _same_request(job: Job, fingerprint: str) -> Response[GenerateResponse]:
    if job.params.get(IDEMPOTENCY_FINGERPRINT) not in (None, fingerprint):
        raise HTTPException(status_code=422, detail="Idempotency-Key reused with a different request")
    return Response(GenerateResponse(job.id, job.status, "Job already exists for this Idempotency-Key"))


def request_over_capacity(workers: list[dict], params: GenerateParams) -> str | None:
    """The 422 detail when no worker's GPU can run this request under any memory tier (the capacity workers
    publish in their info, from runtime/memory.py; the API does not import the runtime, so the token count is
    repeated here); None when one can, or when no worker has published a limit."""
    # the live workers' (a dead one's report lingers: a bigger GPU since replaced must not keep the limit up);
    # with none live, the last reports of those that did not stop are the best guess of what will come back
    reporting = live_workers(workers, time.time()) or [w for w in workers if w.get("state") != "stopped"]
    limits = [w["memory"]["capacity"] for w in reporting if (w.get("memory") or {}).get("capacity")]
    if not limits or any(c.get("max_tokens") is None for c in limits):
        return None
    best = max(limits, key=lambda c: c["max_tokens"])
    tokens = ((params.frames_generated - 1) // 4 + 1) * (params.height // 16) * (params.width // 16)
    if tokens <= best["max_tokens"]:
        return None
    return (f"{params.width}x{params.height}x{params.frames} needs {tokens} latent tokens; the largest the workers' "
            f"GPUs run is {best['max_tokens']} (e.g. {best.get('largest_bucket')}): lower width, height or frames")


def lora_catalog(workers: list[dict]) -> tuple[list[dict], set[str] | None, bool]:
    """(GET /loras' listing, the names every live LoRA-serving worker serves (None: none has reported), whether
    live workers have reported at all), from the workers' reports (store.workers())."""
    now = time.time()
    listing, available = published_loras(workers, now)
    return listing, available, bool(live_workers(workers, now))


def request_loras(workers: list[dict], raw: Any) -> list[dict]:
    """A request's `loras`, checked against what the workers serve (422 naming the entry, or the ranks of a set
    past the workers' max_lora_rank). Before any worker has reported, names and ranks are not checked here: the
    worker refuses an unknown name (invalid_lora) and a set over its rank."""
    _, available, live = lora_catalog(workers)
    loras = parse_loras(raw, available)
    if loras and available is None and live:
        raise ParamError("loras", "loras: this server serves no LoRAs per request (its workers run without "
                                  "--lora-dir)")
    too_big = rank_problem(loras, workers, time.time()) if loras else None
    if too_big:
        raise ParamError("loras", too_big)
    return loras


async def submit_job(request: Request, store: JobStore, settings, paths: DataPaths, limits: Limits, fields: dict,
                     image_url: str | None = None, upload: bytes | None = None) -> Response[GenerateResponse]:
    """Validate, get the image (URL fetch or upload, same checks), write the input and the job, answer."""
    hook = {k: fields.pop(k) for k in WEBHOOK_FIELDS if k in fields}
    raw_loras = fields.pop("loras", None)
    params = GenerateParams.from_request(fields)
    workers = await run(store.workers)  # one read for the capacity and the LoRA checks
    too_big = request_over_capacity(workers, params)
    if too_big:
        raise HTTPException(status_code=422, detail=too_big)
    loras = request_loras(workers, raw_loras) if raw_loras is not None else []
    webhook, events = None, ()
    if hook:  # resolves the host (up to 10 s): anyio's threads, like the image fetch, not the store's few
        webhook, events = await anyio.to_thread.run_sync(
            partial(check_webhook, settings, hook.get("webhook"), hook.get("webhook_events")))
    signed = params.to_dict() | ({"webhook": webhook, "webhook_events": list(events)} if webhook else {}) \
        | ({"loras": loras} if loras else {})
    idem, fingerprint = _idempotency(request, signed, upload if upload is not None else image_url)
    if idem:
        existing = await run(store.get_by_idempotency_key, idem)
        if existing is not None:
            return _same_request(existing, fingerprint)
    queued = (await run(store.counts))["queued"]
    if queued >= settings.queue_max:
        raise QueueFull(queued)

    # Fetch and check the image before answering, as the seed does: a bad image is a 400 and no job.
    policy = FetchPolicy.from_settings(settings)
    if upload is not None and len(upload) > policy.max_bytes:
        raise HTTPException(status_code=413, detail=f"Image is larger than {policy.max_bytes} bytes")
    fetched = await fetch_unless_gone(request, limits, policy, image_url, upload)

    job_id = str(uuid.uuid4())
    input_path = paths.input_path(job_id, fetched.extension)
    await anyio.to_thread.run_sync(_write_durably, input_path, fetched.data)  # fsync: not in the store threads
    job_params = params.to_dict() | {"frames_generated": params.frames_generated, IDEMPOTENCY_FINGERPRINT: fingerprint} \
        | ({"loras": loras} if loras else {})
    try:
        job, created = await run(store.create, job_params, input_image=input_path.name, idempotency_key=idem,
                                 job_id=job_id, queue_max=settings.queue_max, webhook=webhook, webhook_events=events)
    except asyncio.CancelledError:  # the store's thread goes on and may still commit the job: keep its input
        raise
    except BaseException:
        input_path.unlink(missing_ok=True)
        raise
    if not created:  # a concurrent request with the same Idempotency-Key won
        input_path.unlink(missing_ok=True)
        return _same_request(job, fingerprint)
    return Response(GenerateResponse(job.id, "queued", "Image-to-video generation started"))


JSON_TYPES = ("application/json",)
_INT = re.compile(r"[+-]?[0-9]{1,30}")  # bounded: int() refuses over 4,300 digits (a 500), no range needs 30
_FLOAT = re.compile(r"[+-]?([0-9]{1,30}\.?[0-9]{0,30}|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?")


def _form_value(name: str, raw: str) -> Any:
    """A multipart field as the JSON body would carry it: numbers parsed strictly (no '1_0', no ' 5')."""
    spec = FIELDS_BY_NAME.get(name)
    if spec is None:
        return raw
    if (_INT if spec.kind is int else _FLOAT).fullmatch(raw) is None:
        raise HTTPException(status_code=422, detail=field_error(name, f"not a{'n integer' if spec.kind is int else ' number'}: {raw[:40]!r}"))
    return spec.kind(raw)


def decode_request(body: bytes) -> GenerateRequest:
    """A JSON body straight into GenerateRequest, as Litestar would (strict=False: "6" is 6), but without first
    building the whole body as Python objects: msgspec skips unknown fields unbuilt, where the generic decode
    made a 16 MB body of empty objects cost 400 MB and 0.4 s of the event loop. Errors read as Litestar's."""
    if not body.strip():
        raise HTTPException(status_code=400, detail="Invalid JSON body: the body is empty")
    try:
        return msgspec.json.decode(body, type=GenerateRequest, strict=False)
    except msgspec.ValidationError as e:  # "Expected `int`, got `str` - at `$.steps`"
        message, _, at = str(e).partition(" - at `$.")
        raise ValidationException(extra=[{"message": message, "key": at.rstrip("`") or "data"}]) from None
    except msgspec.DecodeError as e:
        reason = str(e).removeprefix("JSON is malformed: ")
        raise HTTPException(status_code=400, detail=f"Invalid JSON body: JSON is malformed: {reason}") from None
    except RecursionError:
        raise HTTPException(status_code=400, detail="Invalid JSON body: nested too deeply") from None


async def generate_body(request: Request) -> Response | None:
    """A before_request hook (it gets only the request; the dependencies come from the app's state, where
    app.py keeps what it provides). JSON is decoded here too (decode_request), so the typed handler below only
    documents the body (OpenAPI). Extension: multipart/form-data with an `image` file (or `image_url`) and the
    same fields as form values. Anything else is a 415: a text/plain or form-encoded POST is what a cross-site
    page can send without a CORS preflight."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    state = request.app.state
    if content_type in JSON_TYPES or content_type.endswith("+json"):
        data = decode_request(await request.body())
        return await submit_job(request, state.store, state.settings, state.paths, state.limits,
                                request_fields(data), image_url=data.image_url)
    if content_type != "multipart/form-data":
        raise HTTPException(status_code=415, detail="Send the request as application/json (or multipart/form-data "
                                                    f"with an 'image' file), not {content_type or 'no content type'}")
    try:
        form = await request.form()
    except (UnicodeDecodeError, LookupError):  # Litestar decodes every text field with its declared charset
        raise HTTPException(status_code=422, detail="multipart form fields must be UTF-8 text") from None
    except ClientException as e:  # Litestar 2 says 400 "Request Entity Too Large" for too many parts
        if e.detail != "Request Entity Too Large":
            raise
        raise HTTPException(status_code=413, detail=f"multipart body over its limits (at most "
                                                    f"{request.app.multipart_form_part_limit} parts)") from None
    upload, fields = None, {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            if key == "image":
                upload = await value.read()
        elif key == "webhook_events":  # repeated fields or one comma-separated value
            fields[key] = f"{fields[key]},{value}" if key in fields else value
        elif key == "loras":  # the JSON list, as one form value
            try:
                fields[key] = json.loads(value)
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past Python's limit
                raise HTTPException(status_code=422, detail="loras: not JSON: give a JSON list of {name, strength, "
                                                            "expert} objects") from None
        elif key in GenerateRequest.__struct_fields__:
            fields[key] = _form_value(key, value)
    image_url = fields.pop("image_url", None)
    if upload is None and not image_url:
        raise HTTPException(status_code=422, detail="image: upload a file in the 'image' field or give image_url")
    for required in ("prompt",):
        if not fields.get(required):
            raise HTTPException(status_code=422, detail=field_error(required, "field required"))
    return await submit_job(request, state.store, state.settings, state.paths, state.limits, fields,
                            image_url=image_url if upload is None else None, upload=upload)


@post("/generate", status_code=200, summary="Queue an image-to-video job", before_request=generate_body,
      description="JSON body as in the seed contract. Extension: multipart/form-data with an `image` file upload "
                  "(or `image_url`) and the same fields as form values.")
async def generate(data: JSONBody[GenerateRequest], request: Request, store: Store, settings: Config, paths: Paths,
                   limits: Limited) -> Response[GenerateResponse]:
    return await submit_job(request, store, settings, paths, limits, request_fields(data), image_url=data.image_url)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@get("/status/{job_id:str}", summary="Status of a job", responses=JSON_OBJECT)
async def status(job_id: FromPath[str], request: Request) -> ASGIResponse:
    state = request.app.state  # not injected: see _json_response
    body = await run_batched(statuses_json, (state.store, state.paths), job_id)
    if body is None:
        raise JobNotFound(job_id)
    return _json_response(body)


@route("/download/{job_id:str}", http_method=["GET", "HEAD"], summary="The MP4 (Range requests supported)")
async def download(job_id: FromPath[str], request: Request, store: Store) -> Response:
    job = await _get_job(store, job_id)
    if job.status != "completed" or not job.video_path:
        raise NotFoundException(detail=f"Video not ready (job status: {job.status})")
    path = Path(job.video_path)
    try:
        size = (await anyio.Path(path).stat()).st_size
    except FileNotFoundError:
        raise NotFoundException(detail="Video file is gone (expired or deleted)") from None
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{job.id}.mp4"'}
    start, end, status_code = 0, size - 1, 200
    wanted = parse_range(request.headers.get("range"), size)
    if wanted == UNSATISFIABLE:
        return Response(content={"detail": f"Range not satisfiable (file has {size} bytes)"}, status_code=416,
                        headers={"Content-Range": f"bytes */{size}"})
    if wanted is not None:
        (start, end), status_code = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)

    async def body():
        if request.method == "HEAD":  # headers only: do not read the file
            return
        async with await anyio.open_file(path, "rb") as fh:
            await fh.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = await fh.read(min(1 << 20, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    return Stream(body(), status_code=status_code, media_type="video/mp4", headers=headers)


UNSATISFIABLE = (-1, -1)
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")  # 19 digits: past any file; more is ignored (int() 500s)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """RFC 9110 §14.2: one `bytes=a-b`, `bytes=a-` or `bytes=-n` range with strict decimal numbers. A header
    with another unit, bad syntax or several ranges is ignored (None: the whole file); a well-formed range
    that does not overlap the file is UNSATISFIABLE (416)."""
    m = _RANGE.fullmatch((header or "").strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.groups()
    if first == "":  # suffix: the last n bytes
        n = int(last)
        return UNSATISFIABLE if n == 0 or size == 0 else (max(0, size - n), size - 1)
    start, end = int(first), int(last) if last else None
    if end is not None and end < start:
        return None  # invalid syntax per the RFC: ignore
    if start >= size:
        return UNSATISFIABLE
    end = size - 1 if end is None else end
    return start, min(end, size - 1)


@get("/preview/{job_id:str}", summary="The job's latest live preview: an animated WebP of the predicted video",
     description="Replaced after each denoising step (the step is in /status as preview_step); 404 before the "
                 "first step or with previews off. Not cached (Cache-Control: no-store).")
async def preview(job_id: FromPath[str], store: Store, paths: Paths) -> Response:
    await _get_job(store, job_id)
    no_store = {"Cache-Control": "no-store"}
    try:
        data = await anyio.Path(paths.preview_path(job_id)).read_bytes()  # replaced atomically: never half a file
    except FileNotFoundError:
        raise NotFoundException(detail="No preview yet (one appears after the first denoising step)",
                                headers=no_store) from None
    return Response(data, media_type="image/webp", headers=no_store)


def _progress(value: float) -> int | float:
    """45.2 as it is, a whole number as the seed writes it (100, not 100.0)."""
    value = round(float(value), 1)  # SQLite's RETURNING hands back an integral REAL as an int
    return int(value) if value.is_integer() else value


def jobs_json(store: JobStore, status: str | None, limit: int | None, offset: int) -> bytes:
    """The /jobs body, encoded: the listing's four columns only (store.summaries), no Job objects."""
    rows, total = store.summaries(status=status, limit=limit, offset=offset)
    body: dict[str, Any] = {"jobs": {job_id: {"status": st, "progress": _progress(progress), "input_image": image}
                                     for job_id, st, progress, image in rows}}
    if limit is not None or offset or status is not None:
        body.update(total=total, limit=limit, offset=offset)
    return _encode(body)


@get("/jobs", summary="List jobs (optional status filter and paging)", responses=JSON_OBJECT)
async def list_jobs(request: Request, status: FromQuery[str | None] = None,
                    limit: Annotated[int | None, QueryParameter(ge=1, le=1000)] = None,
                    offset: Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET)] = 0) -> ASGIResponse:
    if status is not None and status not in STATES:
        raise HTTPException(status_code=422, detail=f"status must be one of {', '.join(STATES)}")
    return _json_response(await run(jobs_json, request.app.state.store, status, limit, offset))


@delete("/jobs/{job_id:str}", status_code=200, summary="Delete a job (cancels it if running) and its files")
async def delete_job(job_id: FromPath[str], store: Store, paths: Paths) -> MessageResponse:
    job = await run(store.delete, job_id)
    if job is None:
        raise JobNotFound(job_id)
    if job.status != "processing":  # a running job's worker removes its own files when it stops
        await run(paths.remove_job_files, job.id, job.input_image)
    return MessageResponse("Job deleted")


@post("/jobs/{job_id:str}/cancel", status_code=200, summary="Cancel a job and keep its record",
      description="A queued job ends as `cancelled` at once; a running one is answered `processing` with "
                  "`cancel_requested: true` and ends as `cancelled` within one sampling step (its webhook event "
                  "`cancelled` then fires). Cancelling a cancelled job answers it again; a completed or failed "
                  "job is 409.", responses=JSON_OBJECT)
async def cancel_job(job_id: FromPath[str], store: Store, paths: Paths) -> dict[str, Any]:
    job = await run(store.cancel, job_id)
    if job is None:
        raise JobNotFound(job_id)
    if job.status in ("completed", "error"):
        raise HTTPException(status_code=409, detail=f"Job already finished (status: {job.status})")
    return job_status(job, paths) | ({"cancel_requested": True} if job.status == "processing" else {})


POLL_MIN_S, POLL_MAX_S, KEEPALIVE_S = 0.25, 2.0, 15.0


@get("/events/{job_id:str}", summary="Server-sent events: the job's /status body each time it changes",
     description="Event `status`: the /status body whenever it changes; event `preview`: {job_id, status, "
                 "progress, preview_url, step, steps} when a new live preview is written (once per denoising "
                 "step, as the poll sees them); event `gone`: the job was deleted.")
async def events(job_id: FromPath[str], request: Request, store: Store, paths: Paths, limits: Limited) -> Response:
    await _get_job(store, job_id)  # 404 before the stream starts
    client = request.client.host if request.client else "?"
    limits.open_stream(client)
    closed = []

    def close_once() -> None:  # from the stream's end, and as the response's background task: a client gone
        if not closed:         # before the stream's first step never runs the generator's finally
            closed.append(True)
            limits.close_stream(client)

    async def stream():
        """Wakes when the store says the job changed (Redis pub/sub) or polls with backoff (SQLite has no
        cross-process notification): 0.25 s after a change, doubling to 2 s while nothing moves."""
        last, wait, quiet, deadline = None, POLL_MIN_S, 0.0, time.monotonic() + limits.sse_max_s
        last_preview = None
        try:
            while time.monotonic() < deadline:
                status = await run(read_status, store, paths, job_id)
                if status is None:
                    yield {"event": "gone", "data": json.dumps({"detail": "Job not found"})}
                    return
                body = json.dumps(status)
                if body != last:
                    last, wait, quiet = body, POLL_MIN_S, 0.0
                    yield {"event": "status", "data": body}
                    if status.get("preview_url") and status["preview_url"] != last_preview:
                        last_preview = status["preview_url"]
                        yield {"event": "preview", "data": json.dumps({  # with status and progress, as every event
                            "job_id": job_id, "status": status["status"], "progress": status.get("progress"),
                            "preview_url": last_preview, "step": status.get("preview_step"),
                            "steps": status.get("preview_steps")})}
                    if status["status"] in TERMINAL:
                        return
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield {"comment": "keep-alive", "data": None}
                started = time.monotonic()
                if store.notifies_changes:  # Redis: a thread waits on pub/sub, from the streams' own pool
                    await anyio.to_thread.run_sync(store.wait_for_change, job_id, wait, limiter=limits.waiters())
                else:
                    await anyio.sleep(wait)
                quiet += time.monotonic() - started
                wait = min(POLL_MAX_S, wait * 2)
        finally:
            close_once()

    return ServerSentEvent(stream(), background=BackgroundTask(close_once))


# ------------------------------------------------------------------------------------------------ debug
@get("/debug/files", summary="Files in the data directory")
async def debug_files(paths: Paths) -> dict[str, Any]:
    def listing(folder: Path) -> list[dict[str, Any]]:
        out = []
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.is_file():
                st = p.stat()
                out.append({"name": p.name, "path": str(p), "bytes": st.st_size, "modified": _iso(st.st_mtime)})
        return out

    return {"data_dir": str(paths.root), "inputs": await run(listing, paths.inputs),
            "outputs": await run(listing, paths.outputs)}


@get("/debug/job/{job_id:str}", summary="The whole job record: timings per stage, worker, device, attempts")
async def debug_job(job_id: FromPath[str], store: Store, paths: Paths) -> dict[str, Any]:
    job = await _get_job(store, job_id)
    record = {k: v for k, v in job.__dict__.items() if k not in ("deleted",)}
    for k in ("created_at", "started_at", "finished_at", "lease_until"):
        record[k] = _iso(record[k])
    record["gpu_seconds_total"] = job.gpu_seconds_total
    deliveries = []
    for d in await run(store.webhook_deliveries, job_id):
        shown = {k: v for k, v in d.__dict__.items() if k not in ("body", "owner")}
        shown.update(body_bytes=len(d.body.encode()) if d.body else 0,
                     **{k: _iso(getattr(d, k)) for k in ("next_at", "created_at", "updated_at")})
        deliveries.append(shown)
    return {"job": record, "webhook_deliveries": deliveries,
            "status": await run(read_status, store, paths, job_id) or {}}


@get("/debug/workers", summary="Workers: device, backend (FP8, attention, compiled graphs), jobs done, last report")
async def debug_workers(store: Store) -> dict[str, Any]:
    workers = await run(store.workers)
    for w in workers:
        w["updated_at"] = _iso(w.get("updated_at"))
    return {"workers": workers}


@get("/debug/gpu", summary="NVML: memory, utilisation, temperature, power and clocks per GPU")
async def debug_gpu() -> dict[str, Any]:
    from wanrt.doctor import gpu_report

    return await run(gpu_report)


_GPU_REPORT_TTL_S = 1.0  # NVML is asked at most once a second, however often /metrics is scraped
_gpu_cache: list = [0.0, None]  # [monotonic time, report]
_gpu_lock = threading.Lock()


def gpu_report_cached() -> dict:
    """doctor.gpu_report (an NVML init, query and shutdown: ~0.2-0.3 ms even without a GPU), reused for
    _GPU_REPORT_TTL_S. Called in a store thread."""
    from wanrt.doctor import gpu_report

    with _gpu_lock:
        if _gpu_cache[1] is None or time.monotonic() - _gpu_cache[0] >= _GPU_REPORT_TTL_S:
            _gpu_cache[:] = [time.monotonic(), gpu_report()]
        return _gpu_cache[1]


def metrics_text(store: JobStore, dispatcher, started_at: float) -> str:
    """The whole /metrics page, built in a store thread from one store read (metrics_snapshot)."""
    snap = store.metrics_snapshot()
    counts, stages, workers, usage = snap["counts"], snap["stage_totals"], snap["workers"], snap["usage_totals"]
    gpu = gpu_report_cached()
    lines = ["# HELP wanrt_jobs Jobs by state.", "# TYPE wanrt_jobs gauge"]
    lines += [f'wanrt_jobs{{state="{s}"}} {n}' for s, n in counts.items()]
    lines += ["# HELP wanrt_queue_depth Jobs waiting to run.", "# TYPE wanrt_queue_depth gauge",
              f"wanrt_queue_depth {counts['queued']}"]
    lines += ["# HELP wanrt_stage_seconds Time per pipeline stage of completed jobs.",
              "# TYPE wanrt_stage_seconds summary"]
    for stage, (total, count) in sorted(stages.items()):
        stage = stage.removesuffix("_s")
        lines += [f'wanrt_stage_seconds_sum{{stage="{stage}"}} {total:.6f}',
                  f'wanrt_stage_seconds_count{{stage="{stage}"}} {count}']
    lines += ["# HELP wanrt_job_gpu_seconds Device seconds one run of a job held its GPU (the CPU on CPU runs), "
              "summed over its device stages.", "# TYPE wanrt_job_gpu_seconds histogram"]
    lines += [f'wanrt_job_gpu_seconds_bucket{{le="{le}"}} {n}' for le, n in usage["buckets"].items()]
    lines += [f"wanrt_job_gpu_seconds_sum {usage['gpu_seconds']:.6f}", f"wanrt_job_gpu_seconds_count {usage['runs']}",
              "# HELP wanrt_gpu_seconds_total GPU-seconds used by jobs (device seconds on CPU runs).",
              "# TYPE wanrt_gpu_seconds_total counter", f"wanrt_gpu_seconds_total {usage['gpu_seconds']:.6f}",
              "# HELP wanrt_job_cost_usd_total Cost of those GPU-seconds at WANRT_GPU_HOURLY_USD.",
              "# TYPE wanrt_job_cost_usd_total counter", f"wanrt_job_cost_usd_total {usage['cost_usd']:.6f}"]
    if dispatcher is not None:
        lines += ["# HELP wanrt_webhook_attempts_total Webhook attempts made by this API process, by outcome.",
                  "# TYPE wanrt_webhook_attempts_total counter",
                  f'wanrt_webhook_attempts_total{{outcome="delivered"}} {dispatcher.sent}',
                  f'wanrt_webhook_attempts_total{{outcome="failed"}} {dispatcher.failed}']
    now = time.time()
    live = live_workers(workers, now)
    lines += ["# HELP wanrt_workers_live Workers that reported in the last 120 s and have not stopped, by whether they "
              "have LoRA slots (0 with jobs queued: nothing will run them).", "# TYPE wanrt_workers_live gauge",
              f'wanrt_workers_live{{loras="yes"}} {sum(serves_loras(w) for w in live)}',
              f'wanrt_workers_live{{loras="no"}} {sum(not serves_loras(w) for w in live)}',
              "# HELP wanrt_worker_report_age_seconds Seconds since a worker's last report (re-sent every 30 s while "
              "it runs).", "# TYPE wanrt_worker_report_age_seconds gauge",
              "# HELP wanrt_worker_busy 1 while a worker runs a job.", "# TYPE wanrt_worker_busy gauge"]
    lines += ["# HELP wanrt_worker_jobs_done Jobs a worker has finished since it started.",
              "# TYPE wanrt_worker_jobs_done counter",
              "# HELP wanrt_worker_compiled_graphs torch.compile graphs a worker holds (a count that grows with"
              " traffic means recompiles).", "# TYPE wanrt_worker_compiled_graphs gauge",
              "# HELP wanrt_worker_compile_fallbacks Shape buckets a worker runs eagerly (the compiler failed or hit"
              " its recompile limit): alert above 0, the compiled speed is gone there.",
              "# TYPE wanrt_worker_compile_fallbacks gauge",
              "# HELP wanrt_worker_compile_seconds Seconds of a shape bucket's first (compiling) forward.",
              "# TYPE wanrt_worker_compile_seconds gauge",
              "# HELP wanrt_worker_warmup_seconds Seconds a worker's warm-up took per bucket.",
              "# TYPE wanrt_worker_warmup_seconds gauge",
              "# HELP wanrt_worker_lora_swaps_total LoRA set swaps into a worker's slots (both experts).",
              "# TYPE wanrt_worker_lora_swaps_total counter",
              "# HELP wanrt_worker_lora_swap_seconds_total Seconds those swaps took.",
              "# TYPE wanrt_worker_lora_swap_seconds_total counter"]
    for w in workers:
        label = f'worker="{w["id"]}",device="{w.get("device", "")}"'
        lines.append(f"wanrt_worker_jobs_done{{{label}}} {w.get('jobs_done', 0)}")
        lines.append(f"wanrt_worker_report_age_seconds{{{label}}} {max(0.0, report_age(w, now)):.1f}")
        lines.append(f"wanrt_worker_busy{{{label}}} {1 if w.get('state') == 'busy' else 0}")
        backend = w.get("backend") or {}
        if "dynamo_graphs" in backend:
            lines.append(f"wanrt_worker_compiled_graphs{{{label}}} {backend['dynamo_graphs']}")
        if "shape_buckets" in backend:
            lines.append(f"wanrt_worker_shape_buckets{{{label}}} {backend['shape_buckets']}")
        if "fallbacks" in backend:
            lines.append(f"wanrt_worker_compile_fallbacks{{{label}}} {backend['fallbacks']}")
        for bucket, seconds in (backend.get("compile_seconds") or {}).items():  # first (compiling) call per bucket
            lines.append(f'wanrt_worker_compile_seconds{{{label},bucket="{bucket}"}} {seconds}')
        for bucket, seconds in (w.get("warmup_s") or {}).items():
            lines.append(f'wanrt_worker_warmup_seconds{{{label},bucket="{bucket}"}} {seconds}')
        slots = ((w.get("loras") or {}).get("experts") or {}).values()
        if slots:  # LoRA sets swapped into the slots (both experts' swaps, and the seconds they took)
            lines.append(f"wanrt_worker_lora_swaps_total{{{label}}} {sum(e.get('swaps', 0) for e in slots)}")
            lines.append(f"wanrt_worker_lora_swap_seconds_total{{{label}}} "
                         f"{sum(e.get('swap_seconds', 0.0) for e in slots):.6f}")
    lines += ["# HELP wanrt_gpu_available 1 when NVML sees an NVIDIA GPU.", "# TYPE wanrt_gpu_available gauge",
              f"wanrt_gpu_available {1 if gpu.get('available') else 0}"]
    for g in gpu.get("gpus", []):
        label = f'gpu="{g["index"]}",name="{g.get("name")}"'
        for key in ("memory_used_mb", "memory_total_mb", "utilization_gpu_pct", "temperature_c", "power_w", "clock_sm_mhz"):
            if g.get(key) is not None:
                lines.append(f"wanrt_gpu_{key}{{{label}}} {g[key]}")
    lines.append(f"wanrt_uptime_seconds {time.time() - started_at:.1f}")
    return "\n".join(lines) + "\n"


@get("/metrics", media_type="text/plain; version=0.0.4", summary="Prometheus metrics")
async def metrics(request: Request) -> str:
    """Constant work per scrape: counts and per-stage totals are kept by the store, not summed from jobs; one
    store read (metrics_snapshot) and the page built in one store-thread hop."""
    state = request.app.state
    return await run(metrics_text, state.store, getattr(state, "webhooks", None), state.started_at)


@get("/loras", summary="LoRAs the workers serve per request: name, format, rank, experts, layers, sha256")
async def list_loras(store: Store) -> dict[str, Any]:
    """From the workers' reports (an idle worker rescans its LoRA directory every WANRT_LORA_RESCAN_S)."""
    listing, available, _ = lora_catalog(await run(store.workers))
    return {"loras": listing, "available": None if available is None else sorted(available)}


ROUTES = [health, generate, status, download, preview, list_jobs, delete_job, cancel_job, events, metrics,
          list_loras]
DEBUG_ROUTES = [debug_files, debug_job, debug_workers, debug_gpu]

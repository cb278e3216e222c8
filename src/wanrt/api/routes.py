"""The seed's endpoints and our extensions. Thin: parse, call the job store, shape the answer."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.response import Stream

from wanrt.api.fetch import FetchError, FetchPolicy, decode_image, fetch_image
from wanrt.api.schemas import GenerateRequest, GenerateResponse, MessageResponse, field_error, request_fields
from wanrt.jobs.store import STATES, Job, QueueFull
from wanrt.params import GenerateParams, ParamError

API_TITLE = "WAN 2.2-14B LoRAs Image-to-Video API"
JOB_NOT_FOUND = "Job not found"
RETRY_AFTER_S = 10  # what a 429 (queue full) tells the client to wait


class ApiError(HTTPException):
    """An error with the seed's shape: {"detail": ...} and a status code."""


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _get_job(state: State, job_id: str) -> Job:
    job = state.store.get(job_id)
    if job is None:
        raise NotFoundException(detail=JOB_NOT_FOUND)
    return job


def job_summary(job: Job) -> dict[str, Any]:
    """The seed's /jobs entry."""
    return {"status": job.status, "progress": round(job.progress, 1), "input_image": job.input_image}


def job_status(state: State, job: Job) -> dict[str, Any]:
    """The seed's /status shapes, plus timestamps, parameters used, error_type/retryable, queue position."""
    body: dict[str, Any] = {"status": job.status}
    if job.status == "queued":
        body.update(progress=0, queue_position=state.store.queue_position(job), input_image=job.input_image)
    elif job.status == "processing":
        body.update(progress=round(job.progress, 1), stage=job.stage, input_image=job.input_image)
    elif job.status == "completed":
        body.update(progress=100, video_ready=True, download_url=f"/download/{job.id}", video_path=job.video_path,
                    input_image=job.input_image)
    elif job.status in ("error", "cancelled"):
        body.update(error=job.error, error_type=job.error_type, retryable=job.retryable, input_image=job.input_image)
    body.update(job_id=job.id, created_at=_iso(job.created_at), started_at=_iso(job.started_at),
                finished_at=_iso(job.finished_at), params=job.params)
    return body


# ------------------------------------------------------------------------------------------------ seed
@get("/", summary="Health check")
async def health() -> dict[str, str]:
    return {"message": API_TITLE, "status": "running"}


async def submit_job(state: State, fields: dict, idem: str | None, image_url: str | None = None,
                     upload: bytes | None = None) -> Response[GenerateResponse]:
    """Validate, get the image (URL fetch or upload, same checks), write the input and the job, answer."""
    settings = state.settings
    try:
        params = GenerateParams.from_request(fields)
    except ParamError as e:
        raise ApiError(status_code=422, detail=str(e))
    if idem is not None and not (0 < len(idem) <= 255):
        raise ApiError(status_code=400, detail="Idempotency-Key must be 1-255 characters")
    if idem:
        existing = state.store.get_by_idempotency_key(idem)
        if existing is not None:
            return Response(GenerateResponse(existing.id, existing.status, "Job already exists for this Idempotency-Key"))
    queue_full = ApiError(status_code=429, detail=f"Queue is full ({settings.queue_max} jobs waiting); retry later",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
    if state.store.counts()["queued"] >= settings.queue_max:
        raise queue_full

    # Fetch and check the image before answering, as the seed does: a bad image is a 400 and no job.
    policy = FetchPolicy.from_settings(settings)
    try:
        if upload is not None:
            if len(upload) > policy.max_bytes:
                raise ApiError(status_code=413, detail=f"Image is larger than {policy.max_bytes} bytes")
            fetched = await anyio.to_thread.run_sync(decode_image, upload, policy, "upload")
        else:
            fetched = await anyio.to_thread.run_sync(fetch_image, image_url, policy)
    except FetchError as e:
        raise ApiError(status_code=400, detail=str(e))

    job_id = str(uuid.uuid4())
    input_path = state.paths.input_path(job_id, fetched.extension)
    await anyio.to_thread.run_sync(_write_durably, input_path, fetched.data)
    job_params = params.to_dict() | {"frames_generated": params.frames_generated}
    try:
        job, created = state.store.create(job_params, input_image=input_path.name, idempotency_key=idem or None,
                                          job_id=job_id, queue_max=settings.queue_max)
    except QueueFull:
        input_path.unlink(missing_ok=True)
        raise queue_full
    except Exception as e:
        input_path.unlink(missing_ok=True)
        raise ApiError(status_code=500, detail=f"Failed to queue workflow: {e}")
    if not created:  # a concurrent request with the same Idempotency-Key won
        input_path.unlink(missing_ok=True)
        return Response(GenerateResponse(job.id, job.status, "Job already exists for this Idempotency-Key"))
    return Response(GenerateResponse(job.id, "queued", "Image-to-video generation started"))


async def multipart_generate(request: Request) -> Response | None:
    """Extension: POST /generate as multipart/form-data with an `image` file (or `image_url`) and the same
    fields as strings. JSON requests pass through to the typed handler unchanged."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return None
    import msgspec

    form = await request.form()
    upload, fields = None, {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            if key == "image":
                upload = await value.read()
        else:
            fields[key] = value
    image_url = fields.pop("image_url", None)
    if upload is None and not image_url:
        raise ApiError(status_code=422, detail="image: upload a file in the 'image' field or give image_url")
    try:
        data = msgspec.convert({"image_url": image_url or "upload", **fields}, GenerateRequest, strict=False)
    except msgspec.ValidationError as e:
        raise ApiError(status_code=422, detail=_msgspec_detail(e))
    return await submit_job(request.app.state, request_fields(data), request.headers.get("idempotency-key"),
                            image_url=image_url if upload is None else None, upload=upload)


def _msgspec_detail(e: Exception) -> str:
    import re

    text = str(e)
    m = re.search(r"at `\$\.(\w+)`", text)
    return field_error(m.group(1), text.split(" - at")[0]) if m else text


@post("/generate", status_code=200, summary="Queue an image-to-video job", before_request=multipart_generate,
      description="JSON body as in the seed contract. Extension: multipart/form-data with an `image` file upload "
                  "(or `image_url`) and the same fields as form values.")
async def generate(data: GenerateRequest, request: Request, state: State) -> Response[GenerateResponse]:
    return await submit_job(state, request_fields(data), request.headers.get("idempotency-key"), image_url=data.image_url)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@get("/status/{job_id:str}", summary="Status of a job")
async def status(job_id: str, state: State) -> dict[str, Any]:
    return job_status(state, _get_job(state, job_id))


@get("/download/{job_id:str}", summary="The MP4 (Range requests supported)")
async def download(job_id: str, request: Request, state: State) -> Response:
    job = _get_job(state, job_id)
    if job.status != "completed" or not job.video_path:
        raise NotFoundException(detail=f"Video not ready (job status: {job.status})")
    path = Path(job.video_path)
    if not path.is_file():
        raise NotFoundException(detail="Video file is gone (expired or deleted)")
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{job.id}.mp4"'}
    start, end = 0, size - 1
    status_code = 200
    range_header = request.headers.get("range")
    if range_header:
        parsed = _parse_range(range_header, size)
        if parsed is None:
            return Response(content={"detail": f"Range not satisfiable (file has {size} bytes)"}, status_code=416,
                            headers={"Content-Range": f"bytes */{size}"})
        start, end = parsed
        status_code = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)

    async def body():
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


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One 'bytes=a-b', 'bytes=a-' or 'bytes=-n' range; None when it cannot be satisfied."""
    if not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


@get("/jobs", summary="List jobs (optional status filter and paging)")
async def list_jobs(state: State, status: str | None = None, limit: int | None = None, offset: int = 0) -> dict[str, Any]:
    if status is not None and status not in STATES:
        raise ApiError(status_code=422, detail=f"status must be one of {', '.join(STATES)}")
    if limit is not None and not (1 <= limit <= 1000):
        raise ApiError(status_code=422, detail="limit must be in 1-1000")
    if offset < 0:
        raise ApiError(status_code=422, detail="offset must be >= 0")
    jobs, total = state.store.list(status=status, limit=limit, offset=offset)
    body: dict[str, Any] = {"jobs": {j.id: job_summary(j) for j in jobs}}
    if limit is not None or offset or status is not None:
        body.update(total=total, limit=limit, offset=offset)
    return body


@delete("/jobs/{job_id:str}", status_code=200, summary="Delete a job (cancels it if running) and its files")
async def delete_job(job_id: str, state: State) -> MessageResponse:
    job = state.store.delete(job_id)
    if job is None:
        raise NotFoundException(detail=JOB_NOT_FOUND)
    if job.status != "processing":  # a running job's worker removes its own files when it stops
        state.paths.remove_job_files(job.id, job.input_image)
    return MessageResponse("Job deleted")


@get("/events/{job_id:str}", summary="Server-sent events: the job's /status body each time it changes")
async def events(job_id: str, state: State) -> Response:
    import asyncio
    import json as _json

    from litestar.response import ServerSentEvent

    _get_job(state, job_id)  # 404 before the stream starts

    async def stream():
        last, idle, deadline = None, 0.0, time.monotonic() + 3600
        while time.monotonic() < deadline:
            job = state.store.get(job_id)
            if job is None:
                yield {"event": "gone", "data": _json.dumps({"detail": JOB_NOT_FOUND})}
                return
            body = _json.dumps(job_status(state, job))
            if body != last:
                last, idle = body, 0.0
                yield {"event": "status", "data": body}
                if job.status in ("completed", "error", "cancelled"):
                    return
            elif idle >= 15:
                idle = 0.0
                yield {"comment": "keep-alive", "data": None}
            await asyncio.sleep(0.25)
            idle += 0.25

    return ServerSentEvent(stream())


# ------------------------------------------------------------------------------------------------ debug
@get("/debug/files", summary="Files in the data directory")
async def debug_files(state: State) -> dict[str, Any]:
    def listing(folder: Path) -> list[dict[str, Any]]:
        out = []
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.is_file():
                st = p.stat()
                out.append({"name": p.name, "path": str(p), "bytes": st.st_size, "modified": _iso(st.st_mtime)})
        return out

    return {"data_dir": str(state.paths.root), "inputs": listing(state.paths.inputs), "outputs": listing(state.paths.outputs)}


@get("/debug/job/{job_id:str}", summary="The whole job record: timings per stage, worker, device, attempts")
async def debug_job(job_id: str, state: State) -> dict[str, Any]:
    job = _get_job(state, job_id)
    record = {k: v for k, v in job.__dict__.items() if k not in ("deleted",)}
    for k in ("created_at", "started_at", "finished_at", "lease_until"):
        record[k] = _iso(record[k])
    return {"job": record, "status": job_status(state, job)}


@get("/debug/workers", summary="Workers: device, backend (FP8, attention, compiled graphs), jobs done, last report")
async def debug_workers(state: State) -> dict[str, Any]:
    workers = state.store.workers()
    for w in workers:
        w["updated_at"] = _iso(w.get("updated_at"))
    return {"workers": workers}


@get("/debug/gpu", summary="NVML: memory, utilisation, temperature, power and clocks per GPU")
async def debug_gpu() -> dict[str, Any]:
    from wanrt.doctor import gpu_report

    return await anyio.to_thread.run_sync(gpu_report)


@get("/metrics", media_type="text/plain; version=0.0.4", summary="Prometheus metrics")
async def metrics(state: State) -> str:
    from wanrt.doctor import gpu_report

    lines = ["# HELP wanrt_jobs Jobs by state.", "# TYPE wanrt_jobs gauge"]
    counts = state.store.counts()
    lines += [f'wanrt_jobs{{state="{s}"}} {n}' for s, n in counts.items()]
    lines += ["# HELP wanrt_queue_depth Jobs waiting to run.", "# TYPE wanrt_queue_depth gauge",
              f"wanrt_queue_depth {counts['queued']}"]
    sums: dict[str, list[float]] = {}
    for job in state.store.list(status="completed")[0]:
        for stage, seconds in job.timings.items():
            sums.setdefault(stage.removesuffix("_s"), []).append(float(seconds))
    lines += ["# HELP wanrt_stage_seconds Time per pipeline stage of completed jobs still retained.",
              "# TYPE wanrt_stage_seconds summary"]
    for stage, values in sorted(sums.items()):
        lines += [f'wanrt_stage_seconds_sum{{stage="{stage}"}} {sum(values):.6f}',
                  f'wanrt_stage_seconds_count{{stage="{stage}"}} {len(values)}']
    lines += ["# HELP wanrt_worker_jobs_done Jobs a worker has finished since it started.",
              "# TYPE wanrt_worker_jobs_done counter",
              "# HELP wanrt_worker_compiled_graphs torch.compile graphs a worker holds (a count that grows with"
              " traffic means recompiles).", "# TYPE wanrt_worker_compiled_graphs gauge"]
    for w in state.store.workers():
        label = f'worker="{w["id"]}",device="{w.get("device", "")}"'
        lines.append(f"wanrt_worker_jobs_done{{{label}}} {w.get('jobs_done', 0)}")
        backend = w.get("backend") or {}
        if "dynamo_graphs" in backend:
            lines.append(f"wanrt_worker_compiled_graphs{{{label}}} {backend['dynamo_graphs']}")
        if "shape_buckets" in backend:
            lines.append(f"wanrt_worker_shape_buckets{{{label}}} {backend['shape_buckets']}")
    gpu = await anyio.to_thread.run_sync(gpu_report)
    lines += ["# HELP wanrt_gpu_available 1 when NVML sees an NVIDIA GPU.", "# TYPE wanrt_gpu_available gauge",
              f"wanrt_gpu_available {1 if gpu.get('available') else 0}"]
    for g in gpu.get("gpus", []):
        label = f'gpu="{g["index"]}",name="{g["name"]}"'
        for key in ("memory_used_mb", "memory_total_mb", "utilization_gpu_pct", "temperature_c", "power_w", "clock_sm_mhz"):
            if g.get(key) is not None:
                lines.append(f"wanrt_gpu_{key}{{{label}}} {g[key]}")
    lines.append(f"wanrt_uptime_seconds {time.time() - state.started_at:.1f}")
    return "\n".join(lines) + "\n"


ROUTES = [health, generate, status, download, list_jobs, delete_job, events, debug_files, debug_job, debug_workers, debug_gpu, metrics]

"""The Litestar app: the seed's contract on port 8189, errors always {"detail": ...}, CORS on, OpenAPI at /schema."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from wanrt.api.routes import API_TITLE, ROUTES
from wanrt.jobs.paths import DataPaths
from wanrt.jobs import open_store
from wanrt.api.schemas import field_error

log = logging.getLogger("wanrt.api")
OPEN_PATHS = ("/", "/schema")
OPEN_PREFIXES = ("/schema", "/ui")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _validation_detail(exc: ValidationException) -> tuple[int, str]:
    """Litestar's body/query validation -> 422 naming the field (and its allowed range), 400 for bad JSON."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for item in extra:
        if not isinstance(item, dict):
            continue
        key, message = item.get("key"), str(item.get("message", "invalid"))
        missing = re.search(r"missing required field `([^`]+)`", message)
        if missing:
            key, message = missing.group(1), "field required"
        parts.append(field_error(key, message))
    if not parts:
        text = str(exc.detail)
        if "JSON" in text or "decode" in text.lower() or "malformed" in text.lower():
            return 400, f"Invalid JSON body: {text}"
        return 422, text
    joined = "; ".join(parts)
    if any("JSON is malformed" in p or "Expected `object`" in p and "$" in p for p in parts):
        return 400, f"Invalid JSON body: {joined}"
    return 422, joined


def _error_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ValidationException):
        code, detail = _validation_detail(exc)
        return Response({"detail": detail}, status_code=code)
    if isinstance(exc, HTTPException):
        return Response({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers or None)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response({"detail": f"Internal server error: {type(exc).__name__}"}, status_code=HTTP_500_INTERNAL_SERVER_ERROR)


def create_app(settings) -> Litestar:
    paths = DataPaths(settings.data_dir).ensure()
    store = open_store(settings, paths.db)

    async def auth(request: Request) -> Response | None:
        path = request.scope["path"]
        if not settings.api_keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        if request.method == "OPTIONS":
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        if token not in settings.api_keys:
            return Response({"detail": "Missing or invalid bearer token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        return None

    @contextlib.asynccontextmanager
    async def expiry(app: Litestar):
        """Finished jobs and their files expire after the TTL (checked every minute)."""

        async def loop():
            while True:
                try:
                    for job in store.expire(settings.job_ttl_s):
                        paths.remove_job_files(job.id, job.input_image)
                except Exception:
                    log.exception("expiry sweep failed")
                await asyncio.sleep(min(60.0, max(1.0, settings.job_ttl_s / 10)))

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()

    state = State({"settings": settings, "store": store, "paths": paths, "started_at": time.time()})
    return Litestar(
        route_handlers=[*ROUTES, create_static_files_router(path="/ui", directories=[STATIC_DIR], html_mode=True,
                                                             name="ui")],
        state=state,
        before_request=auth,
        lifespan=[expiry],
        cors_config=CORSConfig(allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                               expose_headers=["Content-Range", "Accept-Ranges", "Retry-After"]),
        exception_handlers={Exception: _error_handler},
        openapi_config=OpenAPIConfig(title=API_TITLE, version="0.1.0", path="/schema"),
        request_max_body_size=16 * 1024 * 1024,
        debug=False,
    )

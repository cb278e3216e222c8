"""Domain errors -> HTTP, once, for the whole app (`exception_handlers`). Every error body is {"detail": ...}."""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from wanrt.api.fetch import FetchError
from wanrt.api.schemas import field_error
from wanrt.jobs.store import QueueFull
from wanrt.params import ParamError

log = logging.getLogger("wanrt.api")
RETRY_AFTER_S = 10  # what a 429 (queue full) or 503 (fetches busy) tells the client to wait
JOB_NOT_FOUND = "Job not found"


class JobNotFound(Exception):
    """No such job (or it was deleted / expired)."""


class Busy(Exception):
    """A bounded resource (image fetches, event streams) is at its limit: 503 or 429 with Retry-After."""

    def __init__(self, detail: str, status_code: int = 503):
        super().__init__(detail)
        self.status_code = status_code


class ClientGone(Exception):
    """The client disconnected before its job was created: nothing is written."""


def _detail(detail: str, status_code: int, headers: dict[str, str] | None = None) -> Response:
    return Response({"detail": detail}, status_code=status_code, headers=headers)


def _validation(request: Request, exc: ValidationException) -> Response:
    """Litestar's body/query validation -> 422 naming the field (and its allowed range); a body that is not a
    JSON object -> 400. msgspec reports a missing field only inside its message (no structured key), so that
    one case is read from the text."""
    parts = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        key, message = item.get("key"), str(item.get("message", "invalid"))
        if key == "data":  # the body as a whole
            if message.startswith("Expected `object`"):
                return _detail(f"Invalid JSON body: {message}", 400)
            missing = message.partition("missing required field `")[2].rstrip("`")
            key, message = (missing, "field required") if missing else (None, message)
        parts.append(field_error(key, message))
    return _detail("; ".join(parts) or str(exc.detail), 422)


def _http(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail
    if exc.status_code == 400 and str(detail).startswith("JSON is malformed"):
        detail = f"Invalid JSON body: {detail}"
    return _detail(detail, exc.status_code, exc.headers or None)


def _queue_full(request: Request, exc: QueueFull) -> Response:
    return _detail(f"Queue is full ({exc.queued} jobs waiting); retry later", 429, {"Retry-After": str(RETRY_AFTER_S)})


def _busy(request: Request, exc: Busy) -> Response:
    return _detail(str(exc), exc.status_code, {"Retry-After": str(RETRY_AFTER_S)})


def _internal(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _detail(f"Internal server error: {type(exc).__name__}", 500)


EXCEPTION_HANDLERS = {
    ValidationException: _validation,
    HTTPException: _http,
    ParamError: lambda request, exc: _detail(str(exc), 422),
    FetchError: lambda request, exc: _detail(str(exc), 400),
    JobNotFound: lambda request, exc: _detail(JOB_NOT_FOUND, 404),
    QueueFull: _queue_full,
    Busy: _busy,
    ClientGone: lambda request, exc: _detail("Client closed the request", 499),
    Exception: _internal,
}

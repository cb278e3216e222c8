"""The Litestar app: the seed's contract on port 8189, errors always {"detail": ...}, CORS on, OpenAPI at /schema.

As in litestar-fullstack: the store, settings and data paths are injected with `Provide`; auth is a guard;
domain errors map to HTTP once (`api/errors.py`); blocking store and file work runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from functools import partial
from pathlib import Path

import anyio
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router

from wanrt.api.errors import EXCEPTION_HANDLERS
from wanrt.api.routes import API_TITLE, DEBUG_ROUTES, ROUTES, Limits, bearer_token, webhook_body, webhook_check
from wanrt.jobs import open_store
from wanrt.jobs.paths import STRAY_AFTER_S, DataPaths
from wanrt.jobs.protocol import JobStore
from wanrt.jobs.webhooks import POLL_S, WebhookDispatcher

log = logging.getLogger("wanrt.api")
STATIC_DIR = Path(__file__).resolve().parent / "static"
OPEN = {"open": True}
PROVIDED = ("store", "settings", "paths", "limits")  # app state injected into handlers by name  # handler opt: answered without a token
UI_HEADERS = {  # the playground only talks to this origin; nothing may frame it
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                               "connect-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


async def token_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """With api_keys set, every route not marked open needs `Authorization: Bearer <key>`. Guards run before
    the body is read, so an unauthorised request never parses, fetches or writes anything. A coroutine on
    purpose: Litestar runs a plain-function guard in a thread pool, a thread hop on every request for a few
    microseconds of string comparison."""
    keys = connection.app.state.settings.api_keys
    if not keys or handler.opt.get("open") or connection.scope["method"] == "OPTIONS":
        return
    token = bearer_token(connection.headers.get("authorization")).encode()
    # compare_digest with every key (no early exit): the time does not tell which key or prefix matched
    matched = [hmac.compare_digest(token, key.encode()) for key in keys]
    if not any(matched):
        raise NotAuthorizedException(detail="Missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


def _ui_headers(response):
    response.headers.update(UI_HEADERS)
    return response


def _refuse_nul(request) -> None:
    if "\x00" in request.scope["path"]:  # os.stat raises on NUL: a 404, not a 500
        raise NotFoundException(detail="Not found")


def _from_state(name: str):
    def provide(state: State):
        return state[name]

    return provide


def create_app(settings, store: JobStore | None = None) -> Litestar:
    paths = DataPaths(settings.data_dir).ensure()
    if store is None:
        store = open_store(settings, paths.db)
    limits = Limits.from_settings(settings)

    @contextlib.asynccontextmanager
    async def expiry(app: Litestar):
        """Finished jobs and their files expire after the TTL (checked every minute); files of no job go an hour
        after their last change (checked every hour, and at start: what a crash left)."""
        strays_checked = [float("-inf")]

        def job_status(job_id: str) -> str | None:
            job = store.get(job_id, include_deleted=True)
            return None if job is None else job.status

        def sweep() -> None:
            for job in store.expire(settings.job_ttl_s):
                paths.remove_job_files(job.id, job.input_image)
            if time.monotonic() - strays_checked[0] >= STRAY_AFTER_S:
                strays_checked[0] = time.monotonic()
                if removed := paths.remove_stray_files(STRAY_AFTER_S, job_status):
                    log.warning("removed %d file(s) of no job: %s", len(removed), ", ".join(removed[:5]))

        async def loop():
            while True:
                try:
                    await anyio.to_thread.run_sync(sweep)
                except Exception:
                    log.exception("expiry sweep failed")
                await asyncio.sleep(min(60.0, max(1.0, settings.job_ttl_s / 10)))

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()

    # Webhooks are sent from the API process, never the worker: due deliveries are claimed from the store
    # every POLL_S and each is sent on a thread of its own (jobs/webhooks.py).
    dispatcher = (WebhookDispatcher(store, settings, partial(webhook_body, store, paths), webhook_check(settings))
                  if settings.webhook_secret else None)

    @contextlib.asynccontextmanager
    async def webhooks(app: Litestar):
        if dispatcher is None:
            yield
            return

        async def loop():
            while True:
                try:
                    await anyio.to_thread.run_sync(dispatcher.poll_once)
                except Exception:
                    log.exception("webhook dispatch failed")
                await asyncio.sleep(POLL_S)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # a poll under way counts its threads first
                await task
            if left := await anyio.to_thread.run_sync(dispatcher.drain, dispatcher.timeout_s):
                log.warning("%d webhook attempt(s) still under way at shutdown: resent once their lease ends", left)

    state = State({"settings": settings, "store": store, "paths": paths, "limits": limits, "started_at": time.time(),
                   "webhooks": dispatcher})
    ui = create_static_files_router(path="/ui", directories=[STATIC_DIR], html_mode=True, name="ui", opt=OPEN,
                                    after_request=_ui_headers, before_request=_refuse_nul)
    routes = [*ROUTES, *(DEBUG_ROUTES if settings.debug_endpoints else ()), ui]
    return Litestar(
        route_handlers=routes,
        dependencies={name: Provide(_from_state(name), sync_to_thread=False) for name in PROVIDED},
        guards=[token_guard],
        state=state,
        lifespan=[expiry, webhooks],
        cors_config=CORSConfig(allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                               expose_headers=["Content-Range", "Accept-Ranges", "Retry-After"]),
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(title=API_TITLE, version="0.1.0",
                                     openapi_router=Router(path="/schema", route_handlers=[], opt=OPEN,
                                                           include_in_schema=False)),
        request_max_body_size=16 * 1024 * 1024,
        debug=False,
    )


__all__ = ["create_app", "token_guard", "bearer_token"]

"""Webhooks: a job's status JSON POSTed to the URL its request named, signed, retried, durable.

- Signed as Standard Webhooks (standardwebhooks.com): `webhook-id` (the delivery's id, the same on every retry,
  so a receiver can drop duplicates), `webhook-timestamp` (unix seconds of this attempt) and
  `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` keyed by WANRT_WEBHOOK_SECRET (a
  `whsec_<base64>` secret is used as the bytes it encodes, like the Standard Webhooks libraries; any other
  text as its UTF-8 bytes).
- Durable: deliveries are queued in the job store by the same atomic step that changes the job (SQLite and
  Redis alike), so a restart loses none. Every API process runs a WebhookDispatcher (a lifespan task in
  api/app.py) that claims due deliveries, one attempt each under a lease: API nodes sharing one Redis never
  take the same attempt twice. At-least-once: an attempt whose process died mid-send is tried again when its
  lease ends.
- Retries: `webhook_retry_s` (default 15, 45, 135, 405 s: 5 attempts over 10 minutes) for the terminal
  events; a 'progress' event is tried once (a stale progress report minutes later helps nobody). 2xx is
  success; 410 Gone, or a URL that the address rules now refuse, ends it at once; anything else retries.
- Safe: the URL passes the image fetcher's address rules when it is submitted (api/routes.py, 422) and again
  at every attempt, and the connection goes to the address that was checked (no DNS rebinding). Redirects
  are not followed. One deadline per attempt; deliveries run on their own threads, so a receiver that hangs
  holds one thread for at most webhook_timeout_s and never the worker or other deliveries.
No HTTP framework and no torch here: the API process runs this; the worker only writes to the store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Callable

from wanrt.jobs.protocol import JobStore
from wanrt.jobs.store import WebhookDelivery
from wanrt.tls import client_context

log = logging.getLogger("wanrt.webhooks")

EVENTS = ("completed", "error", "cancelled", "progress")
DEFAULT_EVENTS = ("completed", "error", "cancelled")
MAX_URL_CHARS = 2048
POLL_S = 0.5  # how often a dispatcher looks for due deliveries
LEASE_MARGIN_S = 30.0  # a claim outlives its attempt's deadline by this much
MAX_ERROR_CHARS = 300
USER_AGENT = "wanrt-webhook/1"
_TARGET_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII but space: what may stand unescaped
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class WebhookRefused(ValueError):
    """The URL breaks a rule (scheme, form, address): 422 at submit; the delivery fails at once later."""


@dataclass(frozen=True)
class Target:
    scheme: str  # http | https
    host: str  # as resolved and sent (IDNA for non-ASCII names, no brackets for IPv6)
    port: int
    target: str  # path and query, escaped

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.scheme == "https" else 80) else f"{host}:{self.port}"


# ------------------------------------------------------------------------------------------- request fields
def parse_events(value) -> tuple[str, ...]:
    """The request's webhook_events (a list, or a comma-separated string from a form) -> events in EVENTS
    order; None gives the terminal three."""
    if value is None:
        return DEFAULT_EVENTS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    unknown = [n for n in names if n not in EVENTS]
    if unknown or not names:
        raise WebhookRefused(f"webhook_events: {unknown[0] if unknown else 'empty'!r} is not an event "
                             f"(allowed: {', '.join(EVENTS)})")
    return tuple(e for e in EVENTS if e in names)


def split_url(url: str) -> Target:
    """Structural rules: http(s), a host, no credentials, at most MAX_URL_CHARS. (Which scheme and which
    addresses are allowed is the caller's check: it needs the server's allow list.)"""
    if not isinstance(url, str) or not url.strip():
        raise WebhookRefused("webhook: empty URL")
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"webhook: URL longer than {MAX_URL_CHARS} characters")
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise WebhookRefused("webhook: malformed URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookRefused(f"webhook: scheme must be https (or http for allowed hosts), not {scheme[:20]!r}")
    if not host:
        raise WebhookRefused("webhook: URL has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("webhook: credentials in the URL are not supported (put a token in the path or query)")
    wire = host if _is_ip(host) else _wire_name(host)
    target = urllib.parse.quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe=_TARGET_SAFE)
    return Target(scheme, wire, port or (443 if scheme == "https" else 80), target)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _wire_name(host: str) -> str:
    """A host name as resolved and sent: IDNA, lower case; WebhookRefused for names no resolver should see."""
    invalid = WebhookRefused(f"webhook: invalid host name {host[:100]!r}")
    try:
        wire = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise invalid from None
    labels = wire.rstrip(".").split(".")
    if len(wire) > 253 or not set(wire) <= _HOST_CHARS or any(not 0 < len(x) <= 63 for x in labels):
        raise invalid
    return wire


def retry_delays(settings) -> tuple[float, ...]:
    """webhook_retry_s as seconds; ValueError for a value that is not a non-negative number."""
    delays = tuple(float(v) for v in settings.webhook_retry_s)
    if any(d < 0 or d != d for d in delays):
        raise ValueError(f"webhook_retry_s: delays must be >= 0 seconds, got {settings.webhook_retry_s}")
    return delays


# ------------------------------------------------------------------------------------------- signing
def signing_key(secret: str) -> bytes:
    """A Standard Webhooks secret (`whsec_` + base64) signs with the bytes it encodes; any other text with its UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            pass
    return secret.encode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(key: bytes, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(key, msg_id, timestamp, body)}


# ------------------------------------------------------------------------------------------- one POST


def post(target: Target, addresses: list[str], body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST body to the first of the checked `addresses` that connects; returns the HTTP status. One deadline
    covers connect, TLS, send and the answer's status line: a watchdog shuts the socket down when it passes,
    so a receiver that accepts and then says nothing (or drips) costs at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    current: list[socket.socket] = []

    def expire():
        for s in current:
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(timeout_s, expire)
    watchdog.daemon = True
    watchdog.start()
    sock = None
    try:
        for i, ip in enumerate(addresses):
            try:
                sock = socket.create_connection((ip, target.port), timeout=max(0.01, deadline - time.monotonic()))
                break
            except OSError:
                if i == len(addresses) - 1:
                    raise
        if sock is None:
            raise OSError("no address to connect to")
        current.append(sock)
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        if target.scheme == "https":
            sock = client_context().wrap_socket(sock, server_hostname=target.host)
            current[:] = [sock]
        head = [f"POST {target.target} HTTP/1.1", f"Host: {target.host_header}", f"User-Agent: {USER_AGENT}",
                "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close",
                *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        if time.monotonic() >= deadline:
            raise TimeoutError
        return response.status
    except OSError:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None
        raise
    finally:
        watchdog.cancel()
        if sock is not None:
            sock.close()


def _describe(e: Exception) -> str:
    """A short, fixed-form error for the delivery record (never a repr with addresses)."""
    if isinstance(e, WebhookRefused):
        return str(e)[:MAX_ERROR_CHARS]
    if isinstance(e, TimeoutError):
        return f"timed out ({e})" if str(e) else "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return "TLS certificate could not be verified"
    if isinstance(e, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, http.client.HTTPException):
        return "invalid or incomplete HTTP answer"
    if isinstance(e, OSError) and e.strerror:
        return f"network error ({e.strerror})"[:MAX_ERROR_CHARS]
    return f"network error ({type(e).__name__})"


# ------------------------------------------------------------------------------------------- dispatcher
Check = Callable[[Target, float], list[str]]  # (target, monotonic deadline) -> checked addresses, or WebhookRefused
Render = Callable[[WebhookDelivery], bytes | None]  # the body to send, None when the job is gone


class WebhookDispatcher:
    """Claims due deliveries from the store and sends each on a thread of its own (at most `concurrency`)."""

    def __init__(self, store: JobStore, settings, render: Render, check: Check, owner: str | None = None):
        self.store, self.render, self.check = store, render, check
        self.key = signing_key(settings.webhook_secret)
        self.delays = retry_delays(settings)
        self.timeout_s = float(settings.webhook_timeout_s)
        self.concurrency = max(1, int(settings.webhook_concurrency))
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._in_flight = 0
        self.sent = self.failed = 0  # attempts answered 2xx / not, since start

    @property
    def lease_s(self) -> float:
        return self.timeout_s + LEASE_MARGIN_S

    def poll_once(self) -> int:
        """Claim what is due (as many as there are free threads) and start them; returns how many."""
        with self._lock:
            free = self.concurrency - self._in_flight
        if free <= 0:
            return 0
        claimed = self.store.claim_webhooks(self.owner, free, self.lease_s)
        for delivery in claimed:
            with self._lock:
                self._in_flight += 1
            threading.Thread(target=self._run, args=(delivery,), name="wanrt-webhook", daemon=True).start()
        return len(claimed)

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def drain(self, timeout_s: float) -> int:
        """At shutdown: wait up to `timeout_s` for attempts under way to record their outcome (an answered attempt
        left unrecorded is sent again once its lease ends: a duplicate for a 2xx). Returns how many are left."""
        deadline = time.monotonic() + timeout_s
        while (left := self.in_flight()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def _run(self, delivery: WebhookDelivery) -> None:
        try:
            self.deliver(delivery)
        except Exception:  # the store is down, say: the lease ends and another attempt follows
            log.exception("webhook %s: attempt failed unexpectedly", delivery.id)
        finally:
            with self._lock:
                self._in_flight -= 1

    def deliver(self, d: WebhookDelivery) -> str:
        """One attempt of a claimed delivery; returns the state it is left in."""
        body = d.body.encode() if d.body is not None else self.render(d)
        if body is None:
            self.store.finish_webhook(d.id, d.owner or self.owner, "dropped", "the job was deleted before the first attempt")
            return "dropped"
        error, final = None, False
        try:
            target = split_url(d.url)
            addresses = self.check(target, time.monotonic() + self.timeout_s)
            status = post(target, addresses, body, signed_headers(self.key, d.id, body), self.timeout_s)
            if 200 <= status < 300:
                self.sent += 1
                self.store.finish_webhook(d.id, d.owner or self.owner, "delivered", None, body.decode())
                log.info("webhook %s (%s of job %s): delivered, attempt %d", d.id, d.event, d.job_id, d.attempts)
                return "delivered"
            error, final = f"HTTP {status}", status == 410
        except WebhookRefused as e:
            error, final = _describe(e), True
        except (OSError, http.client.HTTPException, ValueError) as e:
            error = _describe(e)
        self.failed += 1
        retry = not final and d.event != "progress" and d.attempts <= len(self.delays)
        state = "pending" if retry else "failed"
        retry_at = time.time() + self.delays[d.attempts - 1] if retry else None
        self.store.finish_webhook(d.id, d.owner or self.owner, state, error, body.decode(), retry_at)
        log.warning("webhook %s (%s of job %s): attempt %d failed (%s)%s", d.id, d.event, d.job_id, d.attempts,
                    error, f"; retry in {self.delays[d.attempts - 1]:g} s" if retry else "; giving up")
        return state

"""Webhooks against a real local HTTP receiver: signed once per event, retried with spacing, durable across a
restart, refused for private targets, never stalled by a receiver that hangs; claims exclusive across API nodes.

Most tests run `wanrt serve` without a worker and play the worker on its SQLite store (claim, heartbeat,
complete, exactly what jobs/worker.py calls): the events come from the same store transitions, without
spending a model run per case. tests/test_preview.py runs one real job with a webhook end to end."""

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from wanrt.config import Settings
from wanrt.jobs.paths import DataPaths
from wanrt.jobs.store import SqliteJobStore
from wanrt.jobs.webhooks import (
    DEFAULT_EVENTS,
    WebhookDispatcher,
    WebhookRefused,
    parse_events,
    signature,
    signing_key,
    split_url,
)
from wanrt.params import ParamError

from servers import WanrtServer, image_bytes

KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(KEY).decode()  # a Standard Webhooks secret: signs with the bytes it encodes
PNG = "data:image/png;base64," + base64.b64encode(image_bytes("PNG", size=(64, 64))).decode()
BODY = {"image_url": PNG, "prompt": "x", "width": 256, "height": 256, "frames": 16, "steps": 1}


# ---------------------------------------------------------------------- the receiver and the verifier
class Receiver:
    """Records every POST. Paths choose the answer: /ok/..., /fail/<n>/... (500 the first n times, then 200),
    /hang/<s>/... (answer after s seconds), /gone/... (410)."""

    def __init__(self):
        self.seen: list[dict] = []
        self.counts: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path.split("/")
                with receiver.lock:
                    receiver.counts[self.path] += 1
                    n = receiver.counts[self.path]
                code = 200
                if parts[1] == "fail" and n <= int(parts[2]):
                    code = 500
                elif parts[1] == "gone":
                    code = 410
                elif parts[1] == "hang":
                    time.sleep(float(parts[2]))
                with receiver.lock:
                    receiver.seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                          "raw": body, "body": json.loads(body), "at": time.time(), "code": code})
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}{path}"

    def on(self, path: str) -> list[dict]:
        with self.lock:
            return [s for s in self.seen if s["path"] == path]

    def wait(self, path: str, n: int, timeout: float = 20.0, code: int | None = None) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.on(path)  # n requests, one of them answered `code`
            if len(got) >= n and (code is None or any(s["code"] == code for s in got)):
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{path}: {len(self.on(path))} requests, wanted {n}")


def verify(secret: str, headers: dict, body: bytes, tolerance_s: float = 300) -> dict:
    """The receiver-side check from docs/watching.md (Standard Webhooks): the signature over
    "id.timestamp.body" with the secret's bytes, and a fresh timestamp. Returns the payload."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        raise ValueError("stale timestamp")
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest())
    for sig in headers["webhook-signature"].split():
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return json.loads(body)
    raise ValueError("bad signature")


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.httpd.shutdown()


def api_env(**extra) -> dict:
    """API only (no worker), webhooks on, 1 s retries, 2 s attempts. Only `localhost` is allow-listed: the
    receiver is reached by that name, and 127.0.0.1 by number counts as a private address."""
    return {"WANRT_ALLOW_HOSTS": "localhost", "WANRT_WEBHOOK_SECRET": SECRET, "WANRT_WEBHOOK_RETRY_S": "1,1,1,1",
            "WANRT_WEBHOOK_TIMEOUT_S": "2", **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with WanrtServer(tmp_path_factory.mktemp("hooks"), workers=0, **api_env()) as srv:
        yield srv


def submit(srv: WanrtServer, url: str, events=None) -> str:
    body = {**BODY, "webhook": url, **({"webhook_events": events} if events else {})}
    r = httpx.post(srv.base + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def play_worker(srv: WanrtServer, job_id: str, outcome: str = "completed", progress=()) -> None:
    """Claim the job on the server's store and end it as the worker would."""
    store = SqliteJobStore(DataPaths(srv.data_dir).db)
    job = store.claim("fake-worker", 30)
    assert job is not None and job.id == job_id
    for p in progress:
        store.heartbeat(job_id, "fake-worker", 30, p, "denoise")
    store.add_usage(job_id, {"denoise_high": 0.25, "vae_decode": 0.5})
    if outcome == "completed":
        assert store.complete(job_id, "fake-worker", str(srv.data_dir / "outputs" / "x.mp4"), {"total_s": 1.0})
    else:
        assert store.fail(job_id, "fake-worker", "RuntimeError: boom", "internal_error", True)
    store.close()


# ---------------------------------------------------------------------- units
def test_signature_is_standard_webhooks():
    body = b'{"status":"completed"}'
    sig = signature(signing_key(SECRET), "msg_1", 1700000000, body)
    want = base64.b64encode(hmac.new(KEY, b'msg_1.1700000000.{"status":"completed"}', hashlib.sha256).digest())
    assert sig == "v1," + want.decode()
    assert signing_key("plain text") == b"plain text"
    assert verify(SECRET, {"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())),
                           "webhook-signature": signature(KEY, "msg_1", int(time.time()), body)}, body)


def test_request_field_rules():
    assert parse_events(None) == DEFAULT_EVENTS == ("completed", "error", "cancelled")
    assert parse_events("progress, completed") == ("completed", "progress")
    for bad in (["nope"], [], "x"):
        with pytest.raises(WebhookRefused):
            parse_events(bad)
    assert split_url("https://h.example/a b?x=1").target == "/a%20b?x=1"
    for bad in ("ftp://h/x", "https://user:pw@h.example/", "https:///x", "https://h" + "x" * 3000, "http://a b/"):
        with pytest.raises(WebhookRefused):
            split_url(bad)
    from wanrt.api.routes import check_webhook

    with pytest.raises(ParamError, match="WANRT_WEBHOOK_SECRET"):  # no secret: nothing could be signed
        check_webhook(Settings(), "https://example.com/h", None)
    with pytest.raises(ParamError, match="needs a webhook"):
        check_webhook(Settings(webhook_secret="s"), None, ["completed"])
    with pytest.raises(ParamError, match="not allowed"):
        check_webhook(Settings(webhook_secret="s"), "https://[::1]:8443/h", None)
    with pytest.raises(ParamError, match="plain http"):  # public, but not in the allow list: https only
        check_webhook(Settings(webhook_secret="s", allow_hosts=("10.0.0.0/8",)), "http://93.184.215.14/h", None)
    assert check_webhook(Settings(webhook_secret="s", allow_hosts=("10.0.0.0/8",)), "http://10.1.2.3/h", None) \
        == ("http://10.1.2.3/h", DEFAULT_EVENTS)


# ---------------------------------------------------------------------- against a real server
def test_each_event_delivered_once_and_signed(server, receiver):
    job = submit(server, receiver.url("/ok/a"), ["completed", "progress"])
    play_worker(server, job, progress=(5.0, 45.0, 48.0))  # started, passed 40 %: two 'progress' events
    got = receiver.wait("/ok/a", 3)
    time.sleep(1.5)  # and nothing more comes
    got = receiver.on("/ok/a")
    assert sorted(g["body"]["event"] for g in got) == ["completed", "progress", "progress"]  # in any order
    assert len({g["headers"]["webhook-id"] for g in got}) == 3
    for g in got:
        assert verify(SECRET, g["headers"], g["raw"])["job_id"] == job
        assert g["headers"]["content-type"] == "application/json" and g["headers"]["user-agent"].startswith("wanrt")
    status = httpx.get(f"{server.base}/status/{job}").json()
    completed = next(g["body"] for g in got if g["body"]["event"] == "completed")
    assert {k: v for k, v in completed.items() if k != "event"} == status  # the job's /status JSON
    assert status["gpu_seconds"] == 0.75 and status["gpu_seconds_by_stage"] == {"denoise_high": 0.25, "vae_decode": 0.5}
    dbg = httpx.get(f"{server.base}/debug/job/{job}").json()["webhook_deliveries"]
    assert [(d["event"], d["state"], d["attempts"]) for d in dbg] == [
        ("progress", "delivered", 1), ("progress", "delivered", 1), ("completed", "delivered", 1)]
    assert "webhook_attempts_total" in httpx.get(server.base + "/metrics").text


def test_typed_client_json_and_multipart(server, receiver, tmp_path):
    from wanrt.client import WanrtClient

    f = tmp_path / "frame.png"
    f.write_bytes(image_bytes("PNG", size=(64, 64)))
    small = {k: v for k, v in BODY.items() if k not in ("image_url", "prompt")}
    with WanrtClient(server.base) as c:
        by_url = c.generate("x", image_url=PNG, webhook=receiver.url("/ok/g"), webhook_events=["cancelled"], **small)
        upload = c.generate("x", image_path=f, webhook=receiver.url("/ok/h"), webhook_events=["error", "completed"],
                            **small)
        assert c.preview(by_url["job_id"]) is None  # queued: no preview yet
    for job_id, events in ((by_url["job_id"], "cancelled"), (upload["job_id"], "completed,error")):
        record = httpx.get(f"{server.base}/debug/job/{job_id}").json()["job"]
        assert record["webhook_events"] == events and record["webhook"].startswith(receiver.url("/ok/"))
        assert "webhook" not in httpx.get(f"{server.base}/status/{job_id}").json()["params"]
    play_worker(server, by_url["job_id"])  # completed: not an event this job asked for
    with WanrtClient(server.base) as c:  # a queued job cancelled through the API: the event it asked for
        cancelled = c.generate("x", image_url=PNG, webhook=receiver.url("/ok/cancel"), **small)["job_id"]
        assert c.cancel(cancelled)["status"] == "cancelled"
    (got,) = receiver.wait("/ok/cancel", 1)
    assert got["body"]["event"] == "cancelled" and got["body"]["job_id"] == cancelled
    play_worker(server, upload["job_id"])
    receiver.wait("/ok/h", 1)
    time.sleep(1.0)
    assert receiver.on("/ok/g") == [] and [g["body"]["event"] for g in receiver.on("/ok/h")] == ["completed"]


def test_failing_receiver_gets_spaced_retries_then_one_success(server, receiver):
    job = submit(server, receiver.url("/fail/2/b"))
    play_worker(server, job, outcome="error")
    got = receiver.wait("/fail/2/b", 3, code=200)
    time.sleep(1.5)
    got = receiver.on("/fail/2/b")
    assert [g["code"] for g in got] == [500, 500, 200]  # exactly one success, nothing after it
    assert len({g["headers"]["webhook-id"] for g in got}) == 1 and len({g["raw"] for g in got}) == 1
    assert all(g["body"]["event"] == "error" and g["body"]["error_type"] == "internal_error" for g in got)
    gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # WANRT_WEBHOOK_RETRY_S=1,1,...
    for g in got:  # each attempt is signed with its own timestamp
        verify(SECRET, g["headers"], g["raw"])
    (d,) = httpx.get(f"{server.base}/debug/job/{job}").json()["webhook_deliveries"]
    assert d["state"] == "delivered" and d["attempts"] == 3 and d["last_error"] is None


def test_loopback_target_refused_at_submit_and_at_delivery(server, receiver):
    before = len(httpx.get(server.base + "/jobs").json()["jobs"])
    for url, fragment in ((receiver.url("/ok/c", host="127.0.0.1"), "not allowed"),
                          ("http://169.254.169.254/latest/meta-data/", "not allowed"),
                          ("ftp://localhost/x", "scheme"), ("https://u:p@localhost/x", "credentials")):
        r = httpx.post(server.base + "/generate", json={**BODY, "webhook": url})
        assert r.status_code == 422 and fragment in r.json()["detail"] and r.json()["detail"].startswith("webhook"), r.text
    r = httpx.post(server.base + "/generate", json={**BODY, "webhook": receiver.url("/ok/c"), "webhook_events": ["nope"]})
    assert r.status_code == 422 and "webhook_events" in r.json()["detail"]
    r = httpx.post(server.base + "/generate", json={**BODY, "webhook_events": ["completed"]})
    assert r.status_code == 422
    assert len(httpx.get(server.base + "/jobs").json()["jobs"]) == before  # no job for any of them
    # a URL that got into the store anyway is checked again before each attempt
    store = SqliteJobStore(DataPaths(server.data_dir).db)
    job, _ = store.create({"prompt": "x"}, webhook=receiver.url("/ok/c", host="127.0.0.1"), webhook_events=("completed",))
    play_worker(server, job.id)
    deadline = time.time() + 10
    while time.time() < deadline and store.webhook_deliveries(job.id)[0].state == "pending":
        time.sleep(0.1)
    (d,) = store.webhook_deliveries(job.id)
    assert d.state == "failed" and "not allowed" in d.last_error and d.attempts == 1
    assert receiver.on("/ok/c") == []


def test_hanging_receiver_stalls_nothing_else(server, receiver):
    slow = submit(server, receiver.url("/hang/6/d"))
    fast = submit(server, receiver.url("/ok/e"))
    t0 = time.time()
    play_worker(server, slow)
    play_worker(server, fast)
    assert time.time() - t0 < 2  # the worker side only writes to the store
    receiver.wait("/ok/e", 1, timeout=5)
    assert time.time() - t0 < 4 and receiver.on("/hang/6/d") == []  # delivered while the other one hangs
    deadline = time.time() + 10  # the hanging attempt is cut off at WANRT_WEBHOOK_TIMEOUT_S and retried
    while time.time() < deadline:
        (d,) = httpx.get(f"{server.base}/debug/job/{slow}").json()["webhook_deliveries"]
        if d["last_error"]:
            break
        time.sleep(0.2)
    assert "timed out" in d["last_error"] and d["state"] == "pending"


def test_a_restart_between_attempts_still_delivers(tmp_path, receiver):
    env = api_env(WANRT_WEBHOOK_RETRY_S="3,3,3,3")
    srv = WanrtServer(tmp_path / "d", workers=0, **env).start()
    try:
        job = submit(srv, receiver.url("/fail/1/f"))
        play_worker(srv, job)
        receiver.wait("/fail/1/f", 1)  # the first attempt failed; the retry is due 3 s later
    finally:
        assert srv.stop() == 0
    time.sleep(0.5)
    assert len(receiver.on("/fail/1/f")) == 1
    with WanrtServer(tmp_path / "d", workers=0, **env) as again:  # same data dir, new process
        got = receiver.wait("/fail/1/f", 2, code=200)
        assert [g["code"] for g in got] == [500, 200]
        assert got[0]["headers"]["webhook-id"] == got[1]["headers"]["webhook-id"] and got[0]["raw"] == got[1]["raw"]
        assert got[1]["at"] - got[0]["at"] >= 2.9
        (d,) = httpx.get(f"{again.base}/debug/job/{job}").json()["webhook_deliveries"]
        assert d["state"] == "delivered" and d["attempts"] == 2


# ---------------------------------------------------------------------- several API nodes on one store
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_api_nodes_sharing_a_store_never_double_send(kind, tmp_path, receiver, request):
    if kind == "sqlite":
        store = SqliteJobStore(tmp_path / "j.sqlite3")
    else:
        import redis

        from wanrt.jobs.redis_queue import RedisJobStore

        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        store = RedisJobStore(url)
    path = f"/ok/nodes-{kind}"
    ids = []
    for i in range(12):
        job, _ = store.create({"n": i}, webhook=receiver.url(path), webhook_events=("completed",))
        assert store.claim("w", 30).id == job.id and store.complete(job.id, "w", "/x.mp4", {})
        ids.append(job.id)
    settings = Settings(webhook_secret=SECRET, webhook_concurrency=4)

    def render(d):
        return json.dumps({"job_id": d.job_id, "event": d.event}).encode()

    nodes = [WebhookDispatcher(store, settings, render, lambda target, deadline: ["127.0.0.1"], owner=f"node{i}")
             for i in range(3)]
    deadline = time.time() + 20
    while time.time() < deadline and len(receiver.on(path)) < 12:
        threads = [threading.Thread(target=n.poll_once) for n in nodes]  # claim at the same moment
        [t.start() for t in threads]
        [t.join() for t in threads]
        time.sleep(0.05)
    while any(n.in_flight() for n in nodes):
        time.sleep(0.05)
    got = receiver.on(path)
    assert sorted(g["body"]["job_id"] for g in got) == sorted(ids)  # each exactly once
    assert sum(n.sent for n in nodes) == 12 and sum(1 for n in nodes if n.sent) >= 2  # the work was shared
    assert all(store.webhook_deliveries(i)[0].state == "delivered" for i in ids)
    store.close()

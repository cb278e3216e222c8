"""Auth with WANRT_API_KEYS set, against a real `wanrt serve`: every registered route and method is walked.

Protected routes answer 401 without a token and with a wrong one, before any body parsing, image fetch or
store write; open routes (health, schema, playground) answer 200 without one.
"""

import httpx

from wanrt.api.app import create_app
from wanrt.config import Settings

KEYS = "k1,second-key"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
SERVER = {"workers": 0, "WANRT_API_KEYS": KEYS}  # conftest's `server`


def registered_routes(tmp_path) -> list[tuple[str, str, bool]]:
    """(method, concrete path, open) for every route the app registers, path parameters filled in."""
    app = create_app(Settings(data_dir=tmp_path, api_keys=("k",)))
    out = []
    for r in app.routes:
        for handler in getattr(r, "route_handlers", []):
            for method in sorted(set(handler.http_methods) & set(METHODS)):
                path = (r.path_format.replace("{job_id}", "some-job").replace("{file_path}", "index.html")
                        .replace("{path}", "swagger"))
                assert "{" not in path, f"fill in the path parameter of {r.path}"
                out.append((method, path, bool(handler.opt.get("open"))))
    return out


def test_every_route_is_guarded_or_deliberately_open(server, images, tmp_path):
    routes = registered_routes(tmp_path)
    protected = [(m, p) for m, p, is_open in routes if not is_open]
    assert ("POST", "/generate") in protected and ("GET", "/metrics") in protected
    assert ("GET", "/debug/files") in protected and ("GET", "/events/some-job") in protected
    body = {"image_url": images.url("/img.png"), "prompt": "must never run", "width": 256, "height": 256}
    fetched = len(images.seen)  # the module's servers are shared: compare with what was there before, not {}
    with httpx.Client(base_url=server.base, timeout=10) as c:
        kept = c.get("/jobs", headers={"Authorization": "Bearer k1"}).json()["jobs"]
        for method, path in protected:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer k1x"},
                            {"Authorization": "Basic k1"}, {"Authorization": "k1"}):
                # a valid body, a malformed one and a multipart one: all refused before parsing
                for kw in ({"json": body}, {"content": b"{not json"}, {"files": {"image": b"x"}}):
                    r = c.request(method, path, headers=headers, **(kw if method == "POST" else {}))
                    assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                    if method != "HEAD":
                        assert r.json() == {"detail": "Missing or invalid bearer token"}
                    assert r.headers["www-authenticate"] == "Bearer"
                    if method != "POST":
                        break
        for method, path, is_open in routes:
            if is_open and method == "GET":
                assert c.get(path).status_code == 200, path
        assert c.get("/schema/openapi.json").status_code == 200
        # nothing was fetched and nothing was written
        assert len(images.seen) == fetched
        jobs = c.get("/jobs", headers={"Authorization": "Bearer second-key"})
        assert jobs.status_code == 200 and jobs.json()["jobs"] == kept
        # and a valid token works on every protected GET that needs no job
        for method, path in protected:
            if method == "GET" and "some-job" not in path:
                assert c.get(path, headers={"Authorization": "Bearer k1"}).status_code == 200, path


def test_valid_token_submits_and_idempotency_is_scoped_per_key(server, images):
    body = {"image_url": images.url("/img.png"), "prompt": "x", "width": 256, "height": 256, "frames": 16, "steps": 1}
    with httpx.Client(base_url=server.base, timeout=30) as c:
        a = c.post("/generate", json=body, headers={"Authorization": "Bearer k1", "Idempotency-Key": "same"})
        assert a.status_code == 200, a.text
        again = c.post("/generate", json=body, headers={"Authorization": "Bearer k1", "Idempotency-Key": "same"})
        assert again.json()["job_id"] == a.json()["job_id"]
        other = c.post("/generate", json=body, headers={"Authorization": "Bearer second-key", "Idempotency-Key": "same"})
        assert other.status_code == 200 and other.json()["job_id"] != a.json()["job_id"]  # another key's namespace
        changed = c.post("/generate", json={**body, "prompt": "y"},
                         headers={"Authorization": "Bearer k1", "Idempotency-Key": "same"})
        assert changed.status_code == 422
        assert changed.json() == {"detail": "Idempotency-Key reused with a different request"}
        st = c.get(f"/status/{a.json()['job_id']}", headers={"Authorization": "Bearer k1"}).json()
        assert "request_fingerprint" not in st["params"]

"""A small typed client for the wanrt API (httpx).

    from wanrt.client import WanrtClient
    with WanrtClient("http://localhost:8189") as c:
        job = c.generate(image_url="https://example.com/cat.jpg", prompt="a cat turning its head", wait=True)
        c.download(job["job_id"], "cat.mp4")
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import httpx

TERMINAL = ("completed", "error", "cancelled")
WebhookEvent = Literal["completed", "error", "cancelled", "progress"]


class WanrtError(RuntimeError):
    def __init__(self, status_code: int, detail: str):
        super().__init__(f"{status_code}: {detail}")
        self.status_code, self.detail = status_code, detail


class WanrtClient:
    def __init__(self, base_url: str = "http://localhost:8189", api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> "WanrtClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except Exception:
                detail = r.text
            raise WanrtError(r.status_code, detail)
        return r.json()

    # ------------------------------------------------------------------ endpoints
    def health(self) -> dict:
        return self._check(self.http.get("/"))

    def generate(self, prompt: str, image_url: str | None = None, image_path: str | Path | None = None, *,
                 wait: bool = False, progress: bool = True, poll_s: float = 1.0, timeout_s: float | None = None,
                 idempotency_key: str | None = None, webhook: str | None = None,
                 webhook_events: Sequence[WebhookEvent] | None = None,
                 loras: Sequence[Mapping[str, Any]] | None = None, **params: Any) -> dict:
        """Queue a job (by URL or by uploading a file); with wait=True, block until it ends and return its
        final status (raises WanrtError when it ends in error). `webhook`: an https URL that gets the job's
        status JSON, signed, on `webhook_events` (default completed, error, cancelled; the README's "Webhooks")."""
        if (image_url is None) == (image_path is None):
            raise ValueError("give exactly one of image_url or image_path")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if webhook is not None:
            params["webhook"] = webhook
        if webhook_events is not None:
            params["webhook_events"] = list(webhook_events)
        if loras is not None:  # [{"name": ..., "strength": ..., "expert": ...}], names from loras()
            params["loras"] = [dict(x) for x in loras]
        if image_path is not None:
            path = Path(image_path)
            files = {"image": (path.name, path.read_bytes())}
            data = {"prompt": prompt, **{k: json.dumps(v) if k == "loras" else ",".join(v) if isinstance(v, list)
                                         else str(v) for k, v in params.items()}}
            job = self._check(self.http.post("/generate", files=files, data=data, headers=headers))
        else:
            job = self._check(self.http.post("/generate", json={"image_url": image_url, "prompt": prompt, **params},
                                             headers=headers))
        return self.wait(job["job_id"], progress=progress, poll_s=poll_s, timeout_s=timeout_s) if wait else job

    def loras(self) -> dict:
        """The LoRAs the server's workers serve: {"loras": [{name, format, rank, experts, layers, sha256, ...}],
        "available": [names]}."""
        return self._check(self.http.get("/loras"))

    def status(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/status/{job_id}"))

    def wait(self, job_id: str, progress: bool = True, poll_s: float = 1.0, timeout_s: float | None = None) -> dict:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=100, desc=job_id[:8], unit="%", bar_format="{desc} {l_bar}{bar}| {n:.0f}/100 {postfix}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                st = self.status(job_id)
                if bar is not None:
                    bar.n = st.get("progress", 0) or 0
                    bar.set_postfix_str(st["status"] + (f" #{st['queue_position']}" if st.get("queue_position") else ""))
                    bar.refresh()
                if st["status"] in TERMINAL:
                    if st["status"] != "completed":
                        raise WanrtError(200, f"job {job_id} ended as {st['status']}: {st.get('error')}")
                    return {"job_id": job_id, **st}
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {st['status']} after {timeout_s} s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()

    def preview(self, job_id: str) -> bytes | None:
        """The job's latest live preview (animated WebP), or None before the first denoising step."""
        r = self.http.get(f"/preview/{job_id}")
        if r.status_code == 404 and "preview" in r.text.lower():
            return None
        if r.status_code >= 400:
            self._check(r)
        return r.content

    def download(self, job_id: str, path: str | Path) -> Path:
        path = Path(path)
        with self.http.stream("GET", f"/download/{job_id}") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            with open(path, "wb") as fh:
                for chunk in r.iter_bytes():
                    fh.write(chunk)
        return path

    def jobs(self, status: str | None = None, limit: int | None = None, offset: int = 0) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "offset": offset or None}.items() if v is not None}
        return self._check(self.http.get("/jobs", params=params))

    def delete(self, job_id: str) -> dict:
        return self._check(self.http.delete(f"/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        """Cancel and keep the record: the job's status body (`processing` + `cancel_requested` while its worker
        stops); WanrtError 409 once it has finished."""
        return self._check(self.http.post(f"/jobs/{job_id}/cancel"))

"""`wanrt serve`: the API in this process, worker processes beside it (restarted if they die)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("wanrt.server")


class WorkerSupervisor:
    """Keeps `count` worker processes alive; a worker that dies (OOM, kill -9) is started again and
    re-queues its orphaned job at start."""

    def __init__(self, settings, count: int):
        self.settings, self.count = settings, count
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.stopping = threading.Event()
        self.restarts = 0
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def worker_id(self, slot: int) -> str:
        """The same for every start of this slot of this `serve` (a restarted worker re-queues its orphans at once),
        and apart from another `serve` with this nodename (two on one host, containers with host networking): the
        port it serves on and its data dir tell them apart. One id for two workers would let each heartbeat, and
        release as an orphan, the other's job."""
        data = hashlib.sha256(str(Path(self.settings.data_dir).resolve()).encode()).hexdigest()[:8]
        return f"{os.uname().nodename}-{self.settings.port}-{data}-w{slot}"

    def _spawn(self, slot: int) -> subprocess.Popen:
        env = {**os.environ, **self.settings.to_env(), "WANRT_SUPERVISOR_PID": str(os.getpid())}
        cmd = [sys.executable, "-m", "wanrt.cli", "worker", "--worker-id", self.worker_id(slot)]
        n = self.settings.gpus_per_worker
        if n > 1:  # a worker group over GPUs slot*n .. slot*n+n-1
            cmd += ["--gpus", ",".join(str(slot * n + i) for i in range(n))]
        elif self.count > 1 and self.settings.device in ("auto", "cuda"):  # one worker per GPU
            cmd += ["--gpu", str(slot)]
        return subprocess.Popen(cmd, env=env)

    def start(self) -> "WorkerSupervisor":
        for i in range(self.count):
            self.procs[i] = self._spawn(i)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None and not self.stopping.is_set():
                    if p.returncode == 2:  # a usage error (bad settings): starting it again cannot help
                        log.error("worker %d refused its settings (exit 2); not restarting it", i)
                        self.procs[i] = None
                        continue
                    log.warning("worker %d exited with %s; starting it again", i, p.returncode)
                    self.restarts += 1
                    self.procs[i] = self._spawn(i)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM: each worker stops at the next step and re-queues its job; kill after `timeout`."""
        self.stopping.set()
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


def serve(settings) -> int:
    import uvicorn

    from wanrt.api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings)
    supervisor = WorkerSupervisor(settings, settings.workers).start() if settings.workers > 0 else None
    # uvicorn handles SIGTERM/SIGINT (stops accepting, finishes in-flight requests) and then re-raises the
    # signal to the handler that was there before: make that one a no-op so we go on to drain the workers.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0

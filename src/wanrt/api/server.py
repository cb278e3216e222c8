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

from wanrt.jobs import backoff_s

log = logging.getLogger("wanrt.server")


class WorkerSupervisor:
    """Keeps `count` worker processes alive; a worker that dies (OOM, kill -9) is started again and
    re-queues its orphaned job at start."""

    QUICK_EXIT_S = 120.0  # a worker that dies sooner than this after its start failed to start (or at once)
    BACKOFF_S = (1.0, 60.0)  # the wait before restarting it: doubling from the first, at most the second (never
    # given up: what failed may come back, a Redis not up yet; a usage error exits 2 and is not restarted)

    def __init__(self, settings, count: int):
        self.settings, self.count = settings, count
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.started = [0.0] * count
        self.quick_exits = [0] * count
        self.due = [0.0] * count  # monotonic time of a pending restart (0: none)
        self.stopping = threading.Event()
        self._spawning = threading.Lock()  # a restart and the stop signal never cross: no worker missed by SIGTERM
        self.restarts = 0
        self.gpu_count = _gpu_count() if count > 1 and settings.device in ("auto", "cuda") else 0
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
        elif self.gpu_count:  # one worker per GPU (none seen: CPU workers, as the device 'auto' says)
            cmd += ["--gpu", str(slot % self.gpu_count)]
        self.started[slot] = time.monotonic()
        return subprocess.Popen(cmd, env=env)

    def start(self) -> "WorkerSupervisor":
        if self.gpu_count and self.count > self.gpu_count:
            log.warning("%d workers on %d GPUs: some GPUs run two (each with a model of its own)", self.count,
                        self.gpu_count)
        for i in range(self.count):
            self.procs[i] = self._spawn(i)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self.stopping.wait(0.5):
            for i, p in enumerate(self.procs):
                if self.stopping.is_set():
                    return
                if self.due[i] and time.monotonic() >= self.due[i]:
                    with self._spawning:
                        if self.stopping.is_set():
                            return
                        self.due[i] = 0.0
                        self.restarts += 1
                        self.procs[i] = self._spawn(i)
                elif p is not None and p.poll() is not None and not self.due[i]:
                    self._exited(i, p.returncode)

    def _exited(self, i: int, code: int) -> None:
        if code == 2:  # a usage error (bad settings, no such model): starting it again cannot help
            log.error("worker %d refused its settings (exit 2); not restarting it", i)
            self.procs[i] = None
            return
        quick = time.monotonic() - self.started[i] < self.QUICK_EXIT_S
        self.quick_exits[i] = self.quick_exits[i] + 1 if quick else 0
        # each restart re-loads the model: never a tight loop
        wait = backoff_s(self.quick_exits[i] if quick else 1, *self.BACKOFF_S)
        (log.error if wait >= self.BACKOFF_S[1] else log.warning)(
            "worker %d exited with %s (%d time(s) in a row within %.0f s of its start); starting it again in %.0f s",
            i, code, max(1, self.quick_exits[i]), self.QUICK_EXIT_S, wait)
        self.due[i] = time.monotonic() + wait

    def signal_stop(self) -> None:
        """At the signal, before the API drains its connections: each worker stops at its next step and re-queues
        its job while the container still has time (docker stop waits 10 s), and none is restarted."""
        with self._spawning:
            self.stopping.set()
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM: each worker stops at the next step and re-queues its job; kill after `timeout`."""
        self.signal_stop()
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

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the workers hear of it now, not after up to 10 s of draining
            if supervisor is not None:
                supervisor.signal_stop()
            super().handle_exit(sig, frame)

    # uvicorn handles SIGTERM/SIGINT (stops accepting, finishes in-flight requests) and then re-raises the
    # signal to the handler that was there before: make that one a no-op so we go on to drain the workers.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                              timeout_graceful_shutdown=10)).run()
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def _gpu_count() -> int:
    """NVIDIA GPUs NVML sees (0 without a driver): the API process never imports torch."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0

"""Worker groups: one job runner over N processes (one per GPU) for one video at a time.

`wanrt worker --gpus 0,1,2,3` runs a GroupLauncher: it starts one process per GPU (rank r on GPU gpus[r]; on
CPU, gloo instead of NCCL), supervises them and starts the whole group again when any rank dies.

- Rank 0 is an ordinary Worker (claim, lease, heartbeat, progress, cancel, SIGTERM -> re-queue) whose pipeline
  backend is a ParallelBackend: each denoise call is broadcast to the other ranks, which run `follow()`.
  A cancel stops rank 0 between steps, so the other ranks simply get no further forward.
- A rank's death: the survivors are blocked in (or fail) a collective; the launcher SIGKILLs every rank left
  and starts a new generation. The job stays leased to rank 0's worker id, which is stable across generations,
  so the new rank 0 re-queues it at start (release_orphans) and runs it again (attempts are counted as for any
  lost worker). Nothing was written: only rank 0 writes the MP4, atomically, after the loop.
- Start-up refusals (heads that do not divide, a backend that cannot be split) end the launcher with the
  reason instead of restarting; a group that dies before it is ready three times in a row ends it too.
- Ranks are forked from a forkserver that imported torch and diffusers once, so a restart costs the model
  load, not the imports. Each rank watches a pipe from the launcher: when the launcher dies, rank 0 stops
  gracefully (re-queueing its job) and the others leave once rank 0 releases them (or after a grace period).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import wait as wait_any
from pathlib import Path

from wanrt.runtime.parallel import EXIT_BROKEN, WAN_A14B_HEADS, GroupConfigError, check_group_size

log = logging.getLogger("wanrt.group")

EXIT_CONFIG = 78  # EX_CONFIG: refused at start-up; restarting would not help
GROUP_TIMEOUT_S = 30 * 60  # one collective may wait this long (a first torch.compile on a slow rank)
KEEPALIVE_S = 60.0  # idle rank 0 pings the others well inside GROUP_TIMEOUT_S
FOLLOWER_GRACE_S = 120.0  # launcher gone: how long the other ranks wait for rank 0 to release them
# Imported once by the forkserver, so that every rank (and every restart) starts without paying for them.
PRELOAD = ["torch", "torch.distributed", "wanrt.runtime.parallel", "wanrt.runtime.pipeline", "wanrt.jobs.worker",
           "diffusers.models.transformers.transformer_wan", "diffusers.models.autoencoders.autoencoder_kl_wan",
           "transformers.models.umt5.modeling_umt5", "wanrt.model.tiny", "wanrt.runtime.factory"]


def model_heads(spec: str) -> int:
    """Attention heads of the experts a model spec names, from its config alone (nothing is loaded)."""
    if spec == "tiny":
        from wanrt.model.tiny import TINY_TRANSFORMER_CONFIG

        return int(TINY_TRANSFORMER_CONFIG["num_attention_heads"])
    root = Path(spec)
    for cfg in [root / "transformer" / "config.json", root / "config.json", *sorted(root.glob("*/config.json"))]:
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        heads = data.get("num_attention_heads", data.get("num_heads"))
        if heads:
            return int(heads)
    return WAN_A14B_HEADS  # random-full, single files without a config: the A14B


def rank_device(device: str, gpu: str) -> str:
    """A rank's device: GPU `gpu` unless the settings ask for the CPU (or there is no CUDA)."""
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise GroupConfigError(f"device {device!r} asked for but CUDA is not available")
        return "cpu"
    return f"cuda:{int(gpu)}"


def default_worker_id(gpus) -> str:
    """Stable across launcher restarts, so a new launcher re-queues the job its previous life left, and unique to
    the physical GPUs: two containers on one host (host networking shares the hostname) each see their own GPUs
    as 0,1; with hostname and indices alone they shared one id and re-queued each other's running jobs."""
    uuids = gpu_uuids(gpus) or []
    # a container given MIG slices of one GPU sees the parent's UUID through NVML: the runtime's own list
    # (NVIDIA_VISIBLE_DEVICES, MIG UUIDs there) tells the containers apart
    given = os.environ.get("NVIDIA_VISIBLE_DEVICES", "")
    names = uuids + ([given] if given not in ("", "all", "none", "void") else [])
    tail = f"-{hashlib.sha1(','.join(names).encode()).hexdigest()[:8]}" if names else ""
    return f"{socket.gethostname()}-gpus{'-'.join(str(g) for g in gpus)}{tail}"


def gpu_uuids(gpus) -> list[str] | None:
    """The UUIDs of CUDA devices `gpus`, read through CUDA_VISIBLE_DEVICES (whose entries may be UUIDs already),
    from NVML otherwise; None where they cannot be known (no driver, an index past the visible list)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible else None
    names = []
    for g in gpus:
        if entries is None:
            names.append(str(g))
        elif str(g).isdigit() and int(g) < len(entries):
            names.append(entries[int(g)])
        else:
            return None
    if all(n.startswith(("GPU-", "MIG-")) for n in names):
        return names
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver (CPU groups): hostname and indices name the group
        return None
    try:
        out = []
        for n in names:
            if not n.startswith(("GPU-", "MIG-")):
                n = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(int(n)))
            out.append(n.decode() if isinstance(n, bytes) else n)
        return out
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # an id must come out of this, whatever NVML says on the way out
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GroupLauncher:
    """Starts the ranks of one worker group and keeps the group alive. `factory(settings) -> pipeline` builds
    each rank's runtime (default: wanrt.runtime.factory.build_runtime); it must be picklable by reference."""

    def __init__(self, settings, gpus, worker_id: str | None = None, factory=None, restart_delay_s: float = 1.0,
                 max_startup_failures: int = 3, stop_timeout_s: float = 120.0):
        self.settings, self.gpus = settings, [str(g) for g in gpus]
        self.world = len(self.gpus)
        self.worker_id = worker_id or default_worker_id(self.gpus)
        self.factory = factory
        self.restart_delay_s, self.max_startup_failures = restart_delay_s, max_startup_failures
        self.stop_timeout_s = stop_timeout_s
        self.generation, self.restarts = 0, 0
        self.pids: list[int] = []
        self._stop = threading.Event()

    def stop(self) -> None:
        """Graceful: rank 0 finishes the current step, re-queues its job and releases the others."""
        self._stop.set()

    def check(self) -> None:
        """GroupConfigError now, before any process starts, for what the settings alone can tell."""
        if self.world < 2:
            raise GroupConfigError("a worker group needs at least 2 GPUs (one GPU: a plain worker)")
        if len(set(self.gpus)) != self.world:
            raise GroupConfigError(f"GPUs {','.join(self.gpus)}: each GPU may appear once in a group")
        if self.factory is None:  # the ranks check again on the built model; this answers before loading it
            check_group_size(model_heads(self.settings.model), self.world)

    def run(self) -> int:
        self.check()
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        startup_failures = 0
        while True:
            outcome, ready, error = self._run_generation(ctx)
            if error is not None:
                raise GroupConfigError(error)
            if outcome == "stopped" or self._stop.is_set():
                return 0
            if not ready:
                startup_failures += 1
                if startup_failures >= self.max_startup_failures:
                    log.error("worker group %s died %d times before it was ready; giving up", self.worker_id,
                              startup_failures)
                    return 1
            else:
                startup_failures = 0
            self.restarts += 1
            self.generation += 1
            log.warning("worker group %s: a rank died (%s); starting generation %d", self.worker_id, outcome,
                        self.generation)
            if self._stop.wait(self.restart_delay_s * (2 ** startup_failures if startup_failures else 1)):
                return 0

    def _run_generation(self, ctx) -> tuple[str, bool, str | None]:
        port = _free_port()
        events = ctx.SimpleQueue()
        alive_r, alive_w = ctx.Pipe(duplex=False)
        procs = [ctx.Process(target=_rank_main, name=f"wanrt-group-g{self.generation}-r{rank}",
                             args=(rank, self.world, port, self.settings, self.gpus[rank], self.worker_id,
                                   self.generation, self.factory, events, alive_r))
                 for rank in range(self.world)]
        for p in procs:
            p.start()
        alive_r.close()
        self.pids = [p.pid for p in procs]
        log.info("worker group %s generation %d: ranks %s", self.worker_id, self.generation, self.pids)
        ready, error, outcome = False, None, "running"
        stop_deadline = None
        try:
            while outcome == "running":
                wait_any([p.sentinel for p in procs], timeout=0.25)
                ready, error = self._drain(events, ready, error)
                if self._stop.is_set() and stop_deadline is None:
                    stop_deadline = time.monotonic() + self.stop_timeout_s
                    if procs[0].exitcode is None:
                        os.kill(procs[0].pid, signal.SIGTERM)
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    log.warning("worker group %s did not stop in %.0f s; killing it", self.worker_id, self.stop_timeout_s)
                    outcome = "stopped"
                elif procs[0].exitcode == 0:  # rank 0 stopped on its own terms and released the others
                    for p in procs[1:]:
                        p.join(30)
                    outcome = "stopped"
                elif any(p.exitcode is not None for p in procs):
                    dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
                    outcome = ", ".join(f"rank {r} exit {_describe_exit(c)}" for r, c in dead)
        finally:
            for p in procs:  # processes this launcher started, by pid
                if p.exitcode is None:
                    p.kill()
            for p in procs:
                p.join(30)
            ready, error = self._drain(events, ready, error)
            alive_w.close()
            events.close()
        return outcome, ready, error

    def _drain(self, events, ready: bool, error: str | None) -> tuple[bool, str | None]:
        while not events.empty():
            kind, *rest = events.get()
            if kind == "ready":
                ready = True
            elif kind == "config" and error is None:
                error = f"rank {rest[0]}: {rest[1]}"
        return ready, error


def _describe_exit(code: int) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return {EXIT_BROKEN: f"{code} (left the group)", EXIT_CONFIG: f"{code} (refused to start)"}.get(code, str(code))


# ------------------------------------------------------------------------------------------------ ranks
def _rank_main(rank: int, world: int, port: int, settings, gpu: str, worker_id: str, generation: int, factory,
               events, alive) -> None:
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s %(name)s[g{generation} r{rank}] %(levelname)s %(message)s")
    if rank:  # only rank 0 acts on signals; the others stop when it releases them (or are killed)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from wanrt.runtime.parallel import ParallelBackend

    try:
        device = rank_device(settings.device, gpu)
    except GroupConfigError as e:
        events.put(("config", rank, str(e)))
        os._exit(EXIT_CONFIG)
    if device.startswith("cuda"):
        from wanrt.runtime.gpus import prefer_expandable_segments

        prefer_expandable_segments()  # before set_device starts CUDA (build_runtime would be too late)
        torch.cuda.set_device(torch.device(device))
    else:  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    settings = settings.replace(device=device, concurrency=1)
    if settings.resolved_backend() == "compiled" and settings.cudagraphs and device.startswith("cuda"):
        # Capturing NCCL collectives in inductor's CUDA graphs is unverified here (no multi-GPU machine).
        log.info("worker group: CUDA graphs off (the graphs would hold the all-to-alls)")
        settings = settings.replace(cudagraphs=False)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    if factory is None:
        from wanrt.runtime.factory import build_runtime as factory
    pipeline = factory(settings)
    try:
        backend = ParallelBackend(pipeline.backend, device=pipeline.device, generation=generation)
    except GroupConfigError as e:
        events.put(("config", rank, str(e)))
        os._exit(EXIT_CONFIG)
    pipeline.backend = backend
    backend.loras = getattr(pipeline, "loras", None)  # the slots the factory installed on this rank's experts
    if rank == 0 and backend.loras is not None:
        backend.loras.on_apply = backend.send_loras
    if rank == 0:
        events.put(("ready", generation))
        _run_leader(settings, worker_id, pipeline, backend, alive)
    else:
        _run_follower(pipeline, backend, alive)
    dist.destroy_process_group()


def _run_leader(settings, worker_id: str, pipeline, backend, alive) -> None:
    from wanrt.jobs.worker import Worker

    worker = Worker(settings, worker_id, pipeline=pipeline)

    def stop(signum, frame):
        log.info("signal %s: finishing the current step, re-queueing the job, releasing the group", signum)
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _watch_launcher(alive, worker.shutdown.set)
    backend.start_keepalive(KEEPALIVE_S)
    try:
        worker.run()
    finally:
        backend.close()


def _run_follower(pipeline, backend, alive) -> None:
    # Only rank 0 encodes text and decodes video: drop those here (UMT5-XXL alone is 11 GB in BF16).
    pipeline.model.text_encoder = pipeline.model.vae = None
    import gc

    gc.collect()
    if backend.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    def leave_later():
        timer = threading.Timer(FOLLOWER_GRACE_S, os._exit, (EXIT_BROKEN,))
        timer.daemon = True
        timer.start()

    _watch_launcher(alive, leave_later)
    n = backend.follow()
    log.info("released by rank 0 after %d forwards", n)


def _watch_launcher(alive, on_gone) -> None:
    """`alive` reads EOF when the launcher is gone (it holds the only write end)."""

    def watch():
        try:
            alive.recv()
        except (EOFError, OSError):
            pass
        log.warning("the group launcher is gone")
        on_gone()

    threading.Thread(target=watch, name="wanrt-launcher-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------------ CLI entry
def run_group_worker(settings, worker_id: str | None = None, gpus=None) -> int:
    """`wanrt worker --gpus 0,1,...`: one GPU runs a plain worker, several a worker group."""
    gpus = list(settings.gpus if gpus is None else gpus)
    if len(gpus) <= 1:
        from wanrt.jobs.worker import run_worker

        if gpus and settings.device in ("auto", "cuda"):
            settings = settings.replace(device=f"cuda:{int(gpus[0])}")
        return run_worker(settings, worker_id)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.concurrency != 1:
        log.warning("a worker group runs one job at a time (concurrency %d ignored)", settings.concurrency)
    launcher = GroupLauncher(settings, gpus, worker_id)
    try:
        launcher.check()
    except GroupConfigError as e:
        print(f"wanrt worker: error: {e}", file=sys.stderr)
        return 2

    def stop(signum, frame):
        log.info("signal %s: stopping the worker group", signum)
        launcher.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent = os.environ.get("WANRT_SUPERVISOR_PID")
    if parent:  # started by `wanrt serve`: never outlive it

        def watch_parent():
            while not launcher._stop.wait(1.0):
                if os.getppid() != int(parent):
                    log.warning("supervisor %s is gone; stopping", parent)
                    launcher.stop()

        threading.Thread(target=watch_parent, daemon=True).start()
    try:
        return launcher.run()
    except GroupConfigError as e:
        print(f"wanrt worker: error: {e}", file=sys.stderr)
        return 2

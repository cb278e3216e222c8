"""One worker process per GPU: owns the model, claims jobs, runs the runtime, heartbeats, reports progress.

Never speaks HTTP. A worker killed mid-job leaves the job to be claimed again when its lease runs out (or
at once by its own restart, which releases its orphans: with a stable --worker-id, as `wanrt serve` gives its
workers; the default id is new each run); SIGTERM stops at the next step and re-queues. A store that is away
when a job ends is retried for about a lease, never turned into the job's failure.
Each run of a job writes a live preview after every denoising step (settings.preview) and records the device
seconds it used per stage (and their cost) before the job's outcome, so that the outcome's webhook carries them.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import threading
import time
import uuid

from PIL import Image

from wanrt.jobs import backoff_s, open_store
from wanrt.jobs.paths import DataPaths, fsync_dir
from wanrt.jobs.protocol import JobStore
from wanrt.jobs.store import Job
from wanrt.lora_request import REPORT_EVERY_S
from wanrt.params import GenerateParams, ParamError

log = logging.getLogger("wanrt.worker")


class _NotRecorded(Exception):
    """The store stayed away while a job ended: the job is left to be claimed again once its lease lapses."""


class _JobControl:
    """Shared between the sampling thread and the heartbeat thread of one job."""

    def __init__(self):
        self.progress, self.stage = 0.0, "starting"
        self.stop = threading.Event()  # cancelled, deleted, or lost the lease
        self.done = threading.Event()


class Worker:
    def __init__(self, settings, worker_id: str | None = None, store: JobStore | None = None, pipeline=None):
        self.settings = settings
        self.paths = DataPaths(settings.data_dir).ensure()
        self.store = store or open_store(settings, self.paths.db)
        # hostname-pid alone repeats (containers with host networking share the hostname, and each runs as PID 1):
        # two workers with one id heartbeat each other's jobs and release them as orphans
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pipeline = pipeline
        self.shutdown = threading.Event()
        self._lock = threading.Lock()  # the slots' threads share the counter
        self.jobs_done = 0
        self.warmup_s: dict[str, float] = {}  # seconds per warm-up bucket (compiles included)
        self._states: dict[str, tuple] = {}  # slot's worker id -> (pipeline, state, job id): what _keep_reporting re-sends
        self._report_lock = threading.Lock()
        self.slots = 1  # concurrent jobs (settings.concurrency where the memory tier allows it): set by run()

    @property
    def pipeline(self):
        if self._pipeline is None:
            from wanrt.runtime.factory import build_runtime

            self._pipeline = build_runtime(self.settings)
        return self._pipeline

    # ------------------------------------------------------------------ loop
    def run(self, poll_s: float = 0.2, max_jobs: int | None = None) -> None:
        pipeline = self.pipeline  # load the model (and compile the warm-up buckets) before claiming anything
        buckets = self.settings.resolved_warmup()
        if not self.settings.warmup and not compiles(pipeline):  # the default warm-up is for compiles only: a
            buckets = ()  # streamed tier's (compile off) would be minutes of forwards for nothing
        done = threading.Event()  # the slots have ended: so do the re-sends
        reporter = threading.Thread(target=self._keep_reporting, args=(REPORT_EVERY_S, done), daemon=True)
        if buckets:  # (re-sent while it compiles: /debug/workers shows a worker that is there, not yet claiming)
            self._report(self.worker_id, pipeline, "warming_up")
        reporter.start()
        threads = []
        try:
            self.warmup_s = warm_up(pipeline, buckets, should_stop=self.shutdown.is_set)
            threads = self._start_slots(pipeline, poll_s, max_jobs)
            self._slot_loop(pipeline, poll_s, max_jobs, 0)
        except BaseException:  # Ctrl-C or a bug out of slot 0: the other slots stop too, or the joins hang
            self.shutdown.set()
            raise
        finally:
            for t in threads:
                t.join()
            done.set()
            reporter.join(timeout=10)

    def _start_slots(self, pipeline, poll_s: float, max_jobs: int | None) -> list[threading.Thread]:
        """Slots 1.. (settings.concurrency where the tier and switches allow it), started; slot 0 is the caller."""
        released = self.store.release_orphans(self.worker_id)
        if released:
            log.warning("re-queued %d job(s) left by a previous run of %s", released, self.worker_id)
        from wanrt.runtime.memory import tiered

        slots = self.slots = max(1, int(self.settings.concurrency))
        tier = getattr(tiered(pipeline.backend), "tier", "resident")
        if slots > 1 and tier != "resident":  # swaps, streams and engine switches serve one request at a time
            log.warning("concurrency %d needs the resident memory tier; this plan is %s: running one slot", slots, tier)
            slots = self.slots = 1
        if slots > 1 and self.settings.resolved_backend() == "compiled" and self.settings.cudagraphs:
            # a graph tree's generation mark is process-wide: one slot's call would start a new generation under
            # another slot's forward (and each thread records graphs of its own, with a pool of its own)
            log.warning("concurrency %d with CUDA graphs: running one slot", slots)
            slots = self.slots = 1
        pipelines = [pipeline] + [self._clone_for_concurrency(pipeline) for _ in range(slots - 1)]
        # slot 0 runs in run(), on the thread that warmed up: CUDA graph trees are per thread, so graphs captured
        # in warm-up serve only this one (another thread records its own, with a private pool of its own)
        threads = [threading.Thread(target=self._slot_loop, args=(p, poll_s, max_jobs, i), daemon=True)
                   for i, p in enumerate(pipelines) if i]
        for t in threads:
            t.start()
        return threads

    def _report(self, worker_id: str, pipeline, state: str, job_id: str | None = None) -> bool:
        """Publish this slot's state, backend, memory (capacity: the API's 422) and LoRA library (GET /loras, the
        API's name checks). Re-sent every REPORT_EVERY_S by _keep_reporting: the API takes a worker whose report
        is older than LIVE_REPORT_S for gone, and one that is idle, or busy on a long job, is not."""
        with self._report_lock:  # a re-send never lands after (and over) a slot's newer report, 'stopped' included
            self._states[worker_id] = (pipeline, state, job_id)
            return self._send_report(worker_id)

    def _send_report(self, worker_id: str) -> bool:
        """Send a slot's last state with its backend, memory and LoRA library as they are now (under _report_lock)."""
        from wanrt.runtime.memory import worker_memory_info

        pipeline, state, job_id = self._states[worker_id]
        try:
            backend = pipeline.backend
            info = {"state": state, "pid": os.getpid(), "device": str(pipeline.device), "dtype": str(pipeline.dtype),
                    "model": self.settings.model, "jobs_done": self.jobs_done, "warmup_s": self.warmup_s,
                    "deterministic": self.settings.deterministic,
                    "backend": backend.describe() if hasattr(backend, "describe") else {"backend": getattr(backend, "name", "?")},
                    "memory": worker_memory_info(pipeline)}  # tier, plan, capacity (the API's 422 reads it), projection
            if job_id is not None:
                info["job_id"] = job_id
            if getattr(pipeline, "loras", None) is not None:
                info["loras"] = pipeline.loras.describe()
            self.store.report_worker(worker_id, info)
            return True
        except Exception as e:  # a report read mid-update by a job's thread, or the store away: the next one is soon
            log.warning("%s: could not report its state (%s: %s)", worker_id, type(e).__name__, e)
            return False

    def _keep_reporting(self, every_s: float, done: threading.Event) -> None:
        """Re-send each slot's last report every `every_s` until `done` (a slot's last report says 'stopped')."""
        while not done.wait(every_s):
            for worker_id in list(self._states):
                with self._report_lock:
                    if self._states[worker_id][1] != "stopped" and not done.is_set():
                        self._send_report(worker_id)

    def _slot_loop(self, pipeline, poll_s: float, max_jobs: int | None, slot: int) -> None:
        worker_id = self.worker_id if slot == 0 else f"{self.worker_id}/{slot}"
        if getattr(pipeline.device, "type", None) == "cuda":  # the current device is per thread (run_worker set
            import torch  # slot 0's): TensorRT, cuDNN handles use it

            torch.cuda.set_device(pipeline.device)
        try:
            self._claim_loop(pipeline, poll_s, max_jobs, slot, worker_id)
        finally:  # also when the loop raised: a slot that is gone must not be re-reported as live
            self._report(worker_id, pipeline, "stopped")

    CLAIM_BACKOFF_S = (0.5, 10.0)  # first and longest wait after a claim the store could not answer

    def _claim_loop(self, pipeline, poll_s: float, max_jobs: int | None, slot: int, worker_id: str) -> None:
        if slot:
            self.store.release_orphans(worker_id)
        self._report(worker_id, pipeline, "idle")
        scanned, failures = time.monotonic(), 0
        while not self.shutdown.is_set():
            with self._lock:
                if max_jobs is not None and self.jobs_done >= max_jobs:
                    break
            try:
                job = self.store.claim(worker_id, self.settings.lease_s, device=str(pipeline.device),
                                       **self._affinity(pipeline))
            except Exception as e:  # the store away for a while (Redis restarting, SQLite locked): wait, retry
                failures += 1
                wait = backoff_s(failures, *self.CLAIM_BACKOFF_S)
                log.warning("%s: claim failed (%s: %s); retrying in %.1f s", worker_id, type(e).__name__, e, wait)
                self.shutdown.wait(wait)
                continue
            failures = 0
            if job is None:
                if slot == 0 and time.monotonic() - scanned >= self.settings.lora_rescan_s:
                    scanned = time.monotonic()
                    if self._rescan_loras(pipeline):
                        self._report(worker_id, pipeline, "idle")  # files added, changed or removed: publish them
                self.shutdown.wait(poll_s)
                continue
            self._report(worker_id, pipeline, "busy", job.id)
            try:
                self.run_job(job, pipeline, worker_id)
            except _NotRecorded as e:
                log.error("job %s: %s; it is left to be claimed again when its lease lapses", job.id, e)
            except Exception:  # the slot outlives any one job (that one is left to its lease)
                log.exception("%s: job %s did not end cleanly", worker_id, job.id)
            with self._lock:
                self.jobs_done += 1
            self._report(worker_id, pipeline, "idle")

    @staticmethod
    def _clone_for_concurrency(pipeline):
        """Experts and text encoder are shared (inference is thread-safe); the VAE keeps a causal cache
        on the module, so each slot gets its own copy."""
        from wanrt.runtime.pipeline import WanI2VPipeline

        model = copy.copy(pipeline.model)
        model.vae = copy.deepcopy(pipeline.model.vae)
        clone = WanI2VPipeline(model, pipeline.backend, device=pipeline.device, dtype=pipeline.dtype,
                               vae_dtype=getattr(pipeline, "vae_dtype", "auto"))
        clone.mp4_queue = getattr(pipeline, "mp4_queue", clone.mp4_queue)
        clone.loras = getattr(pipeline, "loras", None)  # one set of slots on the shared experts: `using` makes jobs of one set share it
        return clone

    def _affinity(self, pipeline) -> dict:
        """LoRA-set affinity for the claim: prefer a queued job whose set is the loaded one (no swap), within the
        fairness bound (lora_affinity_skip older jobs passed over at most, none that waited lora_affinity_wait_s).
        A worker without LoRA slots claims only jobs without a set (one with a set would fail here)."""
        loras = getattr(pipeline, "loras", None)
        if loras is None:  # no slots: LoRA jobs stay queued for the workers that have them
            return {"serves_loras": False}
        if self.settings.lora_affinity_skip <= 0:
            return {}
        return dict(loaded_key=loras.loaded_key, affinity_skip=self.settings.lora_affinity_skip,
                    affinity_wait_s=self.settings.lora_affinity_wait_s)

    @staticmethod
    def _rescan_loras(pipeline) -> bool:
        """Pick up LoRA files added, changed or removed since the last scan (a stat per file). True on a change."""
        library = getattr(getattr(pipeline, "loras", None), "library", None)
        if library is None:
            return False
        try:
            return any(library.rescan().values())
        except Exception:  # a directory gone or unreadable must not stop the worker
            log.exception("LoRA library rescan failed")
            return False

    # ------------------------------------------------------------------ one job
    def _live_preview(self, job: Job, params: GenerateParams):
        """The job's preview writer, or None with previews off."""
        if not self.settings.preview:
            return None
        from wanrt.runtime.preview import LivePreview

        return LivePreview(self.paths.preview_path(job.id), self.paths.preview_info_path(job.id), fps=params.fps)

    def _record_usage(self, job: Job, timings: dict) -> None:
        """Device seconds per stage of this run (partial when it failed or was cancelled) and their cost."""
        from wanrt.runtime.pipeline import device_seconds

        seconds = device_seconds(timings)
        if not seconds:
            return
        rate = self.settings.gpu_hourly_usd
        cost = None if rate is None else sum(seconds.values()) * rate / 3600.0
        try:
            self.store.add_usage(job.id, {k: round(v, 6) for k, v in seconds.items()}, cost)
        except Exception:  # accounting must not fail the job
            log.exception("job %s: could not record GPU-seconds", job.id)

    def _generate(self, job: Job, pipeline, params: GenerateParams, image, out, **kwargs):
        """pipeline.generate with this job's preview and usage: the preview is closed (its last step written)
        and the usage recorded before the caller completes, fails, cancels or releases the job."""
        preview = self._live_preview(job, params)
        timings: dict = {}
        extra = {"timings": timings, **({"preview": preview} if preview is not None else {})}
        try:
            return pipeline.generate(params, image, out, **kwargs, **extra)
        finally:
            if preview is not None:
                preview.close()
            self._record_usage(job, timings)

    def run_job(self, job: Job, pipeline, worker_id: str) -> str:
        from wanrt.runtime.sampler import Cancelled

        control = _JobControl()
        beat = threading.Thread(target=self._heartbeat, args=(job, worker_id, control), daemon=True)
        beat.start()
        out = self.paths.output_path(job.id)
        outcome = "error"
        try:
            params = GenerateParams.from_dict(job.params)
            image = self._load_input(job)
            log.info("job %s: %s", job.id, {k: v for k, v in job.params.items() if k != "negative_prompt"})

            def progress(value: float, stage: str) -> None:
                control.progress, control.stage = round(value, 1), stage

            def should_cancel() -> bool:
                return control.stop.is_set() or self.shutdown.is_set()

            from wanrt.runtime.memory import run_within_memory

            loras = job.params.get("loras") or None
            if loras:
                self._rescan_loras(pipeline)  # a file added since the last scan

            def attempt():
                return self._generate(job, pipeline, params, image, out, progress=progress, should_cancel=should_cancel,
                                      loras=loras)

            # a request only a leaner tier fits moves there first; an out-of-memory error moves one tier leaner and
            # runs once more (a second one ends the job: classify_error -> out_of_memory). Tiers other than resident
            # are not thread-safe, so concurrent slots run as planned.
            result = run_within_memory(pipeline, params, attempt) if self.slots <= 1 else attempt()
        except Cancelled:
            control.done.set()
            if self.shutdown.is_set() and not control.stop.is_set() and self._record(self.store.release, job.id, worker_id):
                outcome = "released"
            else:  # cancelled or deleted (release refuses those too)
                outcome = self._end_cancelled(job, worker_id) or "lost"
        except Exception as e:  # the job fails, the worker lives on
            control.done.set()
            error_type, retryable = classify_error(e)
            log.exception("job %s failed", job.id)
            if self._record(self.store.fail, job.id, worker_id, f"{type(e).__name__}: {e}"[:2000], error_type, retryable):
                self.paths.remove_job_files(job.id, keep_input=True)
            else:  # cancelled or deleted meanwhile
                self._end_cancelled(job, worker_id)
        else:  # not under the handlers above: the store away now is no failure of the job
            control.done.set()
            timings = {k: round(v, 4) for k, v in result.timings.items()}
            fsync_dir(out.parent)  # the MP4's rename on disk (its bytes already are) before the job says completed
            if self._record(self.store.complete, job.id, worker_id, str(out), timings):
                outcome = "completed"
            else:  # deleted or cancelled meanwhile (end it as such), or re-claimed after a lease lapse: then the files
                # are the new owner's (its .part, previews, MP4) and this run removes none of them
                outcome = self._end_cancelled(job, worker_id) or "lost"
        finally:
            control.done.set()
            beat.join(timeout=5)
        log.info("job %s: %s", job.id, outcome)
        return outcome

    def _record(self, call, *args):
        """A store call that ends a job, retried with backoff while the store is away (Redis restarting, SQLite
        locked) for about a lease: past that the job is claimed again anyway (no heartbeat extends it now). Raises
        _NotRecorded then (at shutdown after about 5 s; run_job's caller logs it)."""
        # stopping (SIGTERM) still tries for a few seconds: a finished video is worth it
        limit = min(self.settings.lease_s, 5.0) if self.shutdown.is_set() else self.settings.lease_s
        deadline, failures = time.monotonic() + limit, 0
        while True:
            try:
                return call(*args)
            except Exception as e:
                failures += 1
                wait = min(backoff_s(failures, *self.CLAIM_BACKOFF_S), deadline - time.monotonic())
                error = f"{call.__name__} failed ({type(e).__name__}: {e})"
                if wait <= 0:
                    raise _NotRecorded(error) from e
                log.warning("job %s: %s; retrying in %.1f s", args[0], error, wait)
                (time.sleep if self.shutdown.is_set() else self.shutdown.wait)(wait)  # set: wait() would not wait

    def _end_cancelled(self, job: Job, worker_id: str) -> str | None:
        """The job was cancelled or deleted while it ran: end it as such and remove its files (the input too
        when deleted). None when it is no longer this worker's."""
        gone = self._record(self.store.finish_cancelled, job.id, worker_id)
        if gone is None:
            return None
        self.paths.remove_job_files(job.id, job.input_image, keep_input=not gone.deleted)
        return "cancelled"

    def _heartbeat(self, job: Job, worker_id: str, control: _JobControl) -> None:
        sent = None
        while not control.done.wait(min(self.settings.heartbeat_s, 0.5) if sent is None else self.settings.heartbeat_s):
            try:
                ok = self.store.heartbeat(job.id, worker_id, self.settings.lease_s, control.progress, control.stage)
                sent = control.progress
            except Exception:  # a busy database must not kill the job; the next beat retries
                log.exception("heartbeat failed")
                continue
            if not ok:
                control.stop.set()

    def _load_input(self, job: Job) -> Image.Image:
        if not job.input_image:
            raise FileNotFoundError("job has no input image")
        path = self.paths.inputs / job.input_image
        with Image.open(path) as img:
            img.seek(0)
            return img.convert("RGB")


def _runtime_backend(pipeline):
    """The backend that runs the forwards, under the memory tier and any wrapper (a worker group's)."""
    from wanrt.runtime.memory import tiered

    t = tiered(pipeline.backend)
    return t.inner if t is not None else pipeline.backend


def _compiled_stat(pipeline, name: str) -> bool:
    """A switch of the compiled backend under the tier (CompiledStats); False for backends without one."""
    return bool(getattr(getattr(_runtime_backend(pipeline), "stats", None), name, False))


def compiles(pipeline) -> bool:
    """The pipeline's backend compiles graphs (a warm-up has something to do beyond running)."""
    return _compiled_stat(pipeline, "compiled")


def warm_up(pipeline, buckets, should_stop=None) -> dict[str, float]:
    """Run each "WxHxF" bucket (loop only) so compiled graphs exist before the first request; {bucket: seconds}.
    Two steps reach both experts; with CUDA graphs each expert needs three calls per shape (cudagraph trees warm
    up, then record, then replay), so six steps. Each run goes through run_within_memory, as a job does: an OOM
    moves the tier one step leaner and runs again; a bucket that still fails is logged and skipped (the worker
    serves, and a job of that size meets the same error as a job, not a worker that exits into a restart loop).
    `should_stop()` (the worker's shutdown) ends it at the next step: a SIGTERM does not wait for every bucket."""
    from wanrt.runtime.memory import run_within_memory
    from wanrt.runtime.sampler import Cancelled

    graphs = _compiled_stat(pipeline, "cudagraphs")
    seconds = {}
    for bucket in buckets:
        w, h, f = (int(v) for v in bucket.lower().split("x"))
        t0 = time.perf_counter()
        try:
            for cfg in (3.5, 1.0):  # batch 2 (CFG) and batch 1 shapes
                params = GenerateParams(prompt="warm-up", width=w, height=h, frames=f, steps=6 if graphs else 2,
                                        cfg_high_noise=cfg, cfg_low_noise=cfg)
                image = Image.new("RGB", (w, h))
                run_within_memory(pipeline, params, lambda p=params, i=image: pipeline.generate(
                    p, i, None, should_cancel=should_stop))
        except Cancelled:
            log.info("warm-up of %s stopped: the worker is shutting down", bucket)
            break
        except Exception as e:
            log.warning("warm-up of %s failed after %.1f s (%s: %s): skipped", bucket, time.perf_counter() - t0,
                        type(e).__name__, str(e)[:300])
            continue
        seconds[bucket] = round(time.perf_counter() - t0, 3)
        log.info("warmed up %s in %.1f s", bucket, seconds[bucket])
    return seconds


def classify_error(e: Exception) -> tuple[str, bool]:
    """Machine-readable error_type and whether retrying the same request may succeed."""
    name = type(e).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return "out_of_memory", True
    if isinstance(e, ParamError):
        return "invalid_params", False
    from wanrt.runtime.lora import LoraError

    if isinstance(e, LoraError):  # unknown, unavailable or too large for the slots: the same request fails again
        return "invalid_lora", False
    if isinstance(e, FileNotFoundError):
        return "input_missing", False
    return "internal_error", True


def run_worker(settings, worker_id: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = Worker(settings, worker_id)

    def stop(signum, frame):
        log.info("signal %s: finishing the current step, re-queueing the job", signum)
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent = os.environ.get("WANRT_SUPERVISOR_PID")
    if parent:  # started by `wanrt serve`: never outlive it (even if it was kill -9'd), loading included
        threading.Thread(target=_exit_with_parent, args=(int(parent), worker), daemon=True).start()
    from wanrt.model.loading import ModelLoadError

    if str(settings.device).startswith("cuda:"):  # worker N's GPU is the current device too: TensorRT engines,
        import torch  # cuDNN handles and anything else that uses it land there

        from wanrt.runtime.gpus import prefer_expandable_segments

        prefer_expandable_segments()  # before set_device starts CUDA (build_runtime would be too late)

        device = torch.device(settings.device)
        if not torch.cuda.is_available() or device.index >= torch.cuda.device_count():  # exit 1: serve retries
            log.error("worker: no GPU %s here (%d visible)", device, torch.cuda.device_count())  # (a driver may
            return 1                                                                           # come back)
        torch.cuda.set_device(device)
    try:
        _ = worker.pipeline  # the runtime the settings ask for, built before anything is claimed
    except ValueError as e:  # settings it refuses (e.g. deterministic with autotune): a usage error, exit 2, which
        log.error("worker: settings refused: %s", e)  # `wanrt serve` does not restart (it could only fail again)
        return 2
    except ModelLoadError as e:  # no such model, or not one we can read: the same
        log.error("worker: cannot load the model: %s", e)
        return 2
    worker.run()
    return 0


def _exit_with_parent(parent_pid: int, worker: Worker) -> None:
    while not worker.shutdown.wait(1.0):
        if os.getppid() != parent_pid:
            if worker._pipeline is None:  # still loading: nothing claimed, nothing to hand back; a new serve's
                log.warning("supervisor %d is gone while loading; exiting", parent_pid)  # worker needs the memory
                os._exit(1)
            log.warning("supervisor %d is gone; stopping", parent_pid)
            worker.shutdown.set()

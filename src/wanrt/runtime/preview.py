"""Live previews: each denoising step's predicted clean latent as a small animated WebP, next to the job.

x0 = x_t - sigma * v (flow matching) is mapped to RGB by a 16x3 linear map plus a bias: the factors ComfyUI
publishes for the Wan 2.1 VAE latent space (comfy/latent_formats.py, class Wan21, `latent_rgb_factors` and
`latent_rgb_factors_bias`; Wan 2.2 A14B uses that VAE). Like ComfyUI's Latent2RGBPreviewer they are applied
to the sampler's normalised latent, and the result in [-1, 1] becomes bytes as ((rgb + 1) / 2).clamp(0, 1) * 255,
truncated. One RGB pixel per latent pixel and latent frame: a 640x640x81 request gives 21 frames of 80x80,
upscaled to 256 px on the long side.

Cost on the sampling thread: the map (16 -> 3 channels, ~13 MFLOP at 640x640x81) and, on CUDA, a copy of a few
hundred KB, both queued on a side stream after an event, so the hot stream never waits for them. A writer
thread waits for the copy, encodes and replaces the file atomically. It runs at a lower CPU priority and rests
a multiple of its last encode's time before the next one (REST_FACTOR): on a GPU run it takes at most a quarter
of one core, on a CPU run a tenth, where torch's threads would otherwise wait on it at every parallel region
(benchmarks/bench_preview.py). Steps that come while it is busy or resting are dropped (the latest wins; close()
writes the last one), so at full size on a GPU (a step takes seconds, an encode ~0.1 s) every step is written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("wanrt.preview")

# ComfyUI comfy/latent_formats.py, class Wan21 (rows: the 16 latent channels; columns: R, G, B).
LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)
MAX_SIDE = 256  # px, the long side of the WebP
QUALITY = 70  # lossy: a 21-frame 256 px preview is ~0.5 MB (478 KB measured at full size)
PIXEL_FRAMES_PER_LATENT = 4  # the VAE's temporal compression: each latent frame stands for 4 video frames
# the writer rests this many times its last encode's duration: busy at most 1/4 (GPU run) or 1/10 (CPU run) of
# the time; a CPU run's compute shares the cores with it
REST_FACTOR = {"cuda": 3.0, "cpu": 9.0}
WRITER_NICE = 10  # the writer thread's niceness (Linux: per thread), below the sampling threads

PreviewFn = Callable[[int, int, torch.Tensor], None]  # (step index, steps, x0 of shape (1, 16, F, h, w))


def rgb_factors(device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(16, 3) factors and (3,) bias as tensors."""
    return (torch.tensor(LATENT_RGB_FACTORS, device=device, dtype=dtype),
            torch.tensor(LATENT_RGB_BIAS, device=device, dtype=dtype))


def latent_to_rgb(x0: torch.Tensor, factors: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 16, F, h, w) or (16, F, h, w) normalised latent -> (F, h, w, 3) uint8, on x0's device."""
    if x0.dim() == 5:
        x0 = x0[0]
    if factors is None or bias is None:
        factors, bias = rgb_factors(x0.device)
    rgb = torch.einsum("cfhw,cr->fhwr", x0.float(), factors) + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8)  # truncates, as ComfyUI's preview_to_image


def preview_size(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the WebP: the latent's aspect ratio, long side max_side."""
    scale = max_side / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_webp(frames: np.ndarray, fps: int = 16, max_side: int = MAX_SIDE, quality: int = QUALITY) -> bytes:
    """(F, h, w, 3) uint8 -> animated WebP bytes, looping, each latent frame shown as long as its 4 video frames.
    (libwebp merges consecutive frames that are identical, extending the first one's duration.)"""
    from PIL import Image

    size = preview_size(frames.shape[1], frames.shape[2], max_side)
    images = [Image.fromarray(f).resize(size, Image.Resampling.BILINEAR) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], loop=0, quality=quality, method=0,
                   duration=max(1, round(1000 * PIXEL_FRAMES_PER_LATENT / max(1, fps))))
    return buf.getvalue()


def _replace(path: Path, data: bytes) -> None:
    # a name of its own: a run whose lease lapsed (it still runs) and the run that re-claimed the job write apart
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)  # (the next step's write would not reuse this name)
        raise


class LivePreview:
    """The preview of one job: call it with each step's x0 (from the sampling thread); close() when the job ends.

    Files: `path` (the WebP) and `info_path` (JSON: step, steps, frames, size, updated_at), both replaced
    atomically, the WebP first."""

    def __init__(self, path: str | Path, info_path: str | Path | None = None, fps: int = 16, max_side: int = MAX_SIDE):
        self.path = Path(path)
        self.info_path = Path(info_path) if info_path else self.path.with_suffix(".json")
        self.fps, self.max_side = fps, max_side
        self._cond = threading.Condition()
        self._pending: tuple | None = None  # (step, steps, frames tensor, ready event or None, host buffer index)
        self._reading: int | None = None  # host buffer the writer is reading
        self._writing = False  # a step taken and not yet written (CPU steps have no buffer index: _reading is None)
        self._closed = False
        self._rest_until = 0.0  # monotonic time before which the writer does not start another encode
        self._rest_factor = REST_FACTOR["cpu"]  # set from x0's device at the first step
        self._factors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stream = None
        self._host: list[torch.Tensor] = []  # two pinned buffers on CUDA: one written while the other is encoded
        self._thread = threading.Thread(target=self._run, name="wanrt-preview", daemon=True)
        self._thread.start()
        # what the benchmark and the tests read
        self.hook_s = self.hook_cpu_s = 0.0  # wall and CPU time spent on the sampling thread
        self.encode_s = self.encode_cpu_s = 0.0  # the writer's (wait for the copy, encode, write)
        self.written = self.dropped = 0
        self.last_bytes = 0

    # ------------------------------------------------------------------ sampling thread
    def __call__(self, step: int, steps: int, x0: torch.Tensor) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        device = x0.device
        if device not in self._factors:
            self._factors[device] = rgb_factors(device)
        factors, bias = self._factors[device]
        self._rest_factor = REST_FACTOR.get(device.type, REST_FACTOR["cpu"])
        frames = None if device.type == "cuda" else latent_to_rgb(x0, factors, bias)
        with self._cond:  # held while queueing, so the writer cannot take a buffer that is being written
            if self._closed:
                return
            if self._pending is not None:
                self.dropped += 1
            item = (frames, None, None) if frames is not None else self._queue_cuda(x0, factors, bias)
            self._pending = (step, steps, *item)
            self._cond.notify_all()
        self.hook_s += time.perf_counter() - t0
        self.hook_cpu_s += time.thread_time() - c0

    def _queue_cuda(self, x0: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor):
        """Map and copy on a side stream that starts when x0 is ready (nothing waits here: both are queued);
        returns (host buffer, ready event, buffer index). Called with the lock held."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(x0.device)
        self._stream.wait_stream(torch.cuda.current_stream(x0.device))
        # a buffer the writer is not reading: the pending step's (not taken yet, so free), else the other one
        index = self._pending[4] if self._pending is not None else (1 if self._reading == 0 else 0)
        with torch.cuda.stream(self._stream):
            rgb = latent_to_rgb(x0, factors, bias)
            if not self._host or self._host[0].shape != rgb.shape:
                self._host = [torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._host[index].copy_(rgb, non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # the writer sleeps on it instead of spinning a core
            ready.record(self._stream)
        x0.record_stream(self._stream)  # x0's memory is not reused by the hot stream before the map has read it
        return self._host[index], ready, index

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        try:  # below the sampling threads: on a CPU run they must not wait on the encoder
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            with self._cond:
                # the last step is written at once, rest or not: nothing comes after it to be starved, and it
                # is what a client should see during the VAE decode (not only after it, from close())
                while not self._closed and (self._pending is None or (time.monotonic() < self._rest_until
                                                                      and self._pending[0] + 1 < self._pending[1])):
                    self._cond.wait(None if self._pending is None else self._rest_until - time.monotonic())
                if self._pending is None:
                    return
                (step, steps, frames, ready, index), self._pending = self._pending, None
                self._reading, self._writing = index, True
            t0, c0 = time.perf_counter(), time.thread_time()
            t1 = t0
            try:
                if ready is not None:
                    ready.synchronize()  # this thread waits for the copy, the sampling thread never does
                t1 = time.perf_counter()
                self._write(step, steps, frames.numpy())
            except Exception:  # a preview must never fail the job
                log.exception("preview of step %d failed", step)
            finally:
                with self._cond:
                    now = time.perf_counter()
                    self._reading, self._writing = None, False
                    self.encode_s += now - t0
                    self.encode_cpu_s += time.thread_time() - c0
                    self._rest_until = time.monotonic() + self._rest_factor * (now - t1)  # the encode, not the wait
                    self._cond.notify_all()

    def _write(self, step: int, steps: int, frames: np.ndarray) -> None:
        data = encode_webp(frames, self.fps, self.max_side)
        _replace(self.path, data)
        width, height = preview_size(frames.shape[1], frames.shape[2], self.max_side)
        info = {"step": step + 1, "steps": steps, "frames": int(frames.shape[0]), "width": width, "height": height,
                "bytes": len(data), "updated_at": time.time()}
        _replace(self.info_path, json.dumps(info).encode())
        self.written += 1
        self.last_bytes = len(data)

    # ------------------------------------------------------------------ end
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued step is written (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write the last queued step, then stop the writer. Call before removing the job's files."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


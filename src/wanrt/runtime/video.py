"""PyAV H.264 MP4 writer: yuv420p, faststart, frames written as they are decoded.

The file is written under a temporary name of its own (two runs of one job never share one) and renamed on close,
once its bytes are on disk (fsync), so a reader never sees half a video. After a power loss the rename itself
may be lost unless the caller syncs the directory (the worker does, before it marks the job completed).
`ThreadedMp4Writer` runs the same writer on a background thread behind a bounded queue, so the VAE decodes the
next chunk while x264 encodes this one; its bytes are the synchronous writer's for the same frames.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


class Mp4Writer:
    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int, max_frames: int | None = None,
                 crf: int = 18, preset: str = "medium", threads: int = 0):
        import av

        self.path = Path(path)
        # unique per writer: a run whose lease lapsed (it still runs) and the run that re-claimed its job write apart
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        self.max_frames = max_frames
        self.frames_written = 0
        self._container = av.open(str(self.tmp_path), mode="w", format="mp4", options={"movflags": "+faststart"})
        self._stream = self._container.add_stream("libx264", rate=Fraction(int(fps), 1))
        self._stream.width, self._stream.height = int(width), int(height)
        self._stream.pix_fmt = "yuv420p"
        # no-mbtree: x264's macroblock-tree rate control gave different bytes for the same frames from one
        # encode to the next (seen with one thread too), and "same inputs + seed => same video" is a promise.
        self._stream.options = {"crf": str(crf), "preset": preset, "threads": str(threads), "x264-params": "no-mbtree=1"}
        self._time_base = Fraction(1, int(fps))
        self._closed = False
        self.encode_s = 0.0  # seconds spent in write() and close(): the encode and mux


    def write(self, frames: np.ndarray) -> int:
        """frames: uint8 (N, H, W, 3) RGB. Frames beyond max_frames are dropped. Returns frames written."""
        import av

        t0 = time.perf_counter()
        if frames.ndim == 3:
            frames = frames[None]
        n = 0
        for frame in frames:
            if self.max_frames is not None and self.frames_written >= self.max_frames:
                break
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts, vf.time_base = self.frames_written, self._time_base
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1
            n += 1
        self.encode_s += time.perf_counter() - t0
        return n

    def close(self) -> Path:
        if not self._closed:
            t0 = time.perf_counter()
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._closed = True
            with open(self.tmp_path, "rb+") as f:  # the bytes on disk before the name points at them
                os.fsync(f.fileno())
            os.replace(self.tmp_path, self.path)  # (the caller makes the rename durable: wanrt.jobs.paths.fsync_dir)
            self.encode_s += time.perf_counter() - t0
        return self.path

    def abort(self) -> None:
        if not self._closed:
            try:
                self._container.close()
            except Exception:
                pass
            self._closed = True
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_CLOSE = object()  # the writer thread's last item


class ThreadedMp4Writer:
    """An Mp4Writer fed from a background thread: write() queues a chunk and returns (it waits only while
    `queue_chunks` chunks are already queued, so memory stays bounded: a few chunks of uint8 frames) and the
    thread encodes and muxes them in order, frame by frame, exactly as Mp4Writer.write would (same bytes).

    The container is opened here, in the caller (a bad path raises at once). An error on the thread is raised
    by the next write() or close(); after one the thread drops what is queued, so a caller never waits on a dead
    encoder. abort() (or leaving the `with` block on an exception) stops the thread between frames, waits for it
    and removes the partial file. `frames_written` and `encode_s` (the encode's seconds, measured on the thread)
    are final once close() or abort() returns. write() keeps a reference to `frames`: do not modify them after."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int, max_frames: int | None = None,
                 queue_chunks: int = 2, **options):
        if queue_chunks < 1:
            raise ValueError("queue_chunks must be >= 1")
        self.writer = Mp4Writer(path, width, height, fps, max_frames=max_frames, **options)
        self.path, self.tmp_path, self.max_frames = self.writer.path, self.writer.tmp_path, max_frames
        self._queue: queue.Queue = queue.Queue(maxsize=queue_chunks)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._queued = 0  # frames accepted by write() (the caller's count, for max_frames)
        self._closing = False  # close() or abort() called: no more writes
        self._close_queued = False
        self._thread = threading.Thread(target=self._run, name="wanrt-mp4", daemon=True)
        self._thread.start()

    @property
    def frames_written(self) -> int:
        return self.writer.frames_written

    @property
    def encode_s(self) -> float:
        return self.writer.encode_s

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                if self._error is None and not self._stop.is_set():
                    try:
                        self.writer.close()  # the flush: x264's delayed frames, then the faststart rewrite
                    except BaseException as e:  # handed to the caller, which raises it
                        self._error = e
                return
            if self._error is not None or self._stop.is_set():
                continue  # failed or aborted: drain, so that a write() waiting on a full queue goes on
            try:
                for frame in item:
                    if self._stop.is_set():
                        break
                    self.writer.write(frame[None])
            except BaseException as e:  # handed to the caller, which raises it
                self._error = e

    # ------------------------------------------------------------------ caller
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, frames: np.ndarray) -> int:
        """frames: uint8 (N, H, W, 3) RGB, queued. Frames beyond max_frames are dropped. Returns frames accepted."""
        self._raise_if_failed()
        if self._closing:
            raise ValueError("write() on a closed or aborted ThreadedMp4Writer")
        if frames.ndim == 3:
            frames = frames[None]
        if self.max_frames is not None:
            frames = frames[: max(0, self.max_frames - self._queued)]
        if len(frames):
            self._queue.put(frames)  # never blocks for good: the thread drains the queue until _CLOSE
            self._queued += len(frames)
        return len(frames)

    def _finish(self) -> None:
        """Tell the thread to end and wait for it (again after an interrupted wait: the file is touched by one
        thread at a time)."""
        self._closing = True
        if not self._close_queued:
            self._queue.put(_CLOSE)  # never blocks for good: the thread takes items until _CLOSE
            self._close_queued = True
        self._thread.join()

    def close(self) -> Path:
        """Wait for the thread to encode what is queued and finish the file; raise the thread's error, if any
        (the partial file is removed then)."""
        self._finish()
        if self._error is not None:
            self.writer.abort()
            raise self._error
        return self.writer.close()  # the thread closed it: returns the path

    def abort(self) -> None:
        self._stop.set()
        self._finish()
        self.writer.abort()

    def __enter__(self) -> "ThreadedMp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def probe_mp4(path: str | os.PathLike) -> dict:
    """Decode an MP4 back: frame count, size, fps, codec, pixel format (used by tests and `wanrt doctor`)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = 0
        for _ in container.decode(stream):
            frames += 1
        return {
            "frames": frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
        }


def read_frames(path: str | os.PathLike) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

"""PyAV H.264 MP4 writer: yuv420p, faststart, frames written as they are decoded.

The file is written under a temporary name and renamed on close, so a reader never sees half a video.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np


class Mp4Writer:
    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int, max_frames: int | None = None,
                 crf: int = 18, preset: str = "medium", threads: int = 0):
        import av

        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.part")
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

    def write(self, frames: np.ndarray) -> int:
        """frames: uint8 (N, H, W, 3) RGB. Frames beyond max_frames are dropped. Returns frames written."""
        import av

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
        return n

    def close(self) -> Path:
        if not self._closed:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._closed = True
            os.replace(self.tmp_path, self.path)
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

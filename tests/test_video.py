import threading
import time

import numpy as np
import pytest

from wanrt.runtime.video import Mp4Writer, ThreadedMp4Writer, probe_mp4, read_frames


def frames(n, h=64, w=96, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (n, h // 8, w // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, 1), 8, 2)


def test_h264_yuv420p_fps_size_count(tmp_path):
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, 96, 64, fps=24) as w:
        for chunk in np.array_split(frames(13), 4):  # written as it comes
            w.write(chunk)
    info = probe_mp4(path)
    assert info == {"frames": 13, "width": 96, "height": 64, "fps": 24.0, "codec": "h264", "pix_fmt": "yuv420p"}
    decoded = read_frames(path)
    assert decoded.shape == (13, 64, 96, 3)
    assert np.abs(decoded.astype(int) - frames(13)).mean() < 12  # lossy, but the same picture


def test_faststart_puts_moov_first(tmp_path):
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, 96, 64, fps=16) as w:
        w.write(frames(9))
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")


def test_max_frames_trims(tmp_path):
    with Mp4Writer(tmp_path / "v.mp4", 96, 64, fps=16, max_frames=7) as w:
        assert w.write(frames(5)) == 5
        assert w.write(frames(5)) == 2
    assert probe_mp4(tmp_path / "v.mp4")["frames"] == 7


def test_failure_leaves_no_partial_file(tmp_path):
    with pytest.raises(RuntimeError):
        with Mp4Writer(tmp_path / "v.mp4", 96, 64, fps=16) as w:
            w.write(frames(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_encoding_is_deterministic(tmp_path):
    # x264's mb-tree rate control made every few encodes of the same frames differ; it is off
    for name in "abcdefgh":
        with Mp4Writer(tmp_path / f"{name}.mp4", 96, 64, fps=16) as w:
            w.write(frames(17))
    blobs = {(tmp_path / f"{n}.mp4").read_bytes() for n in "abcdefgh"}
    assert len(blobs) == 1


# ----------------------------------------------------------------------------------------------- writer thread
def _mp4_threads():
    return [t for t in threading.enumerate() if t.name == "wanrt-mp4" and t.is_alive()]


def test_threaded_writer_same_bytes_as_sync(tmp_path):
    # the decode hands chunks of 1 then 4 frames; trimmed by max_frames the same way
    chunks = [frames(17)[:1]] + list(np.array_split(frames(17)[1:], 4))
    with Mp4Writer(tmp_path / "sync.mp4", 96, 64, fps=16, max_frames=15) as w:
        accepted = [w.write(c) for c in chunks]
    with ThreadedMp4Writer(tmp_path / "thread.mp4", 96, 64, fps=16, max_frames=15, queue_chunks=2) as t:
        assert [t.write(c) for c in chunks] == accepted == [1, 4, 4, 4, 2]
    assert (tmp_path / "sync.mp4").read_bytes() == (tmp_path / "thread.mp4").read_bytes()
    assert t.frames_written == w.frames_written == 15 and probe_mp4(t.path)["frames"] == 15
    assert t.encode_s > 0 and w.encode_s > 0
    assert not _mp4_threads() and sorted(p.name for p in tmp_path.iterdir()) == ["sync.mp4", "thread.mp4"]


def _failing_after(writer, n_ok):
    """Make the thread's inner writer fail on frame n_ok + 1."""
    real, seen = writer.writer.write, []

    def write(frame):
        seen.append(1)
        if len(seen) > n_ok:
            raise OSError("disk full (injected)")
        return real(frame)

    writer.writer.write = write


def test_threaded_writer_error_surfaces_on_next_write(tmp_path):
    with pytest.raises(OSError, match="injected"):
        with ThreadedMp4Writer(tmp_path / "v.mp4", 96, 64, fps=16, queue_chunks=1) as w:
            _failing_after(w, 2)
            for chunk in np.array_split(frames(40), 10):  # the queue holds one chunk: a dead encoder must not hang
                w.write(chunk)
    assert w.frames_written == 2
    assert list(tmp_path.iterdir()) == [] and not _mp4_threads()


def test_threaded_writer_error_surfaces_on_close(tmp_path):
    w = ThreadedMp4Writer(tmp_path / "v.mp4", 96, 64, fps=16)
    _failing_after(w, 0)
    w.write(frames(3))
    with pytest.raises(OSError, match="injected"):
        w.close()
    with pytest.raises(OSError, match="injected"):  # and again: there is no video
        w.close()
    assert list(tmp_path.iterdir()) == [] and not _mp4_threads()


def test_threaded_writer_abort_midway(tmp_path):
    w = ThreadedMp4Writer(tmp_path / "v.mp4", 96, 64, fps=16, queue_chunks=2)
    real, started = w.writer.write, threading.Event()

    def slow(frame):  # an encoder slower than the decode: the queue fills
        started.set()
        time.sleep(0.2)  # 24 frames take ~5 s: the abort below lands midway even on a busy CI
        return real(frame)

    w.writer.write = slow
    for chunk in np.array_split(frames(24), 3):  # one taken by the thread, two queued
        w.write(chunk)
    assert started.wait(10)
    deadline = time.monotonic() + 10
    while not w.tmp_path.exists() and time.monotonic() < deadline:  # x264's first packets: a partial file
        time.sleep(0.005)
    assert w.tmp_path.exists()
    t0 = time.perf_counter()
    w.abort()
    assert time.perf_counter() - t0 < 2  # stopped between frames, the queue dropped
    assert 0 < w.frames_written < 24
    assert list(tmp_path.iterdir()) == [] and not _mp4_threads()
    with pytest.raises(ValueError):
        w.write(frames(1))

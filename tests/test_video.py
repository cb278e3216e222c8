import numpy as np
import pytest

from wanrt.runtime.video import Mp4Writer, probe_mp4, read_frames


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

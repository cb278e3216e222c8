"""Live previews (x0 of each step as an animated WebP) and GPU-seconds per job: the maths, the runtime, a real server."""

import base64
import hashlib
import hmac
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from wanrt.jobs.paths import DataPaths
from wanrt.jobs.store import SqliteJobStore
from wanrt.params import GenerateParams
from wanrt.runtime import sampler as sampling
from wanrt.runtime.pipeline import DEVICE_STAGES
from wanrt.runtime.preview import LivePreview, encode_webp, latent_to_rgb

from conftest import make_image
from servers import WanrtServer, image_bytes

TINY = dict(prompt="a dog nodding", width=64, height=64, frames=9, seed=5)  # 3 latent frames of 8x8


def webp_frames(data: bytes) -> list[np.ndarray]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "WEBP"
    frames = []
    for i in range(getattr(img, "n_frames", 1)):
        img.seek(i)
        frames.append(np.asarray(img.convert("RGB")))
    return frames


# ---------------------------------------------------------------------- the factor mapping
def test_factor_mapping_matches_a_hand_computed_pixel():
    """ComfyUI's Wan21 factors (comfy/latent_formats.py), copied here by hand from the source: channel 0 = 2 and
    channel 14 = -1 at one pixel, zeros elsewhere.
    R = 2(-0.1299) - 0.3477 - 0.1835 = -0.7910 -> (1 - 0.7910) / 2 * 255 = 26.65 -> 26
    G = 2(-0.1692) - 0.2275 - 0.0868 = -0.6527 -> 44.28 -> 44
    B = 2( 0.2932) - 0.2950 - 0.3360 = -0.0446 -> 121.81 -> 121   (truncated, as ComfyUI's preview_to_image)
    and a zero latent is the bias alone: (-0.1835, -0.0868, -0.3360) -> (104, 116, 84)."""
    x0 = torch.zeros(1, 16, 2, 3, 4)
    x0[0, 0, 1, 2, 3], x0[0, 14, 1, 2, 3] = 2.0, -1.0
    rgb = latent_to_rgb(x0)
    assert rgb.shape == (2, 3, 4, 3) and rgb.dtype == torch.uint8
    assert rgb[1, 2, 3].tolist() == [26, 44, 121]
    assert rgb[0, 0, 0].tolist() == [104, 116, 84]
    # every pixel is x0 @ factors + bias: a random latent against a plain matrix product
    x = torch.randn(1, 16, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    from wanrt.runtime.preview import LATENT_RGB_BIAS, LATENT_RGB_FACTORS

    want = ((x[0].permute(1, 2, 3, 0) @ torch.tensor(LATENT_RGB_FACTORS) + torch.tensor(LATENT_RGB_BIAS) + 1) / 2)
    assert torch.equal(latent_to_rgb(x), (want.clamp(0, 1) * 255).to(torch.uint8))


def test_webp_has_one_frame_per_latent_frame_at_256_px():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (21, 80, 80, 3), dtype=np.uint8)  # 640x640x81
    decoded = webp_frames(encode_webp(frames, fps=16))
    assert len(decoded) == 21 and decoded[0].shape == (256, 256, 3)
    wide = webp_frames(encode_webp(rng.integers(0, 255, (5, 72, 128, 3), dtype=np.uint8)))  # 1024x576
    assert len(wide) == 5 and wide[0].shape == (144, 256, 3)
    flat = np.zeros((2, 8, 8, 3), np.uint8)
    flat[:] = (104, 116, 84)
    first = webp_frames(encode_webp(flat))[0]  # lossy: within a few levels
    assert np.abs(first.astype(int) - (104, 116, 84)).max() <= 4


# ---------------------------------------------------------------------- the sampler's x0
class FixedVelocity:
    """A backend whose velocity is a fixed function of its input (no model needed)."""

    def denoise(self, expert, latent_input, timestep, context):
        return torch.tanh(latent_input[:, :16] * 0.5 + timestep.view(-1, 1, 1, 1, 1) / 1000.0)


def test_x0_is_the_schedulers_own_x0_prediction():
    scheduler = sampling.make_scheduler({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                                         "use_flow_sigmas": True, "flow_shift": 5.0})
    plan = sampling.plan_steps(scheduler, 4, 0.9, 1.0, 1.0)
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    condition = torch.zeros(1, 20, 3, 4, 4)
    seen = []

    def on_x0(step, x0):  # UniPC keeps its converted model output: x0 = sample - sigma_t * v
        seen.append(step.index)
        assert torch.allclose(x0, scheduler.model_outputs[-1], atol=1e-6)

    sampling.sample(FixedVelocity(), scheduler, plan, latents, condition, torch.zeros(1, 4, 8), None, torch.float32,
                    on_x0=on_x0)
    assert seen == [0, 1, 2, 3]


# ---------------------------------------------------------------------- the runtime writes one per step
def test_pipeline_writes_a_preview_per_step_that_changes(tiny_pipeline, tmp_path):
    preview = LivePreview(tmp_path / "p.webp", fps=16)
    snapshots = []

    def hook(step, steps, x0):  # wait for each step's file, so every step can be compared
        preview(step, steps, x0)
        assert preview.flush()
        snapshots.append(((tmp_path / "p.webp").read_bytes(), json.loads((tmp_path / "p.json").read_text())))

    params = GenerateParams(**TINY, steps=3)
    timings: dict = {}
    result = tiny_pipeline.generate(params, make_image(64, 64), None, preview=hook, timings=timings)
    preview.close()
    assert [info["step"] for _, info in snapshots] == [1, 2, 3] and all(i["steps"] == 3 for _, i in snapshots)
    decoded = [webp_frames(data) for data, _ in snapshots]
    assert all(len(frames) == 3 == result.latents.shape[2] for frames in decoded)  # one per latent frame
    assert all(f.shape == (256, 256, 3) for frames in decoded for f in frames)
    assert not np.array_equal(decoded[0][1], decoded[1][1]) and not np.array_equal(decoded[1][1], decoded[2][1])
    assert timings is result.timings and timings["denoise_high_s"] + timings["denoise_low_s"] > 0
    assert preview.written == 3 and preview.hook_s < 1.0


def test_the_last_step_is_written_at_once_not_after_the_writers_rest(tmp_path, monkeypatch):
    """The writer rests between encodes (REST_FACTOR) and keeps only the latest step meanwhile; the last step
    waited out that rest too, and on a busy CPU was written only by close(), after the VAE decode: a client
    never saw it while the job ran."""
    from wanrt.runtime import preview as preview_module

    monkeypatch.setitem(preview_module.REST_FACTOR, "cpu", 10_000.0)  # rests far longer than the test
    preview = LivePreview(tmp_path / "p.webp")
    x0 = torch.randn(1, 16, 3, 8, 8)
    preview(0, 3, x0)
    assert preview.flush(10)
    preview(1, 3, x0 + 1)
    assert not preview.flush(0.3)  # resting: step 2 waits (and would be dropped for a later one)
    preview(2, 3, x0 + 2)
    assert preview.flush(10) and json.loads((tmp_path / "p.json").read_text())["step"] == 3
    preview.close()


def test_writer_never_holds_back_the_sampler_and_ends_on_the_last_step(tmp_path):
    preview = LivePreview(tmp_path / "p.webp")
    x0 = torch.randn(1, 16, 21, 80, 80)  # full size 640x640x81
    t0 = time.perf_counter()
    for step in range(8):
        preview(step, 8, x0 + step)
    queued_s = time.perf_counter() - t0
    preview.close()
    info = json.loads((tmp_path / "p.json").read_text())
    assert info["step"] == 8 and info["frames"] == 21  # the last step is always written
    assert preview.written + preview.dropped == 8 and preview.written >= 1
    assert queued_s < 2.0  # the map only: encoding is the writer's (8 encodes would take longer)


def test_preview_files_go_with_the_job(tmp_path):
    """DELETE and the TTL sweep both remove a job's files with DataPaths.remove_job_files."""
    paths = DataPaths(tmp_path).ensure()
    store = SqliteJobStore(paths.db)
    job, _ = store.create({"prompt": "x"})
    preview = LivePreview(paths.preview_path(job.id), paths.preview_info_path(job.id))
    preview(0, 1, torch.randn(1, 16, 2, 8, 8))
    preview.close()
    assert paths.preview_path(job.id).exists() and paths.preview_info(job.id)["step"] == 1
    store.claim("w", 30)
    store.complete(job.id, "w", str(paths.output_path(job.id)), {})
    time.sleep(0.01)
    for gone in store.expire(0):  # what the API's expiry sweep does
        paths.remove_job_files(gone.id, gone.input_image)
    assert not paths.preview_path(job.id).exists() and paths.preview_info(job.id) is None
    assert list(paths.previews.iterdir()) == []


# ---------------------------------------------------------------------- a real server
class Receiver:
    """A local webhook receiver: records every POST (path, headers, body, time) and answers 200."""

    def __init__(self):
        self.seen: list[tuple[str, dict, bytes, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def valid_signature(secret: bytes, headers: dict, body: bytes) -> bool:
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    want = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(s.removeprefix("v1,"), want) for s in headers["webhook-signature"].split())


def test_real_job_preview_webhook_and_gpu_seconds(tmp_path):
    """One real job on `wanrt serve` (tiny model, CPU): the preview while it runs, the SSE preview event, the
    WebP afterwards and its removal on DELETE; its webhook events, signed; GPU-seconds, cost and /metrics."""
    receiver = Receiver()
    png = "data:image/png;base64," + base64.b64encode(image_bytes("PNG")).decode()
    with WanrtServer(tmp_path / "d", WANRT_WEBHOOK_SECRET="s3cret", WANRT_GPU_HOURLY_USD="3.6") as srv:
        job = httpx.post(srv.base + "/generate", json={
            "image_url": png, "prompt": "x", "width": 256, "height": 256, "frames": 16, "steps": 2,
            "webhook": receiver.url + "/hook?token=t", "webhook_events": ["completed", "progress"]}).json()["job_id"]
        assert httpx.get(f"{srv.base}/preview/{job}").status_code == 404  # queued: nothing yet
        events = []
        with httpx.stream("GET", f"{srv.base}/events/{job}", timeout=180) as r:
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
        previews = [e for k, e in events if k == "preview"]
        during = [e for k, e in events if k == "status" and e.get("preview_url")]
        assert previews and during, events  # the VAE decode runs after the last step: long enough to be seen
        assert previews[-1]["step"] == previews[-1]["steps"] == 2 and previews[-1]["preview_url"].startswith(f"/preview/{job}?step=")
        assert all(e["status"] == "processing" for e in during) and during[-1]["preview_step"] == 2
        final = srv.wait_status(job)
        assert final["status"] == "completed" and "preview_url" not in final
        r = httpx.get(srv.base + previews[-1]["preview_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp" and r.headers["cache-control"] == "no-store"
        assert len(webp_frames(r.content)) == 5  # 17 frames generated: 5 latent frames

        # GPU-seconds: per device stage, summed, below wall time; cost at $3.60/h = $0.001 a second
        stages = final["gpu_seconds_by_stage"]
        assert set(stages) == {k.removesuffix("_s") for k in DEVICE_STAGES}
        assert final["gpu_seconds"] == pytest.approx(sum(stages.values()), abs=1e-5) and final["gpu_seconds"] > 0
        wall = (time.mktime(time.strptime(final["finished_at"][:19], "%Y-%m-%dT%H:%M:%S"))
                - time.mktime(time.strptime(final["started_at"][:19], "%Y-%m-%dT%H:%M:%S")) + 1)
        assert final["gpu_seconds"] < wall
        assert final["cost_usd"] == pytest.approx(final["gpu_seconds"] * 0.001, rel=1e-3)
        dbg = httpx.get(f"{srv.base}/debug/job/{job}").json()
        assert dbg["job"]["gpu_seconds_total"] == pytest.approx(final["gpu_seconds"], abs=1e-5)
        metrics = httpx.get(srv.base + "/metrics").text
        assert 'wanrt_job_gpu_seconds_bucket{le="+Inf"} 1' in metrics and "wanrt_job_gpu_seconds_count 1" in metrics
        total = float(next(x for x in metrics.splitlines() if x.startswith("wanrt_gpu_seconds_total ")).split()[1])
        assert total == pytest.approx(final["gpu_seconds"], abs=1e-4)

        # webhooks: 'progress' when it started (and per 10 % a heartbeat saw), 'completed' once, all signed
        deadline = time.time() + 15
        while time.time() < deadline and not any(json.loads(b)["event"] == "completed" for _, _, b, _ in receiver.seen):
            time.sleep(0.1)
        time.sleep(1.0)  # nothing more arrives
        got = [(p, h, json.loads(b), b) for p, h, b, _ in receiver.seen]
        kinds = [b["event"] for _, _, b, _ in got]
        assert kinds.count("completed") == 1 and kinds[0] == "progress" and set(kinds) == {"progress", "completed"}, kinds
        assert all(p == "/hook?token=t" and valid_signature(b"s3cret", h, raw) for p, h, _, raw in got)
        assert len({h["webhook-id"] for _, h, _, _ in got}) == len(got)
        completed = next(b for _, _, b, _ in got if b["event"] == "completed")
        assert {k: v for k, v in completed.items() if k != "event"} == httpx.get(f"{srv.base}/status/{job}").json()

        # DELETE takes the preview with it
        assert httpx.delete(f"{srv.base}/jobs/{job}").status_code == 200
        assert httpx.get(f"{srv.base}/preview/{job}").status_code == 404
        assert list((tmp_path / "d" / "previews").iterdir()) == []
    receiver.httpd.shutdown()


def test_flush_waits_for_a_cpu_step_being_encoded(tmp_path, monkeypatch):
    """flush() waited on the buffer index the writer reads, which CPU steps do not have: it returned while a CPU
    step was still being encoded (the test above failed on a loaded machine, reading the previous step's info)."""
    from wanrt.runtime import preview as preview_module

    real = preview_module.encode_webp
    monkeypatch.setattr(preview_module, "encode_webp", lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1])
    preview = LivePreview(tmp_path / "p.webp")
    preview(0, 1, torch.randn(1, 16, 3, 8, 8))
    time.sleep(0.1)  # the writer has taken the step and is encoding it
    assert preview.flush(10) and json.loads((tmp_path / "p.json").read_text())["step"] == 1
    preview.close()

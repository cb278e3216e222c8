import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wanrt.runtime.video import probe_mp4

ASSET = Path(__file__).parent / "assets" / "first_frame.png"


def wanrt(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "wanrt.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flag,value,expected", [
    ("--steps", "30", "steps must be in 1-20"),
    ("--width", "300", "width must be divisible by 32"),
    ("--frames", "10", "frames must be in 16-121"),
    ("--cfg-high-noise", "11", "cfg_high_noise must be in 1.0-10.0"),
    ("--fps", "abc", "--fps: not a number: 'abc' (allowed: 8-30)"),
])
def test_bad_parameters_exit_2_with_one_line(flag, value, expected):
    r = wanrt("generate", "--image", str(ASSET), "--prompt", "x", flag, value, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr


def test_settings_the_runtime_refuses_exit_2_with_one_line():
    r = wanrt("generate", "--image", str(ASSET), "--prompt", "x", "--deterministic", "--autotune", timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "deterministic and autotune do not go together" in lines[0], r.stderr


def test_bad_image_exit_2(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    r = wanrt("generate", "--image", str(bad), "--prompt", "x", timeout=60)
    assert r.returncode == 2 and "Invalid image format" in r.stderr


def test_doctor_reports_each_component():
    r = wanrt("doctor", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("torch", "cuda_available", "nvml", "tensorrt", "pyav", "h264_encoder"):
        assert key in info
    assert info["h264_encoder"] == "libx264"


def test_a_gpu_query_nvml_does_not_support_leaves_a_null_not_a_crash(monkeypatch, tmp_path):
    """NVML says Not Supported for some queries on some GPUs (utilisation on a MIG slice): doctor, /debug/gpu and
    /metrics crashed on it. A stand-in pynvml (no NVIDIA driver here) answers like such a GPU."""
    import sys
    import types

    from wanrt import doctor

    class NVMLError(Exception):
        pass

    def unsupported(*a):
        raise NVMLError("Not Supported")

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: unsupported() if i else "h0",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 << 30, used=1 << 30),
        nvmlDeviceGetUtilizationRates=unsupported, nvmlDeviceGetPowerUsage=unsupported,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3 MIG 3g.40gb", nvmlDeviceGetTemperature=unsupported,
        nvmlDeviceGetClockInfo=unsupported, nvmlSystemGetDriverVersion=lambda: b"580.1",
        NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2)
    monkeypatch.setitem(sys.modules, "pynvml", types.ModuleType("pynvml"))
    sys.modules["pynvml"].__dict__.update(vars(fake))
    report = doctor.gpu_report()
    first, second = report["gpus"]
    assert report["available"] and first["memory_total_mb"] == 80 << 10 and first["utilization_gpu_pct"] is None
    assert second == {"index": 1, "error": "NVML could not open this GPU"}
    from wanrt.api import routes
    from wanrt.jobs.paths import DataPaths
    from wanrt.jobs.store import SqliteJobStore

    monkeypatch.setattr(routes, "_gpu_cache", [0.0, None])
    text = routes.metrics_text(SqliteJobStore(DataPaths(tmp_path).ensure().db), None, 0.0)
    assert 'wanrt_gpu_memory_total_mb{gpu="0",name="NVIDIA H100 80GB HBM3 MIG 3g.40gb"} 81920' in text


def test_each_setting_has_one_definition_env_flag_and_readme_entry():
    """Env name, flag and help come from the Settings field; README lists every variable."""
    import dataclasses
    from pathlib import Path

    from wanrt.cli import build_parser
    from wanrt.config import Settings, env_name

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [env_name(f.name) for f in dataclasses.fields(Settings) if env_name(f.name) not in readme]
    assert not missing, f"README does not list {missing}"
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    assert {"--warmup", "--memory", "--queue-max", "--no-fp8", "--debug-endpoints"} <= flags
    settings = Settings.from_env({"WANRT_WARMUP": "640x640x81,256x256x16", "WANRT_FP8": "0"}, memory="offload")
    assert settings.warmup == ("640x640x81", "256x256x16") and settings.fp8 is False and settings.memory == "offload"
    assert Settings.from_env(settings.to_env()) == settings  # what workers receive is what the API was given


def test_serving_defaults_keep_graphs_and_autotune_opt_in():
    """CUDA graphs (a multi-GB private pool per shape, recaptured on every swap) and max-autotune (longer than a
    job per bucket) are measured opt-ins for the 14B experts, not defaults; blocks are compiled once and reused."""
    from wanrt.config import Settings

    s = Settings.from_env({})
    assert (s.cudagraphs, s.autotune, s.compile_scope) == (False, False, "blocks")
    assert Settings.from_env({"WANRT_CUDAGRAPHS": "1", "WANRT_AUTOTUNE": "1"}).cudagraphs is True


def test_warm_up_defaults_to_the_default_request_where_compiles_happen(monkeypatch, capsys):
    """Unset, the compiled backend on CUDA warms up the seed's default request (its first request would pay the
    compile: 34 s on an H200), nothing elsewhere; 'none' turns it off; a malformed bucket stops the command with the
    setting's name (flag or environment) before any worker starts, not in a worker's crash loop."""
    from wanrt.cli import main
    from wanrt.config import Settings

    assert Settings(device="cuda").resolved_warmup() == ("640x640x81",)
    assert Settings(device="cuda", backend="compiled").resolved_warmup() == ("640x640x81",)
    assert Settings(device="cuda", backend="eager").resolved_warmup() == ()
    assert Settings(device="cpu", backend="compiled").resolved_warmup() == ()  # the CPU tests' compiled runs
    assert Settings(device="cuda", warmup=("none",)).resolved_warmup() == ()
    assert Settings.from_env({"WANRT_WARMUP": "NONE"}, device="cuda").resolved_warmup() == ()
    assert Settings(device="cuda", warmup=("256x256x17",)).resolved_warmup() == ("256x256x17",)
    assert Settings.from_env(Settings(warmup=("none",)).to_env()).resolved_warmup() == ()  # what workers receive
    with pytest.raises(SystemExit) as flag:
        main(["generate", "--image", "x.png", "--prompt", "p", "--warmup", "640x640"])
    assert flag.value.code == 2 and "'640x640' is not a bucket WxHxF" in capsys.readouterr().err
    with pytest.raises(SystemExit) as mixed:  # 'none' beside buckets: which one was meant?
        main(["generate", "--image", "x.png", "--prompt", "p", "--warmup", "none,640x640x81"])
    assert mixed.value.code == 2 and "'none' goes alone" in capsys.readouterr().err
    monkeypatch.setenv("WANRT_WARMUP", "640x640x81,big")
    with pytest.raises(SystemExit) as env:
        main(["serve"])
    assert env.value.code == 2 and "WANRT_WARMUP='640x640x81,big'" in capsys.readouterr().err


def test_generate_writes_exact_frames_and_one_seed_gives_the_same_bytes_in_another_process(tmp_path):
    """`wanrt generate` writes exactly the frames asked for (18 asked, 21 generated: 4k+1), and `seed` is for
    reproducibility: two processes (side by side), same request, same bytes (noise from a CPU generator, no kernel
    chosen by timing on the CPU); --deterministic keeps them; another seed changes them."""
    runs = {name: (tmp_path / f"{name}.mp4", extra) for name, extra in
            (("a", ("--seed", "7")), ("b", ("--seed", "7", "--deterministic")), ("c", ("--seed", "8")))}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core each: side by side without oversubscribing
    procs = {name: subprocess.Popen([sys.executable, "-m", "wanrt.cli", "generate", "--image", str(ASSET), "--prompt",
                                     "a cat turning its head", "--width", "256", "--height", "256", "--frames", "18",
                                     "--fps", "12", "--steps", "2", "--out", str(out), *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for name, (out, extra) in runs.items()}
    outputs = {}
    for name, proc in procs.items():
        outputs[name], err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    summary = json.loads(outputs["a"].decode().strip().splitlines()[-1])
    assert summary["frames"] == 18 and summary["frames_generated"] == 21 and summary["seed"] == 7
    assert probe_mp4(runs["a"][0]) == {"frames": 18, "width": 256, "height": 256, "fps": 12.0, "codec": "h264",
                                       "pix_fmt": "yuv420p"}
    a, b, c = (runs[n][0].read_bytes() for n in "abc")
    assert a == b and a != c


DETERMINISTIC_CHECK = """
import dataclasses, torch
from wanrt.config import Settings
from wanrt.runtime import attention
from wanrt.runtime.factory import build_runtime
from wanrt.runtime.vae import decode_format
assert decode_format("cuda", "auto").cudnn_benchmark  # the default: kernels chosen by timing
try:
    build_runtime(Settings(device="cpu", backend="compiled", deterministic=True, autotune=True))
    raise SystemExit("autotune was accepted")
except ValueError as e:
    assert "autotune" in str(e)
pipe = build_runtime(Settings(device="cpu", backend="compiled", compile=False, deterministic=True))
assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
import os  # build_runtime chose the allocator's growable segments (no allocator setting in this environment)
assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and "PYTORCH_ALLOC_CONF" not in os.environ
assert not torch.utils.deterministic.fill_uninitialized_memory  # no NaN fill of every output buffer
fmt = decode_format("cuda", "auto")
assert fmt.dtype == torch.bfloat16 and fmt.channels_last and not fmt.cudnn_benchmark
backend = pipe.backend.inner
backend.attention = dataclasses.replace(backend.attention, measure=attention.HOPPER_CANDIDATES)  # as on an H100
x = torch.randn(2, 36, 3, 8, 8)
assert backend._attention_plan("high", x) is backend.attention and not backend.stats.attention_measured
print("ok")
"""


def test_deterministic_turns_off_every_choice_made_by_timing():
    """--deterministic: no cudnn.benchmark in the bf16 VAE decode, attn=auto measures nothing, autotune refused,
    torch's deterministic algorithms on (its own process: the switches are process-wide)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    r = subprocess.run([sys.executable, "-c", DETERMINISTIC_CHECK], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]

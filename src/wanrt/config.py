"""Settings: one frozen dataclass. Each field is defined once, here: its default, its help, how its WANRT_*
environment variable is parsed, and which CLI commands offer it as a flag (`add_flags` derives the flags, the
env names and the help from this table). No globals."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


def _bool(v: str) -> bool:
    return v.strip().lower() in {"1", "true", "yes", "on"}


def _list(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def _buckets(v: str) -> tuple[str, ...]:
    """WANRT_WARMUP / --warmup: "WxHxF,..." or "none", checked here so a typo stops the command, not a worker."""
    buckets = tuple(b.lower() for b in _list(v))
    if "none" in buckets and len(buckets) > 1:
        raise argparse.ArgumentTypeError(f"warmup: 'none' goes alone, not with buckets ({v!r})")
    for b in buckets:
        parts = b.split("x")
        if b != "none" and (len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts)):
            raise argparse.ArgumentTypeError(f"warmup: {b!r} is not a bucket WxHxF (e.g. 640x640x81) nor 'none'")
    return buckets


# Which commands offer a setting as a flag.
RUN = ("serve", "worker", "generate")  # everything that builds a runtime
SERVE = ("serve",)
JOBS = ("serve", "worker")


def setting(default, help: str, parse=str, cli: tuple[str, ...] = (), choices: tuple[str, ...] | None = None):
    """A Settings field: `parse` reads WANRT_<NAME>; `cli` lists the commands with a --<name> flag."""
    return field(default=default, metadata={"help": help, "parse": parse, "cli": cli, "choices": choices})


@dataclass(frozen=True)
class Settings:
    # --- model / runtime ---
    model: str = setting("tiny", "'tiny', 'random-full', a diffusers dir or a dir of single files", cli=RUN)
    device: str = setting("auto", "auto (cuda when present) | cpu | cuda | cuda:N", cli=RUN)
    dtype: str = setting("auto", "auto = bf16 on CUDA, fp32 on CPU", cli=RUN, choices=("auto", "bf16", "fp16", "fp32"))
    backend: str = setting("auto", "auto (compiled on CUDA: FP8 + torch.compile, the fast path; eager elsewhere), "
                           "eager (the reference), compiled (the switches below) or tensorrt", cli=RUN,
                           choices=("auto", "eager", "compiled", "tensorrt"))
    fp8: bool = setting(True, "compiled: FP8 e4m3 linears (scaled_mm on SM >= 8.9, emulated elsewhere)", _bool, RUN)
    fp8_impl: str = setting("wanrt", "compiled: the FP8 recipe: wanrt (ours, every device) or torchao "
                            "(Float8DynamicActivationFloat8WeightConfig PerRow; SM >= 8.9, resident tier only)", cli=RUN,
                            choices=("wanrt", "torchao"))
    fuse_qkv: bool = setting(True, "compiled: Q/K/V projections fused into one GEMM before FP8 (off where LoRAs are "
                             "served: the slots wrap each projection)", _bool, RUN)
    attn: str = setting("auto", "compiled: attention kernel (auto = on Hopper the faster of cuDNN and flash, measured "
                        "once per shape; PyTorch's choice elsewhere; "
                        "cudnn_fp8 = FP8 attention through cudnn-frontend, refused unless it passes its PSNR check)",
                        cli=RUN, choices=("auto", "sdpa", "flash", "efficient", "cudnn", "math", "cudnn_fp8"))
    compile: bool = setting(True, "compiled: torch.compile per shape bucket", _bool, RUN)
    compile_scope: str = setting("blocks", "compiled: compile one transformer block and reuse it for all 40 (blocks: "
                                 "seconds to compile) or the whole expert (model)", cli=RUN, choices=("blocks", "model"))
    autotune: bool = setting(False, "compiled: Inductor GEMM autotuning (max-autotune; minutes of compile per bucket)",
                             _bool, RUN)
    cudagraphs: bool = setting(False, "compiled: CUDA graphs (opt-in: a few thousand launches on a multi-second "
                               "forward, against a multi-GB private pool)", _bool, RUN)
    memory: str = setting("auto", "memory tier: auto (chosen from free GPU memory and host RAM at start-up), "
                          "resident (everything on the GPU: 80 GB), swap (one expert on the GPU, the other pinned on "
                          "the host; alias offload: 40-48 GB), stream (blocks streamed from pinned host memory: 24 GB "
                          "and below), mmap (stream from the memory-mapped checkpoint files: short host RAM); "
                          "`wanrt plan` shows what a card gets", cli=RUN,
                          choices=("auto", "resident", "swap", "offload", "stream", "mmap"))
    warmup: tuple[str, ...] = setting((), "shape buckets WxHxF compiled before the first job, comma-separated; "
                                      "unset or empty: the default request's (640x640x81) where the compiled backend "
                                      "compiles on CUDA, none elsewhere; none: no warm-up", _buckets, RUN)
    scheduler: str = setting("unipc", "sampler (unipc is upstream's)", cli=RUN, choices=("unipc", "euler"))
    artifacts: str | None = setting(None, "a `wanrt build` output dir: fused (and quantized) experts", cli=RUN)
    deterministic: bool = setting(False, "same seed, settings, GPU and software -> the same MP4 bytes across processes: "
                                  "no kernel chosen by timing (cudnn.benchmark in the VAE decode, attn=auto's "
                                  "measurement, Inductor's benchmarking; refused with autotune), deterministic "
                                  "cuDNN/cuBLAS algorithms; some speed is lost", _bool, RUN)
    vae_dtype: str = setting("auto", "VAE decode precision: auto = bf16 with channels_last_3d on CUDA, the model dtype "
                             "elsewhere", cli=RUN, choices=("auto", "bf16", "fp32"))
    # --- LoRAs per request ---
    lora_dir: str | None = setting(None, "directory of LoRA .safetensors files served per request (named by stem)",
                                   cli=RUN)
    max_lora_rank: int = setting(128, "rank of the per-layer LoRA buffers: the summed rank of a request's LoRAs "
                                 "(a rank-64 Lightning LoRA and a rank-64 style LoRA; 0 = no LoRA slots)", int, RUN)
    lora_allow_unmatched: bool = setting(False, "serve LoRA files with keys that match no layer of the expert, those "
                                         "keys skipped with a warning (text-encoder and Wan 2.1 image keys are "
                                         "always skipped)", _bool, RUN)
    lora_cache_gb: float = setting(2.0, "prepared LoRA tensors kept on the device for fast swaps (GB)", float, RUN)
    lora_affinity_skip: int = setting(4, "a worker may run a job whose LoRA set is loaded before at most this many "
                                      "older queued jobs (0 = FIFO)", int, JOBS)
    lora_rescan_s: float = setting(10.0, "an idle worker looks for added, changed or removed LoRA files this often "
                                   "(seconds)", float, JOBS)
    lora_affinity_wait_s: float = setting(60.0, "no queued job is passed over for LoRA affinity once it has waited "
                                          "this long (seconds)", float, JOBS)
    queue: str = setting("sqlite", "'sqlite' (under the data dir) or redis://host:port/db", cli=RUN)
    gpus: tuple[str, ...] = setting((), "GPU indices of one worker group, comma-separated (e.g. 0,1,2,3): one video "
                                    "over several GPUs (Ulysses/CFG parallel); empty = one GPU", _list, ("worker",))
    # --- server ---
    host: str = setting("0.0.0.0", "address the API listens on", cli=SERVE)
    port: int = setting(8189, "port the API listens on", int, SERVE)
    data_dir: Path = setting(Path("data"), "job database, inputs and outputs", Path, JOBS)
    workers: int = setting(1, "worker processes to start (one per GPU); 0 = API only", int, SERVE)
    gpus_per_worker: int = setting(1, "GPUs per worker: N > 1 runs each worker as a group over N GPUs, one video at a "
                                   "time (Ulysses/CFG parallel; 2, 4, 5 or 8 for WAN's 40 heads)", int, SERVE)
    concurrency: int = setting(1, "jobs per worker at once", int, JOBS)
    queue_max: int = setting(100, "queued jobs before /generate answers 429", int, SERVE)
    job_ttl_s: float = setting(24 * 3600.0, "finished jobs and their files expire after this many seconds", float)
    lease_s: float = setting(30.0, "a worker that misses heartbeats this long loses its job back to the queue", float)
    heartbeat_s: float = setting(2.0, "seconds between a worker's heartbeats", float)
    api_keys: tuple[str, ...] = setting((), "bearer tokens, comma-separated; empty = no auth (the seed contract)", _list)
    debug_endpoints: bool = setting(True, "serve /debug/* (turn off on exposed servers)", _bool, SERVE)
    # --- image fetch and decode (the API process) ---
    allow_hosts: tuple[str, ...] = setting((), "hosts/CIDRs the image fetcher may reach despite being private", _list)
    fetch_only_allowed: bool = setting(False, "allow-list mode: refuse every host not in allow_hosts", _bool)
    max_image_bytes: int = setting(10 * 1024 * 1024, "largest image file accepted (bytes)", int)
    max_image_pixels: int = setting(40_000_000, "largest image header accepted (pixels; bombs are refused)", int)
    max_decode_pixels: int = setting(16_000_000, "largest image decoded after reduced-size decoding (pixels)", int)
    fetch_timeout_s: float = setting(15.0, "one deadline over a whole image fetch: connect, headers, body, redirects",
                                     float)
    fetch_concurrency: int = setting(16, "image fetches and decodes at once; beyond it /generate answers 503", int)
    decode_concurrency: int = setting(4, "image decodes at once (each can take hundreds of MB)", int)
    # --- event streams ---
    sse_per_client: int = setting(8, "open /events streams per client address (429 beyond)", int)
    sse_total: int = setting(256, "open /events streams in all (429 beyond)", int)
    sse_max_s: float = setting(3600.0, "longest an /events stream stays open (seconds)", float)
    # --- previews, webhooks, cost ---
    preview: bool = setting(True, "write a live preview (animated WebP of x0) after each denoising step", _bool, JOBS)
    webhook_secret: str = setting("", "HMAC-SHA256 key signing webhooks (Standard Webhooks; 'whsec_<base64>' or any "
                                      "text); empty = requests with a webhook are refused (422)")
    webhook_retry_s: tuple[str, ...] = setting(("15", "45", "135", "405"), "seconds before each webhook retry, "
                                               "comma-separated (attempts = 1 + their count)", _list)
    webhook_timeout_s: float = setting(10.0, "one webhook attempt's deadline: resolve, connect, send, answer", float)
    webhook_concurrency: int = setting(8, "webhook deliveries at once per API process", int)
    gpu_hourly_usd: float | None = setting(None, "price of one GPU-hour: jobs then report cost_usd", float)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        """Environment first (WANRT_MODEL, WANRT_PORT, ...), then explicit overrides (CLI flags) win."""
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is not None and raw != "":
                try:
                    values[f.name] = f.metadata["parse"](raw)
                except (ValueError, argparse.ArgumentTypeError) as e:
                    raise ValueError(f"{env_name(f.name)}={raw!r}: {e}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The settings as WANRT_* variables, so worker processes see exactly what the API was given."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[env_name(f.name)] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_backend(self) -> str:
        """auto: the compiled backend on CUDA (measured 1.35x eager end to end on an H200 with its default
        switches), eager on the CPU (Inductor's CPU compiles take minutes and FP8 is only emulated there)."""
        if self.backend != "auto":
            return self.backend
        return "compiled" if self.resolved_device().startswith("cuda") else "eager"

    def resolved_warmup(self) -> tuple[str, ...]:
        """The "WxHxF" buckets to compile before the first job. Unset: the default request's bucket where the
        compiled backend runs on CUDA (else its first request pays the compile: 34 s on an H200 from empty caches),
        nothing elsewhere (eager compiles nothing; CPU compiles take minutes)."""
        from wanrt.params import DEFAULT_BUCKET

        if not self.warmup:
            compiled = self.resolved_backend() == "compiled" and self.resolved_device().startswith("cuda")
            return (DEFAULT_BUCKET,) if compiled else ()
        return tuple(b for b in _buckets(",".join(self.warmup)) if b != "none")

    def resolved_dtype(self):
        import torch

        name = self.dtype
        if name == "auto":
            name = "bf16" if self.resolved_device().startswith("cuda") else "fp32"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def env_name(name: str) -> str:
    return f"WANRT_{name.upper()}"


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """--<name> for every setting offered on `command`, help and env name from the field (default None:
    an absent flag leaves the environment's value)."""
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        if command not in meta["cli"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{meta['help']} [{env_name(f.name)}, default {_show(f.default)}]"
        if meta["parse"] is _bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=meta["parse"], choices=meta["choices"], default=None,
                                help=help_text)


def settings_from_args(args: argparse.Namespace, **extra) -> Settings:
    """Environment, then every setting flag the command was given, then `extra`."""
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    try:
        return Settings.from_env(**{**flags, **{k: v for k, v in extra.items() if v is not None}})
    except ValueError as e:  # a malformed WANRT_* value: the command stops with its name, not a traceback
        print(f"wanrt: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _show(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)

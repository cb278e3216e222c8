"""Settings: one frozen dataclass, read from WANRT_* environment variables and CLI flags. No globals."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path


def _bool(v: str) -> bool:
    return v.strip().lower() in {"1", "true", "yes", "on"}


def _list(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


@dataclass(frozen=True)
class Settings:
    # --- model / runtime ---
    model: str = "tiny"  # "tiny", "random-full", a diffusers directory, or a directory of single files
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp16", "fp32"
    backend: str = "eager"  # "eager" (reference) or "compiled" (the switches below)
    fp8: bool = True
    attn: str = "sdpa"
    compile: bool = True
    cudagraphs: bool = True
    memory: str = "auto"  # "auto", "resident" (both experts on the GPU) or "offload" (one at a time)
    warmup: tuple[str, ...] = ()  # shape buckets compiled before the first job, e.g. "640x640x81"
    scheduler: str = "unipc"  # "unipc" (upstream default) or "euler"
    artifacts: str | None = None
    # --- server ---
    host: str = "0.0.0.0"
    port: int = 8189
    data_dir: Path = Path("data")
    workers: int = 1  # worker processes (one per GPU); 0 = API only
    concurrency: int = 1  # jobs per worker at once
    queue_max: int = 100  # queued jobs before /generate answers 429
    job_ttl_s: float = 24 * 3600.0  # finished jobs and their files expire after this
    lease_s: float = 30.0  # a worker that misses heartbeats this long loses its job back to the queue
    heartbeat_s: float = 2.0
    allow_hosts: tuple[str, ...] = ()  # hosts/CIDRs the image fetcher may reach despite being private
    fetch_only_allowed: bool = False  # allow-list mode: refuse every host not in allow_hosts
    api_keys: tuple[str, ...] = ()  # bearer tokens; empty = no auth (the seed contract)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    fetch_timeout_s: float = 15.0
    queue: str = "sqlite"  # "sqlite" or a redis:// URL

    _ENV = {
        "model": str, "device": str, "dtype": str, "backend": str, "fp8": _bool, "attn": str, "compile": _bool,
        "cudagraphs": _bool, "warmup": _list, "memory": str, "scheduler": str, "artifacts": str,
        "host": str, "port": int, "data_dir": Path, "workers": int, "concurrency": int, "queue_max": int,
        "job_ttl_s": float, "lease_s": float, "heartbeat_s": float, "allow_hosts": _list, "fetch_only_allowed": _bool, "api_keys": _list,
        "max_image_bytes": int, "max_image_pixels": int, "fetch_timeout_s": float, "queue": str,
    }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        """Environment first (WANRT_MODEL, WANRT_PORT, ...), then explicit overrides (CLI flags) win."""
        env = os.environ if env is None else env
        values = {}
        for name, parse in cls._ENV.items():
            raw = env.get(f"WANRT_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = parse(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch

        name = self.dtype
        if name == "auto":
            name = "bf16" if self.resolved_device().startswith("cuda") else "fp32"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]

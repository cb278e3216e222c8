"""manifest.json: what a build was made from (base hashes, LoRAs + strengths per expert, precision,
profiles, tool versions, GPU) and the cache key that makes an identical rebuild a no-op."""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

import torch

import wanrt

# The read side (also what the runtime checks before serving artifacts) lives in the runtime.
from wanrt.runtime.artifacts import (  # noqa: F401
    MANIFEST,
    SAMPLED_ABOVE,
    ArtifactMismatch,
    base_fingerprint,
    check_matches,
    file_fingerprint,
    read_manifest,
    tensors_fingerprint,
)


def tool_versions() -> dict:
    out = {"wanrt": wanrt.__version__, "torch": torch.__version__}
    for name in ("diffusers", "transformers", "onnx", "onnxruntime", "tensorrt"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:
            out[name] = None
    return out


def build_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**manifest, "written_at": time.time()}, indent=2, default=str))
    tmp.replace(path)
    return path


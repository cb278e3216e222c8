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

MANIFEST = "manifest.json"
SAMPLED_ABOVE = 1 << 30  # files larger than 1 GB get a sampled hash (size + 16 x 1 MB), labelled as such


class ArtifactMismatch(RuntimeError):
    pass


def file_fingerprint(path: Path) -> str:
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= SAMPLED_ABOVE:
            while block := fh.read(1 << 20):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        h.update(str(size).encode())
        for i in range(16):
            fh.seek(i * (size - (1 << 20)) // 15)
            h.update(fh.read(1 << 20))
        return f"sha256-sampled:{h.hexdigest()}"


def tensors_fingerprint(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def base_fingerprint(spec: str) -> dict:
    """Identity of the base model a build starts from."""
    if spec == "tiny":
        from wanrt.model.tiny import build_tiny_model

        m = build_tiny_model()
        return {"model": "tiny", "experts": tensors_fingerprint(m.transformer_high, m.transformer_low)}
    if spec == "random-full":
        return {"model": "random-full", "experts": "random"}
    root = Path(spec)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pth", ".pt", ".bin", ".json"))
    return {"model": str(root.resolve()), "files": {str(p.relative_to(root)): file_fingerprint(p) for p in files}}


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


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**manifest, "written_at": time.time()}, indent=2, default=str))
    tmp.replace(path)
    return path


def check_matches(manifest: dict, base: dict) -> None:
    """The runtime refuses artifacts built from another base model."""
    if manifest.get("base") != base:
        built = manifest.get("base", {}).get("model")
        raise ArtifactMismatch(f"artifacts were built from {built!r} with other weights than the model being served "
                               f"({base.get('model')!r}); rebuild them with `wanrt build` for this model")

"""The read side of `wanrt build` output: the manifest and its check against the served model, the fused expert
weights, and what a TensorRT engine looks like from outside (I/O names, shape profiles).

engine_build writes these artifacts and imports the shared definitions from here; the runtime only reads them
and never imports engine_build.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "manifest.json"
SAMPLED_ABOVE = 1 << 30  # files larger than 1 GB get a sampled hash (size + 16 x 1 MB), labelled as such

# The expert as ONNX and TensorRT see it: positional inputs, one tensor out.
INPUT_NAMES = ["hidden_states", "timestep", "encoder_hidden_states"]
OUTPUT_NAMES = ["velocity"]


class ArtifactMismatch(RuntimeError):
    pass


class TensorRTUnavailable(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ manifest
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
    """Identity of the base model a build starts from (and the runtime serves)."""
    if spec == "tiny":
        from wanrt.model.tiny import build_tiny_model

        m = build_tiny_model()
        return {"model": "tiny", "experts": tensors_fingerprint(m.transformer_high, m.transformer_low)}
    if spec == "random-full":
        return {"model": "random-full", "experts": "random"}
    root = Path(spec)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pth", ".pt", ".bin", ".json"))
    return {"model": str(root.resolve()), "files": {str(p.relative_to(root)): file_fingerprint(p) for p in files}}


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_matches(manifest: dict, base: dict) -> None:
    """The runtime refuses artifacts built from another base model."""
    if manifest.get("base") != base:
        built = manifest.get("base", {}).get("model")
        raise ArtifactMismatch(f"artifacts were built from {built!r} with other weights than the model being served "
                               f"({base.get('model')!r}); rebuild them with `wanrt build` for this model")


def load_artifacts_into(model, artifacts: Path, model_spec: str, dtype=None) -> dict:
    """Check the manifest against the served model and load the fused (and, for FP8, dequantized) expert
    weights into it. The compiled and TensorRT backends read their own formats.

    One tensor at a time, copied into the expert's own: the device holds the expert plus one tensor in flight,
    never the whole artifact (and its dequantized copy) beside the resident expert."""
    from safetensors import safe_open

    from wanrt.runtime.fp8 import SCALE_SUFFIX, dequantize_state_dict

    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    if manifest is None:
        raise ArtifactMismatch(f"{artifacts} has no {MANIFEST}; build it with `wanrt build`")
    check_matches(manifest, base_fingerprint(model_spec))
    fp8 = manifest["precision"] == "fp8"
    for name, expert in model.experts.items():
        path = artifacts / manifest["experts"][name]["weights"]
        current = expert.state_dict()
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            keys = [k for k in f.keys() if not (fp8 and k.endswith(f".{SCALE_SUFFIX}"))]
            missing, unexpected = sorted(set(current) - set(keys)), sorted(set(keys) - set(current))
            if missing or unexpected:  # strict, as load_state_dict was
                raise ArtifactMismatch(f"{path}: {len(missing)} missing keys {missing[:5]}, "
                                       f"{len(unexpected)} unexpected keys {unexpected[:5]}")
            for key in keys:
                param = current[key]
                part = {key: f.get_tensor(key).to(param.device)}
                scale = key[: -len("weight")] + SCALE_SUFFIX
                if fp8 and key.endswith(".weight") and scale in stored:
                    part[scale] = f.get_tensor(scale).to(param.device)
                value = dequantize_state_dict(part, dtype or expert.dtype)[key] if fp8 else part.pop(key)
                if value.shape != param.shape:
                    raise ArtifactMismatch(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(value)  # in place: state_dict's tensors share the parameters' storage
    return manifest


# ------------------------------------------------------------------------------------------------ engines
@dataclass(frozen=True)
class Profile:
    """Latent-space shape ranges (latent frames, latent height, latent width) of one engine."""

    name: str
    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def contains(self, frames: int, height: int, width: int) -> bool:
        return all(lo <= v <= hi for v, lo, hi in zip((frames, height, width), self.min, self.max, strict=True))

    def input_shapes(self, in_channels: int = 36, text_len: int = 512, text_dim: int = 4096, batch=(1, 2, 2)):
        def shapes(lat, b):
            f, h, w = lat
            return {"hidden_states": (b, in_channels, f, h, w), "timestep": (b,), "encoder_hidden_states": (b, text_len, text_dim)}

        return {k: (shapes(self.min, batch[0])[k], shapes(self.opt, batch[1])[k], shapes(self.max, batch[2])[k])
                for k in ("hidden_states", "timestep", "encoder_hidden_states")}


# The seed's range: 256-1024 px a side (latent 32-128) and 16-121 frames (latent 5-31), in three buckets
# so each engine's tactics are tuned near the sizes it serves.
PROFILES = {
    "small": Profile("small", (5, 32, 32), (21, 64, 64), (31, 64, 64)),  # up to 512x512
    "default": Profile("default", (5, 32, 32), (21, 80, 80), (31, 96, 96)),  # up to 768x768, opt 640x640x81
    "large": Profile("large", (5, 32, 32), (21, 128, 128), (31, 128, 128)),  # anything up to 1024x1024
}


def select_profile(frames_latent: int, height_latent: int, width_latent: int, names=None) -> Profile:
    for name in names or PROFILES:
        if PROFILES[name].contains(frames_latent, height_latent, width_latent):
            return PROFILES[name]
    raise ValueError(f"no engine profile covers latent {frames_latent}x{height_latent}x{width_latent}")


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT with a Builder imports; else (False, why)."""
    try:
        import tensorrt as trt
    except Exception as e:
        return False, (f"TensorRT is not installed ({type(e).__name__}: {e}). Engines need the TensorRT builder "
                       "(`pip install tensorrt` on a machine that can reach NVIDIA's package host)")
    if not hasattr(trt, "Builder"):
        return False, f"tensorrt {getattr(trt, '__version__', '?')} here is the lean/dispatch runtime without a Builder"
    return True, f"tensorrt {trt.__version__}"

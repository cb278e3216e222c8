"""`wanrt build`: base model + LoRAs -> fused weights (BF16/FP16 or FP8 + scales) -> ONNX -> TensorRT, with
a manifest. The same inputs again are a cache hit; a changed LoRA strength rebuilds.

Only the experts are run (the ONNX export): the text encoder and the VAE are released as soon as the model is
loaded, and each expert once its weights and ONNX are written. The engines are built last, from the ONNX files
alone, with no torch weights left on the GPU (a 14B expert's engine is 28 GB of weights plus TensorRT's tactic
workspace; the whole model in BF16 is ~69 GB)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanrt.engine_build import manifest as mf
from wanrt.engine_build.lora import LoraSpec, file_sha256, fuse_loras
from wanrt.engine_build.tensorrt_build import (
    PROFILES,
    build_engine,
    check_disk_space,
    profiles_as_dict,
    tensorrt_available,
)
from wanrt.model.components import empty_weights

# The loader is the runtime's (it reads what this module writes); importable from here as before.
from wanrt.runtime.artifacts import load_artifacts_into  # noqa: F401

PRECISIONS = ("bf16", "fp16", "fp32", "fp8")
# Engines are strongly typed: their precision is the ONNX's, so the ONNX for TensorRT is exported in it (by
# engine precision below). fp32 weights get BF16 engines (an A14B expert in fp32 is 57 GB). FP8
# engines need Q/DQ in the (BF16) ONNX, which build_engine checks for: our export has none, so the build stops
# there rather than make BF16 engines under an fp8 label.
ENGINE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "bf16", "fp8": "fp8"}
EXPORT_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


@dataclass
class BuildOptions:
    model: str = "tiny"
    loras: list[LoraSpec] = field(default_factory=list)
    precision: str = "bf16"
    out: Path = Path("artifacts")
    fp8_granularity: str = "channel"
    fp8_exclude: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ("small", "default", "large")
    onnx: bool = True
    tensorrt: bool = True
    allow_unmatched: bool = False
    device: str = "auto"
    force: bool = False

    def key_inputs(self, base: dict) -> dict:
        return {
            "base": base,
            "loras": [{"target": s.target, "sha256": file_sha256(s.path), "strength": s.strength} for s in self.loras],
            "precision": self.precision, "fp8_granularity": self.fp8_granularity, "fp8_exclude": list(self.fp8_exclude),
            "profiles": list(self.profiles), "onnx": self.onnx, "wanrt": mf.tool_versions()["wanrt"],
        }


def _log(msg: str) -> None:
    print(msg, flush=True)


def build(opts: BuildOptions, log=_log) -> dict:
    if opts.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    for name in opts.profiles:
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})")
    for spec in opts.loras:
        if not spec.path.is_file():
            raise FileNotFoundError(f"LoRA file {spec.path} does not exist")
    out = Path(opts.out)
    base = mf.base_fingerprint(opts.model)
    key = mf.build_key(opts.key_inputs(base))
    previous = mf.read_manifest(out)
    if previous and previous.get("key") == key and not opts.force and _outputs_exist(out, previous):
        log(f"cache hit: {out / mf.MANIFEST} was built from the same inputs (key {key[:12]}); nothing to do")
        return {**previous, "cache_hit": True}

    from wanrt.config import Settings
    from wanrt.model.loading import load_model

    settings = Settings(model=opts.model, device=opts.device)
    device = settings.resolved_device()
    # LoRA maths is fp32 either way; full-size experts stay BF16 on the GPU (fp32 would need 2 x 57 GB).
    load_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    model = load_model(opts.model, device, load_dtype)
    log(f"loaded {opts.model} on {device} ({load_dtype}) in {time.perf_counter() - t0:.1f} s")

    reports = fuse_loras(model, opts.loras, allow_unmatched=opts.allow_unmatched)
    for expert, rs in reports.items():
        for r in rs:
            log(f"{expert}-noise expert: LoRA {r.lora} x{r.strength} touched {r.layers_touched} layers"
                + (f", skipped {len(r.skipped)} keys ({', '.join(r.skipped[:3])}...)" if r.skipped else ""))
        if not rs:
            log(f"{expert}-noise expert: no LoRA")

    _release(device, model.text_encoder, model.vae)  # never run here
    out.mkdir(parents=True, exist_ok=True)
    experts_info, engines = {}, []
    for name, expert in model.experts.items():
        experts_info[name], onnx_path = _build_expert(name, expert, model, opts, out, log)
        experts_info[name]["loras"] = [{"file": str(s.path), "sha256": file_sha256(s.path), "strength": s.strength,
                                        "layers_touched": r.layers_touched, "skipped": r.skipped}
                                       for s, r in zip([s for s in opts.loras if s.applies_to(name)], reports[name], strict=False)]
        if onnx_path is not None:
            engines.append((name, onnx_path, expert.config))
        _release(device, expert)  # its weights file and ONNX are written: the next export gets its memory
    for i, (name, onnx_path, cfg) in enumerate(engines):
        experts_info[name].update(_build_engine(name, onnx_path, cfg, model.max_sequence_length, opts, out, log,
                                                experts_left=len(engines) - i))

    trt_ok, trt_why = tensorrt_available()
    if opts.onnx and opts.tensorrt and not trt_ok:
        log(trt_why)
    manifest = {
        "key": key, "base": base, "precision": opts.precision,
        "fp8": {"granularity": opts.fp8_granularity, "exclude": list(opts.fp8_exclude)} if opts.precision == "fp8" else None,
        "profiles": profiles_as_dict(opts.profiles), "experts": experts_info, "boundary_ratio": model.boundary_ratio,
        "tools": mf.tool_versions(), "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "tensorrt": {"built": bool(trt_ok and opts.onnx and opts.tensorrt), "reason": None if trt_ok else trt_why,
                     "precision": ENGINE_PRECISION[opts.precision]},
    }
    mf.write_manifest(out, manifest)
    log(f"wrote {out / mf.MANIFEST}")
    return {**manifest, "cache_hit": False}


def _release(device: str, *modules) -> None:
    """The modules' weights freed in place (each tensor emptied, same dtype and device), so whatever still holds
    them (an exported program waiting for the garbage collector) holds no storage; on CUDA the freed blocks go
    back to the driver, as TensorRT allocates outside torch's cache."""
    empty_weights(*modules)
    if device.startswith("cuda"):
        gc.collect()  # the export's reference cycles may hold views of the weights
        torch.cuda.empty_cache()


def _build_expert(name: str, expert, model, opts: BuildOptions, out: Path, log) -> tuple[dict, Path | None]:
    """Weights file and ONNX of one expert: (its manifest entry, the ONNX to build its engine from, or None when no
    engine is built)."""
    from safetensors.torch import save_file

    from wanrt.engine_build import quantize

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    weights = folder / "expert.safetensors"
    if opts.precision == "fp8":
        sd = quantize.quantize_expert(expert, opts.fp8_granularity, exclude=opts.fp8_exclude)
        save_file(sd, str(weights), metadata={"format": "wanrt-fp8", "granularity": opts.fp8_granularity})
        info["fp8_layers"] = len(quantize.quantizable_layers(expert, exclude=opts.fp8_exclude))
        info["fp8_weight_rel_error"] = quantize.weight_error(expert, sd)
        log(f"{name}: FP8 ({opts.fp8_granularity}) on {info['fp8_layers']} layers; weight rel. error "
            f"mean {info['fp8_weight_rel_error']['mean']:.4f}, max {info['fp8_weight_rel_error']['max']:.4f}")
        if sum(p.numel() for p in expert.parameters()) < 2e9:  # output guard on a CPU copy (the GPU path: issue 6)
            candidate = _copy_with_state(expert, quantize.dequantize_state_dict(sd, torch.float32))
            reference = _copy_with_state(expert, {k: v.float() for k, v in expert.state_dict().items()})
            guard = quantize.quality_guard(reference, candidate)
            info["quality_guard"] = {"cosine": guard.cosine, "rel_error": guard.rel_error,
                                     "max_abs_error": guard.max_abs_error, "passes": guard.passes()}
            log(f"{name}: FP8 guard vs fused weights: cosine {guard.cosine:.5f}, rel. error {guard.rel_error:.4f}")
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.precision]
        keep = set(getattr(expert, "_keep_in_fp32_modules", None) or [])
        sd = {k: (v.float() if any(p in keep for p in k.split(".")) else v.to(dtype)).contiguous().cpu()
              for k, v in expert.state_dict().items()}
        save_file(sd, str(weights), metadata={"format": f"wanrt-{opts.precision}"})
    info["weights"] = str(weights.relative_to(out))
    info["weights_sha256"] = mf.file_fingerprint(weights)
    if not opts.onnx:
        return info, None
    from wanrt.engine_build.onnx_export import export_expert, onnx_parity
    from wanrt.model.components import cast_module

    engines = opts.tensorrt and tensorrt_available()[0]
    if engines:  # in place: the expert's weights file is written already and it is not run again
        cast_module(expert, dtype=EXPORT_DTYPE[ENGINE_PRECISION[opts.precision]])
    t0 = time.perf_counter()
    onnx_path = export_expert(expert, folder / "expert.onnx", text_len=model.max_sequence_length)
    info["onnx"] = str(onnx_path.relative_to(out))
    info["onnx_export_s"] = round(time.perf_counter() - t0, 2)
    # onnxruntime's CPU kernels are fp32: the parity check runs on fp32 exports only
    if next(expert.parameters()).device.type == "cpu" and expert.dtype == torch.float32:
        parity = onnx_parity(expert, onnx_path, text_len=model.max_sequence_length)
        info["onnx_parity"] = [{"shape": p.shape, "max_abs_error": p.max_abs_error, "rel_error": p.rel_error} for p in parity]
        log(f"{name}: ONNX {onnx_path.name} exported in {info['onnx_export_s']} s; onnxruntime parity "
            + ", ".join(f"{p.shape}: max |d| {p.max_abs_error:.2e}" for p in parity))
    return info, onnx_path if engines else None


def _build_engine(name: str, onnx_path: Path, cfg, text_len: int, opts: BuildOptions, out: Path, log,
                  experts_left: int = 1) -> dict:
    """One expert's TensorRT engine from its ONNX (the torch model is released by now): its manifest entries."""
    # this expert's engine and the later experts' (same architecture, so the same size)
    check_disk_space(onnx_path, out, experts_left)
    engine = build_engine(onnx_path, out / name / "engine.plan", [PROFILES[p] for p in opts.profiles],
                          precision=ENGINE_PRECISION[opts.precision], timing_cache=out / "timing.cache",
                          in_channels=cfg.in_channels, text_len=text_len, text_dim=cfg.text_dim)
    log(f"{name}: TensorRT engine {engine.name} (profiles {', '.join(opts.profiles)})")
    # profile -> file and -> optimization profile index (a manifest from before has one file per profile)
    return {"engines": {p: str(engine.relative_to(out)) for p in opts.profiles},
            "engine_profiles": {p: i for i, p in enumerate(opts.profiles)}}


def _copy_with_state(expert, sd):
    import copy

    clone = copy.deepcopy(expert).to("cpu")
    clone.load_state_dict(sd)
    return clone.float().eval()


def _outputs_exist(out: Path, manifest: dict) -> bool:
    for info in manifest.get("experts", {}).values():
        for key in ("weights", "onnx"):
            if info.get(key) and not (out / info[key]).is_file():
                return False
    return True


"""ONNX -> TensorRT engines, one per expert per resolution profile (TensorRT 10 Python API).

BF16/FP16 from the fused ONNX; FP8 from an ONNX with explicit Q/DQ (strongly typed network, so TensorRT
keeps our scales instead of calibrating its own). A timing cache makes rebuilds fast; engines are built
refittable so a LoRA swap only re-uploads weights (`refit_engine`).

The TensorRT builder cannot be installed on our CI machines (PyPI's builder wheel downloads from a host we
cannot reach; the lean runtime wheel has no Builder): `tensorrt_available()` says why, and `wanrt build`
stops after the ONNX stage with that message.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

# Profiles and the availability check are what the runtime reads too, so they live there.
from wanrt.runtime.artifacts import PROFILES, Profile, TensorRTUnavailable, select_profile  # noqa: F401
from wanrt.runtime.artifacts import tensorrt_available as _tensorrt_importable


def tensorrt_available() -> tuple[bool, str]:
    """The runtime's check, with what it means for a build."""
    ok, why = _tensorrt_importable()
    return ok, why if ok else f"{why}; the build stopped after the ONNX stage."


def build_engine(onnx_path: Path, engine_path: Path, profile: Profile, precision: str = "bf16",
                 timing_cache: Path | None = None, in_channels: int = 36, text_len: int = 512, text_dim: int = 4096,
                 workspace_gb: float = 16.0, refittable: bool = True) -> Path:
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(why)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # FP8 comes as explicit Q/DQ in the ONNX: a strongly typed network follows the graph's types exactly.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "fp8" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    opt_profile = builder.create_optimization_profile()
    for name, (mn, op, mx) in profile.input_shapes(in_channels, text_len, text_dim).items():
        opt_profile.set_shape(name, mn, op, mx)
    config.add_optimization_profile(opt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {engine_path.name} for profile {profile.name}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def refit_engine(engine_path: Path, weights: dict[str, "object"]) -> Path:
    """Swap weights (e.g. a new LoRA fused into the same base) without rebuilding: names are the ONNX
    initializer names; values numpy arrays of the same shape and dtype."""
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(why)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    missing = sorted(set(weights) - refittable)
    if missing:
        raise KeyError(f"not refittable in {engine_path.name}: {missing[:10]}")
    for name, array in weights.items():
        refitter.set_named_weights(name, trt.Weights(array))
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"refit of {engine_path.name} failed")
    engine_path.write_bytes(bytes(engine.serialize()))
    return engine_path


def profiles_as_dict(names) -> dict:
    return {n: asdict(PROFILES[n]) for n in names}

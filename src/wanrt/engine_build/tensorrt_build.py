"""ONNX -> TensorRT engines, one per expert holding one optimization profile per resolution bucket (TensorRT 10
and 11 Python API): the weights exist once, on disk and on the GPU (an engine per bucket repeated an A14B expert's
28 GB of BF16 weights per bucket), and each profile still gets the tactics timed for its own shapes.

Networks are strongly typed: the engine's precision is the ONNX's types (a BF16 or FP16 export, or FP8 as
explicit Q/DQ with our scales), never builder flags. TensorRT 11 removed BuilderFlag.FP16/BF16/FP8 (deprecated
since 10.12) and always builds strongly typed; on 10.x the STRONGLY_TYPED creation flag asks for the same. A
timing cache makes rebuilds fast; engines are built refittable so a LoRA swap only re-uploads weights
(`refit_engine`, from torch tensors by pointer: numpy has no bfloat16).

The TensorRT builder cannot be installed on our CI machines (PyPI's builder wheel downloads from a host we
cannot reach; the lean runtime wheel has no Builder): `tensorrt_available()` says why, and `wanrt build`
stops after the ONNX stage with that message.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

# Profiles and the availability check are what the runtime reads too, so they live there.
from wanrt.runtime.artifacts import PROFILES, Profile, TensorRTUnavailable, select_profile  # noqa: F401
from wanrt.runtime.artifacts import tensorrt_available as _tensorrt_importable

# ModelOpt writes these TensorRT custom ops instead of QuantizeLinear/DequantizeLinear below opset 19.
_TRT_FP8_QDQ = ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear")


class DiskSpaceError(OSError, ValueError):
    """Too little disk for the engines. A ValueError too, so `wanrt build` reports it as a message (exit 2)."""


def tensorrt_available() -> tuple[bool, str]:
    """The runtime's check, with what it means for a build."""
    ok, why = _tensorrt_importable()
    return ok, why if ok else f"{why}; the build stopped after the ONNX stage."


# ------------------------------------------------------------------------------------------------ the ONNX side
def _load_graph(onnx_path: Path):
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)  # the graph only: a 14B expert's data stays on disk


def has_fp8_qdq(model) -> bool:
    """Whether the graph quantizes to FP8 explicitly: a Q/DQ node with a float8e4m3fn input, output, zero point
    or output_dtype (opset 19+), or ModelOpt's TRT_FP8 custom Q/DQ ops."""
    from onnx import TensorProto

    fp8, graph = TensorProto.FLOAT8E4M3FN, model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    types |= {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types |= {node.output[0]: a.t.data_type for node in graph.node if node.op_type == "Constant"
              for a in node.attribute if a.name == "value"}
    for node in graph.node:
        if node.op_type in _TRT_FP8_QDQ:
            return True
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if any(a.name == "output_dtype" and a.i == fp8 for a in node.attribute):
                return True
            if any(types.get(n) == fp8 for n in (*node.input, *node.output)):
                return True
    return False


def onnx_precision(onnx_path: Path) -> str:
    """The precision a strongly typed build of this ONNX gets: "fp8" with FP8 Q/DQ, else its reduced-precision
    weight type ("bf16", "fp16"; fp32 modules such as norms beside them are expected), "fp32" when there is
    none, or e.g. "bf16+fp16" when mixed."""
    from onnx import TensorProto

    model = _load_graph(onnx_path)
    if has_fp8_qdq(model):
        return "fp8"
    low = {TensorProto.BFLOAT16: "bf16", TensorProto.FLOAT16: "fp16"}
    return "+".join(sorted({low[t.data_type] for t in model.graph.initializer if t.data_type in low})) or "fp32"


def check_onnx_precision(onnx_path: Path, precision: str) -> None:
    """Stop before building when the ONNX's types would give another precision than asked for."""
    got = onnx_precision(onnx_path)
    if got == precision:
        return
    if precision == "fp8":
        raise ValueError(
            f"{onnx_path} has no FP8 Q/DQ (QuantizeLinear/DequantizeLinear with float8e4m3fn types), so a TensorRT "
            f"build of it would be {got}, not FP8. The FP8 weights of `wanrt build --precision fp8` serve the torch "
            "backends; for FP8 engines quantize the ONNX with Q/DQ first (e.g. NVIDIA ModelOpt), or build "
            "--precision bf16 engines.")
    raise ValueError(f"{onnx_path} holds {got} weights but {precision} engines were asked for: strongly typed "
                     f"TensorRT keeps the ONNX's types (TensorRT 11 has no FP16/BF16 builder flags), so export "
                     f"the ONNX in {precision}.")


def onnx_bytes(onnx_path: Path) -> int:
    """The ONNX file and its external-data files: about what one engine of it takes on disk (it embeds the
    weights)."""
    from onnx import TensorProto

    files = {e.value for t in _load_graph(onnx_path).graph.initializer if t.data_location == TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return onnx_path.stat().st_size + sum((onnx_path.parent / f).stat().st_size for f in files)


def check_disk_space(onnx_path: Path, out_dir: Path, n_engines: int) -> int:
    """Fail before building when `n_engines` engines of this ONNX will not fit in `out_dir` (an A14B expert's
    engine is about 28 GB in BF16). Returns the bytes needed."""
    per_engine = onnx_bytes(onnx_path)
    need, free = per_engine * n_engines, shutil.disk_usage(out_dir).free
    if need > free:
        raise DiskSpaceError(f"not enough disk for the TensorRT engines: {n_engines} engine(s) of about "
                             f"{per_engine / 1e9:.1f} GB each (the size of {onnx_path.name} with its external "
                             f"data) need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free in {out_dir}")
    return need


# ------------------------------------------------------------------------------------------------ TensorRT
def build_engine(onnx_path: Path, engine_path: Path, profiles: Profile | Sequence[Profile], precision: str = "bf16",
                 timing_cache: Path | None = None, in_channels: int = 36, text_len: int = 512, text_dim: int = 4096,
                 workspace_gb: float = 16.0, refittable: bool = True) -> Path:
    """One engine with an optimization profile per entry of `profiles`, in order (the runtime selects one by its
    index: manifest `engine_profiles`). `precision` is what the ONNX's types must give (checked first); it sets no
    builder flag."""
    profiles = [profiles] if isinstance(profiles, Profile) else list(profiles)
    if not profiles:
        raise ValueError("build_engine needs at least one profile")
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(why)
    check_onnx_precision(Path(onnx_path), precision)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 10.x builds weakly typed without it (FP32 unless precision flags allow less); 11 accepts it, always typed.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    for profile in profiles:
        opt_profile = builder.create_optimization_profile()
        for name, (mn, op, mx) in profile.input_shapes(in_channels, text_len, text_dim).items():
            opt_profile.set_shape(name, mn, op, mx)
        config.add_optimization_profile(opt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {engine_path.name} for profiles "
                           f"{', '.join(p.name for p in profiles)}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def trt_dtype(trt, dtype: torch.dtype):
    table = {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16,
             torch.float8_e4m3fn: trt.DataType.FP8, torch.int8: trt.DataType.INT8, torch.int32: trt.DataType.INT32,
             torch.int64: trt.DataType.INT64}
    if dtype not in table:
        raise TypeError(f"TensorRT has no weights type for {dtype}")
    return table[dtype]


def refit_engine(engine_path: Path, weights: Mapping[str, torch.Tensor]) -> Path:
    """Swap weights (e.g. a new LoRA fused into the same base) without rebuilding: names are the ONNX
    initializer names, values torch tensors (CPU or CUDA) of the engine's type and size. They are handed to
    TensorRT by pointer (numpy has no bfloat16), so each is kept alive until the refit has finished."""
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(why)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load {engine_path} (built for another GPU or TensorRT version?)")
    refitter = trt.Refitter(engine, logger)
    unknown = sorted(set(weights) - set(refitter.get_all_weights()))
    if unknown:
        raise KeyError(f"not refittable in {engine_path.name}: {unknown[:10]}")
    alive = []  # TensorRT reads these buffers in refit_cuda_engine, not in set_named_weights
    for name, tensor in weights.items():
        t = tensor.detach().contiguous()
        dtype, expected = trt_dtype(trt, t.dtype), refitter.get_weights_prototype(name)
        if dtype != expected.dtype or t.numel() != expected.size:
            raise ValueError(f"{name}: {t.dtype} x {t.numel()} given, {engine_path.name} holds "
                             f"{expected.dtype} x {expected.size}")
        location = trt.TensorLocation.DEVICE if t.is_cuda else trt.TensorLocation.HOST
        if not refitter.set_named_weights(name, trt.Weights(dtype, t.data_ptr(), t.numel()), location):
            raise RuntimeError(f"TensorRT rejected the new weights {name!r} for {engine_path.name}")
        alive.append(t)
    missing = list(refitter.get_missing_weights())
    if missing:
        raise KeyError(f"{engine_path.name} also needs these weights refit with them: {missing[:10]}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"refit of {engine_path.name} failed")
    del alive
    engine_path.write_bytes(bytes(engine.serialize()))
    return engine_path


def profiles_as_dict(names) -> dict:
    return {n: asdict(PROFILES[n]) for n in names}

"""TensorRT 10/11 build, refit and runtime paths on CPU, against a fake `tensorrt` module.

The builder cannot be installed here, so `fake_tensorrt` stands in for it: the real module's names and enums
(TensorRT 10.x, or 11.x where BuilderFlag.FP16/BF16/FP8/INT8 are gone), recording every call. What needs the
real builder and a GPU (engines that run) is in test_engine_build.py, marked gpu.
"""

import copy
import ctypes
import enum
import importlib.machinery
import re
import shutil
import sys
import types
from collections import namedtuple

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from wanrt.engine_build import tensorrt_build as tb
from wanrt.engine_build.build import BuildOptions, build

ELEMENT_BYTES = {"FLOAT": 4, "HALF": 2, "BF16": 2, "FP8": 1, "INT8": 1, "INT32": 4, "INT64": 8}


def fake_tensorrt(version: str) -> types.ModuleType:
    """A `tensorrt` module with the real API's names for what wanrt calls; `trt.calls` records them."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks tensorrt up by spec
    trt.__version__ = version
    trt.calls = []
    trt.engine_weights = {}  # name -> (DataType, count): what a deserialized engine holds refittable
    trt.refit_bytes = {}  # name -> the bytes TensorRT read at refit time
    eleven = version.startswith("11.")
    trt.DataType = enum.IntEnum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64 INT4", start=0)
    trt.TensorLocation = enum.IntEnum("TensorLocation", "DEVICE HOST", start=0)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM DLA_LOCAL_DRAM", start=0)
    # 11.x: strongly typed always (the creation flag stays, ignored); the weak-typing builder flags are removed
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", "STRONGLY_TYPED" if eleven else "EXPLICIT_BATCH STRONGLY_TYPED", start=0)
    trt.BuilderFlag = enum.IntEnum(
        "BuilderFlag", "DEBUG REFIT TF32 STRIP_PLAN" if eleven else "FP16 INT8 DEBUG REFIT TF32 FP8 BF16 STRIP_PLAN",
        start=0)

    class Logger:
        WARNING = 2

        def __init__(self, severity=WARNING):
            self.severity = severity

    class Weights:
        def __init__(self, *args):
            if len(args) == 3:  # (type, ptr, count)
                self.dtype, self.ptr, self.size = args
            else:  # (numpy.ndarray,): TensorRT converts with numpy, which has no bfloat16
                array = np.ascontiguousarray(np.asarray(args[0]))
                self.dtype = {np.float32: trt.DataType.FLOAT, np.float16: trt.DataType.HALF}[array.dtype.type]
                self.ptr, self.size, self._keep = array.ctypes.data, array.size, array

    class Network:
        def __init__(self, flags):
            self.flags = flags

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            trt.calls.append(("parse_from_file", path))
            return True

        def get_error(self, i):
            raise IndexError(i)

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+tuned"

    class BuilderConfig:
        def __init__(self):
            self.flags, self.profiles, self.cache = set(), [], None

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build_serialized_network", network.flags, frozenset(config.flags), config.profiles))
            n = len(config.profiles)
            return memoryview(b"plan" + (f":{n}".encode() if n != 1 else b""))

    trt.ExecutionContextAllocationStrategy = enum.IntEnum(
        "ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED", start=0)

    class Context:
        """Runs 'velocity' = the first 16 channels of hidden_states x (selected profile + 1), through the
        addresses it was given (float32 CPU tensors), so a test sees which profile ran on which input."""

        def __init__(self, engine, strategy):
            self.engine, self.strategy, self.profile, self.shapes, self.addresses = engine, strategy, 0, {}, {}

        def set_optimization_profile_async(self, index, stream):
            trt.calls.append(("set_optimization_profile_async", index))
            ok = 0 <= index < self.engine.num_optimization_profiles
            self.profile = index if ok else self.profile
            return ok

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def get_tensor_shape(self, name):
            b, _, f, h, w = self.shapes["hidden_states"]
            return (b, 16, f, h, w)

        def execute_async_v3(self, stream):
            def view(name, shape):
                n = int(np.prod(shape))
                return np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses[name])).reshape(shape)

            x = view("hidden_states", self.shapes["hidden_states"])
            view("velocity", self.get_tensor_shape("velocity"))[:] = x[:, :16] * (self.profile + 1)
            return True

    class Engine:
        def __init__(self, data):
            self.data = data
            found = re.match(rb"plan:(\d+)", data)
            self.num_optimization_profiles = int(found.group(1)) if found else 1

        def serialize(self):
            return memoryview(self.data + b"+refit")

        def create_execution_context(self, strategy=trt.ExecutionContextAllocationStrategy.STATIC):
            trt.calls.append(("create_execution_context", strategy))
            return Context(self, strategy)

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            trt.calls.append(("deserialize_cuda_engine", len(data)))
            return Engine(data)

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.new = engine, {}

        def get_all_weights(self):
            return list(trt.engine_weights)

        def get_weights_prototype(self, name):
            dtype, count = trt.engine_weights[name]
            return Weights(dtype, 0, count)

        def set_named_weights(self, name, weights, location=trt.TensorLocation.HOST):
            trt.calls.append(("set_named_weights", name, weights.dtype, weights.size, location))
            if (weights.dtype, weights.size) != trt.engine_weights.get(name):
                return False
            self.new[name] = weights
            return True

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):  # reads the buffers now: they must still be alive
            for name, w in self.new.items():
                trt.refit_bytes[name] = ctypes.string_at(w.ptr, w.size * ELEMENT_BYTES[w.dtype.name])
            return True

    for cls in (Logger, Weights, OnnxParser, Builder, Runtime, Refitter):  # Engine, Context: made by them
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture(params=["10.13.0", "11.0.0"])
def trt(request, monkeypatch):
    fake = fake_tensorrt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def matmul_onnx(path, dtype=TensorProto.BFLOAT16):
    """x @ w with `w` an initializer of `dtype`: the smallest ONNX of that precision."""
    torch_dtype = {TensorProto.BFLOAT16: torch.bfloat16, TensorProto.FLOAT16: torch.float16,
                   TensorProto.FLOAT: torch.float32}[dtype]
    w = helper.make_tensor("w", dtype, [4, 4], _raw(torch.randn(4, 4).to(torch_dtype)), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", dtype, [1, 4])],
                              [helper.make_tensor_value_info("y", dtype, [1, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def fp8_qdq_onnx(path):
    """BF16 activations quantized to FP8 and back, FP8 weights dequantized: explicit quantization as ModelOpt
    writes it."""
    scale = helper.make_tensor("s", TensorProto.BFLOAT16, [], _raw(torch.tensor(0.1, dtype=torch.bfloat16)), raw=True)
    zero = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True)
    w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [4, 4],
                           _raw(torch.randn(4, 4).to(torch.float8_e4m3fn)), raw=True)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 4])], [scale, zero, w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def built(trt) -> list:
    return [c for c in trt.calls if c[0] == "build_serialized_network"]


# ------------------------------------------------------------------------------------------------ 1. strong typing
def test_bf16_engine_builds_strongly_typed_without_precision_flags(trt, tmp_path):
    """TensorRT 11 has no BuilderFlag.FP16/BF16 (10.x deprecates them): the build never touches them; the
    network is strongly typed and the ONNX's BF16 types are the engine's precision."""
    if trt.__version__.startswith("11."):
        assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "BF16")
    onnx_path = matmul_onnx(tmp_path / "e.onnx")
    engine = tb.build_engine(onnx_path, tmp_path / "e.plan", tb.PROFILES["small"], precision="bf16",
                             timing_cache=tmp_path / "t.cache", text_dim=32)
    assert engine.read_bytes() == b"plan" and (tmp_path / "t.cache").read_bytes() == b"+tuned"
    [(_, flags, config_flags, profiles)] = built(trt)
    assert flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert config_flags == {trt.BuilderFlag.REFIT}  # on 10.x too: no FP16/BF16/FP8 flag
    assert profiles[0].shapes["hidden_states"][2] == (2, 36, 31, 64, 64)


def test_build_refuses_an_onnx_of_another_precision(trt, tmp_path):
    """Strongly typed, an FP32 ONNX would give an FP32 engine: asking for BF16 says so instead."""
    onnx_path = matmul_onnx(tmp_path / "e.onnx", TensorProto.FLOAT)
    with pytest.raises(ValueError, match="holds fp32 weights but bf16 engines"):
        tb.build_engine(onnx_path, tmp_path / "e.plan", tb.PROFILES["small"], precision="bf16")
    assert not built(trt)
    assert tb.onnx_precision(matmul_onnx(tmp_path / "h.onnx", TensorProto.FLOAT16)) == "fp16"


# ------------------------------------------------------------------------------------------------ 2. FP8 needs Q/DQ
def test_fp8_engine_from_a_bf16_only_onnx_stops_naming_the_problem(trt, tmp_path):
    onnx_path = matmul_onnx(tmp_path / "e.onnx")
    with pytest.raises(ValueError, match=r"no FP8 Q/DQ .*float8e4m3fn.* would be bf16, not FP8"):
        tb.build_engine(onnx_path, tmp_path / "e.plan", tb.PROFILES["small"], precision="fp8")
    assert not built(trt) and not (tmp_path / "e.plan").exists()


def test_fp8_engine_from_a_qdq_onnx_is_strongly_typed(trt, tmp_path):
    onnx_path = fp8_qdq_onnx(tmp_path / "q.onnx")
    assert tb.onnx_precision(onnx_path) == "fp8"
    tb.build_engine(onnx_path, tmp_path / "q.plan", tb.PROFILES["small"], precision="fp8")
    [(_, flags, config_flags, _)] = built(trt)
    assert flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert config_flags == {trt.BuilderFlag.REFIT}  # FP8 from the Q/DQ, not BuilderFlag.FP8


def test_qdq_detection_reads_modelopt_custom_ops_and_ignores_int8():
    def graph(*nodes, inits=()):
        return helper.make_model(helper.make_graph(list(nodes), "g", [], [], list(inits)))

    assert tb.has_fp8_qdq(graph(helper.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["q"], domain="trt")))
    int8_zero = helper.make_tensor("zp", TensorProto.INT8, [], b"\x00", raw=True)
    assert not tb.has_fp8_qdq(graph(helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]), inits=[int8_zero]))
    assert tb.has_fp8_qdq(graph(helper.make_node("QuantizeLinear", ["x", "s"], ["q"],
                                                 output_dtype=TensorProto.FLOAT8E4M3FN)))


# ------------------------------------------------------------------------------------------------ 3. refit
def test_bf16_refit_passes_torch_memory_by_pointer(trt, tmp_path):
    """numpy has no bfloat16 (a BF16 tensor's .numpy() raises): the refit hands TensorRT the tensor's own
    memory, kept alive until refit_cuda_engine has read it (a non-contiguous input gets a copy that must be)."""
    w = torch.randn(8, 4).to(torch.bfloat16).t()  # non-contiguous
    with pytest.raises(TypeError):
        w.numpy()
    trt.engine_weights = {"blocks.0.attn1.to_q.weight": (trt.DataType.BF16, 32)}
    (tmp_path / "e.plan").write_bytes(b"plan")
    tb.refit_engine(tmp_path / "e.plan", {"blocks.0.attn1.to_q.weight": w})
    assert ("set_named_weights", "blocks.0.attn1.to_q.weight", trt.DataType.BF16, 32, trt.TensorLocation.HOST) \
        in trt.calls
    assert trt.refit_bytes["blocks.0.attn1.to_q.weight"] == _raw(w)
    assert (tmp_path / "e.plan").read_bytes() == b"plan+refit"


def test_refit_names_wrong_weights(trt, tmp_path):
    trt.engine_weights = {"w": (trt.DataType.BF16, 16)}
    (tmp_path / "e.plan").write_bytes(b"plan")
    with pytest.raises(KeyError, match="not refittable"):
        tb.refit_engine(tmp_path / "e.plan", {"v": torch.zeros(16, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=r"w: torch.float32 x 16 given, e.plan holds"):
        tb.refit_engine(tmp_path / "e.plan", {"w": torch.zeros(16)})
    assert not trt.refit_bytes


# ------------------------------------------------------------------------------------------------ 5. disk space
def test_disk_space_is_checked_with_the_numbers(tmp_path, monkeypatch):
    model = onnx.load(str(matmul_onnx(tmp_path / "e.onnx")))
    onnx.save(model, str(tmp_path / "x.onnx"), save_as_external_data=True, location="x.onnx.data",
              size_threshold=0)
    size = (tmp_path / "x.onnx").stat().st_size + (tmp_path / "x.onnx.data").stat().st_size
    assert (tmp_path / "x.onnx.data").stat().st_size == 32 and tb.onnx_bytes(tmp_path / "x.onnx") == size
    assert tb.check_disk_space(tmp_path / "x.onnx", tmp_path, 6) == 6 * size
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(40 * 10**9, 37 * 10**9, 3 * 10**9))
    monkeypatch.setattr(tb, "onnx_bytes", lambda p: 28 * 10**9)  # an A14B expert in BF16
    with pytest.raises(tb.DiskSpaceError, match=r"6 engine\(s\) of about 28.0 GB .* need 168.0 GB, 3.0 GB free in "
                                               + re.escape(str(tmp_path))):
        tb.check_disk_space(tmp_path / "x.onnx", tmp_path, 6)


# ------------------------------------------------------------------------------------------------ `wanrt build`
@pytest.fixture
def trt11(monkeypatch):
    fake = fake_tensorrt("11.0.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


@pytest.mark.slow  # a whole `wanrt build` (ONNX export of the experts): the checks are unit-tested above
def test_build_exports_bf16_and_checks_disk_before_each_experts_engines(trt11, tmp_path, monkeypatch):
    """`wanrt build` with TensorRT and --precision fp32: the ONNX is exported in BF16 (the engines' precision) and
    the engines are built strongly typed, each expert's only after a disk check; the second expert finds too
    little disk and stops before building anything, with the numbers."""
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage

    def disk_usage(path):
        trt11.calls.append(("disk_usage",))
        return real(path) if len(trt11.calls) == 1 else usage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = tmp_path / "a"
    with pytest.raises(tb.DiskSpaceError, match=r"1 engine\(s\) of about .* GB free in " + re.escape(str(out))):
        build(BuildOptions(model="tiny", precision="fp32", out=out, profiles=("small", "default")), log=lambda m: None)
    assert [c[0] for c in trt11.calls if c[0] != "parse_from_file"] == [
        "disk_usage", "create_network", "set_memory_pool_limit", "build_serialized_network", "disk_usage"]
    [(_, flags, _, profiles)] = built(trt11)  # one engine for both profiles
    assert flags == 1 << int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) and len(profiles) == 2
    assert tb.onnx_precision(out / "high" / "expert.onnx") == "bf16"
    assert (out / "high" / "engine.plan").is_file() and not (out / "low" / "engine.plan").exists()


@pytest.mark.slow  # a whole `wanrt build` (ONNX export of the experts): the checks are unit-tested above
def test_build_fp8_with_tensorrt_stops_instead_of_making_bf16_engines(trt11, tmp_path):
    with pytest.raises(ValueError, match="no FP8 Q/DQ"):
        build(BuildOptions(model="tiny", precision="fp8", out=tmp_path / "a", profiles=("small",)), log=lambda m: None)
    assert not built(trt11) and not (tmp_path / "a" / "manifest.json").exists()


@pytest.mark.slow  # a whole `wanrt build` (ONNX export of the experts), then the runtime factory on its output
def test_build_writes_one_engine_per_expert_and_the_runtime_serves_every_profile_from_it(trt11, tmp_path, image64):
    """`wanrt build` -> manifest (profile -> file, -> optimization profile index) -> build_runtime(tensorrt): the
    torch experts are released and the memory ledger counts the engines in their place; requests of two
    profiles run on one engine file per expert."""
    from wanrt.config import Settings
    from wanrt.params import GenerateParams
    from wanrt.runtime.factory import build_runtime
    from wanrt.runtime.memory import tiered

    out = tmp_path / "a"
    manifest = build(BuildOptions(model="tiny", precision="fp32", out=out, profiles=("small", "default")),
                     log=lambda m: None)
    high = manifest["experts"]["high"]
    assert high["engines"] == {"small": "high/engine.plan", "default": "high/engine.plan"}
    assert high["engine_profiles"] == {"small": 0, "default": 1} and len(built(trt11)) == 2
    pipe = build_runtime(Settings(device="cpu", backend="tensorrt", artifacts=str(out), warmup=""))
    t = tiered(pipe.backend)
    assert t.ledger.parts["expert_high"] == (out / "high" / "engine.plan").stat().st_size > 0
    for side, frames in ((256, 17), (528, 17)):  # small (<= 512 px), then default
        pipe.generate(GenerateParams(prompt="x", width=side, height=side, frames=frames, steps=2), image64, None)
    assert [c[1] for c in trt11.calls if c[0] == "set_optimization_profile_async"] == [0, 0, 1, 1]  # per expert
    assert t.inner.loads == 2 and t.inner.describe()["loaded"] == ["high/engine.plan", "low/engine.plan"]


# ------------------------------------------------------------------------------------------------ 4. runtime
def _artifacts(tmp_path, missing: str | None = None) -> dict:
    engines = {}
    for expert in ("high", "low"):
        engines[expert] = {"small": f"{expert}/engine_small.plan"}
        if expert != missing:
            (tmp_path / expert).mkdir()
            (tmp_path / expert / "engine_small.plan").write_bytes(b"plan")
    return {"experts": {e: {"engines": f} for e, f in engines.items()}, "profiles": {"small": {}}}


def test_tensorrt_backend_releases_the_torch_experts(trt11, tmp_path, tiny_model):
    from wanrt.runtime.backends.tensorrt import TensorRTBackend

    model = copy.deepcopy(tiny_model)
    expert_bytes = sum(t.numel() * t.element_size() for m in model.experts.values()
                       for t in (*m.parameters(), *m.buffers()))
    te_before = [p.clone() for p in model.text_encoder.parameters()]
    backend = TensorRTBackend(tmp_path, _artifacts(tmp_path), device="cpu", model=model)
    for expert in model.experts.values():
        assert all(t.numel() == 0 and t.untyped_storage().nbytes() == 0
                   for t in (*expert.parameters(), *expert.buffers()))
        assert expert.dtype == torch.float32  # dtype and device as before, for code that asks
    assert backend.released == ["high", "low"] and backend.released_bytes == expert_bytes
    assert all(torch.equal(a, b) for a, b in zip(te_before, model.text_encoder.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="torch high-noise expert was released: its weights are in the TensorRT"):
        model.transformer_high(hidden_states=torch.zeros(1, 36, 1, 4, 4), timestep=torch.zeros(1),
                               encoder_hidden_states=torch.zeros(1, 512, 32))
    assert backend.describe()["torch_experts_released"]["experts"] == ["high", "low"]


def _denoise(backend, frames: int, side: int) -> torch.Tensor:
    x = torch.rand(2, 36, frames, side, side) + 1  # no zero to divide by
    out = backend.denoise("high", x, torch.full((2,), 900.0), torch.zeros(2, 512, 32))
    return out / x[:, :16]  # the fake context scales by (selected profile + 1)


def test_one_engine_per_expert_switches_its_optimization_profile(trt11, tmp_path):
    """An engine holds every resolution profile (the weights once): the backend loads each expert's file once,
    makes one execution context (activation memory per profile in use) and selects the request's profile on
    it only when it changes."""
    from wanrt.runtime.backends.tensorrt import TensorRTBackend

    experts = {}
    for expert in ("high", "low"):
        tb.build_engine(matmul_onnx(tmp_path / f"{expert}.onnx"), tmp_path / expert / "engine.plan",
                        [tb.PROFILES["small"], tb.PROFILES["default"]], text_dim=32)
        experts[expert] = {"engines": {"small": f"{expert}/engine.plan", "default": f"{expert}/engine.plan"},
                           "engine_profiles": {"small": 0, "default": 1}}
    manifest = {"experts": experts, "profiles": {"small": {}, "default": {}}}
    backend = TensorRTBackend(tmp_path, manifest, device="cpu")
    assert len(built(trt11)[0][3]) == 2  # two optimization profiles in one build
    assert torch.allclose(_denoise(backend, 5, 32), torch.tensor(1.0))  # small: profile 0
    assert torch.allclose(_denoise(backend, 21, 80), torch.tensor(2.0))  # default: profile 1, same engine
    assert torch.allclose(_denoise(backend, 21, 80), torch.tensor(2.0))
    assert torch.allclose(_denoise(backend, 5, 32), torch.tensor(1.0))
    switches = [c[1] for c in trt11.calls if c[0] == "set_optimization_profile_async"]
    assert switches == [0, 1, 0] and backend.loads == 1
    assert [c[1] for c in trt11.calls if c[0] == "create_execution_context"] == [
        trt11.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE]
    d = backend.describe()
    assert d["engine_files"]["high"] == ["high/engine.plan"] and d["loaded"] == ["high/engine.plan"]
    assert backend.expert_bytes == {"high": len(b"plan:2"), "low": len(b"plan:2")}
    experts["high"]["engine_profiles"]["default"] = 2  # a manifest that does not match its engine
    with pytest.raises(RuntimeError, match="has 2 optimization profile"):
        TensorRTBackend(tmp_path, manifest, device="cpu").denoise("high", torch.randn(2, 36, 21, 80, 80),
                                                                  torch.zeros(2), torch.zeros(2, 512, 32))


def test_a_plan_that_is_not_resident_keeps_one_experts_engine_loaded(trt11, tmp_path, tiny_model):
    """Not resident (one_expert_at_a_time): the other expert's engine is dropped before one is loaded, so the GPU
    never holds both experts' weights; resident, both stay. Left out, the switch follows where the torch experts
    are (the runtime factory loads them on the host for every plan but resident)."""
    from wanrt.runtime.backends.tensorrt import TensorRTBackend

    high, low = "high/engine_small.plan", "low/engine_small.plan"
    for one, loaded, loads in ((True, [[high], [low]], 3), (False, [[high], [high, low]], 2)):
        root = tmp_path / str(one)
        root.mkdir()
        backend = TensorRTBackend(root, _artifacts(root), device="cpu", one_expert_at_a_time=one)
        seen = []
        for expert in ("high", "low", "high"):
            backend.denoise(expert, torch.rand(2, 36, 5, 32, 32), torch.full((2,), 900.0), torch.zeros(2, 512, 32))
            seen.append(sorted(backend._loaded))
        assert seen == [*loaded, loaded[0] if one else loaded[1]] and backend.loads == loads
        assert backend.describe()["one_expert_at_a_time"] is one
    # experts on the host while the engines run on the GPU: the factory's placement for a plan that is not resident
    for name, device, model, one in (("g", "cuda", copy.deepcopy(tiny_model), True), ("c", "cpu", None, False)):
        root = tmp_path / name
        root.mkdir()
        assert TensorRTBackend(root, _artifacts(root), device=device, model=model).one_expert_at_a_time is one


def test_engine_per_profile_artifacts_keep_one_file_per_expert_loaded(trt11, tmp_path):
    """Artifacts built before (an engine file per profile, each holding the expert's weights) still run, but a
    second file of the same expert replaces the first on the GPU instead of joining it (two A14B experts x three
    profiles of BF16 engines is 170 GB)."""
    from wanrt.runtime.backends.tensorrt import TensorRTBackend

    (tmp_path / "high").mkdir()
    for profile in ("small", "default"):
        (tmp_path / "high" / f"engine_{profile}.plan").write_bytes(b"plan")
    manifest = {"experts": {"high": {"engines": {p: f"high/engine_{p}.plan" for p in ("small", "default")}}},
                "profiles": {"small": {}, "default": {}}}
    backend = TensorRTBackend(tmp_path, manifest, device="cpu")
    assert torch.allclose(_denoise(backend, 5, 32), torch.tensor(1.0))
    assert torch.allclose(_denoise(backend, 21, 80), torch.tensor(1.0))  # its own file, profile 0
    assert backend.describe()["loaded"] == ["high/engine_default.plan"] and backend.loads == 2
    _denoise(backend, 5, 32)
    assert backend.describe()["loaded"] == ["high/engine_small.plan"] and backend.loads == 3


def test_tensorrt_backend_keeps_torch_experts_when_asked_or_when_engines_are_missing(trt11, tmp_path, tiny_model):
    from wanrt.runtime.backends.tensorrt import TensorRTBackend

    model = copy.deepcopy(tiny_model)
    weights = model.transformer_low.proj_out.weight.clone()
    TensorRTBackend(tmp_path, _artifacts(tmp_path), device="cpu", model=model, keep_torch_experts=True)
    assert torch.equal(model.transformer_low.proj_out.weight, weights)
    missing = tmp_path / "m"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="low/engine_small.plan"):
        TensorRTBackend(missing, _artifacts(missing, missing="low"), device="cpu", model=model)
    assert torch.equal(model.transformer_low.proj_out.weight, weights)

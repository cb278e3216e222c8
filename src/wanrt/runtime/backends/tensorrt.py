"""TensorRT backend: the engines `wanrt build` made, one per expert with an optimization profile per resolution
bucket (TensorRT 10 and 11 API).

Inputs and outputs stay torch CUDA tensors (addresses handed to the execution context), run on torch's
current stream, so the pipeline around it is unchanged. The profile is chosen per request from the latent
shape and selected on the expert's one execution context (its activation memory follows the profile in use).
Artifacts from before (an engine file per profile) still run, one file per expert on the GPU at a time: the
others are dropped before another is loaded, as each holds the expert's weights again. Chosen only when
`tensorrt` imports and artifacts with engines are given.

`one_expert_at_a_time` (a memory plan that is not resident): the other expert's engine is dropped before one is
loaded, so the GPU holds one expert's weights (28.6 GB in BF16) instead of both; each expert switch of a request
reads and uploads an engine again. Left out, it is inferred from where the torch experts are: the runtime factory
loads them on the host for every plan but resident.

The engines embed the experts' weights, so the torch experts are released once the engine files are found
(`release_torch_experts`): an A14B expert is 28 GB in BF16, and an engine loaded beside both torch experts
would not fit an 80 GB card. `keep_torch_experts=True` keeps them (e.g. to compare with the eager backend).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from wanrt.model.components import empty_weights
from wanrt.runtime.artifacts import INPUT_NAMES, OUTPUT_NAMES, select_profile


def _torch_dtype(trt, dt):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
    return table[dt]


def release_torch_experts(model, names) -> int:
    """Empty the named experts' parameters and buffers (same dtype and device, no storage) and make calling them
    an error that says why. Returns the bytes released."""
    experts = [model.experts[name] for name in names]
    released = empty_weights(*experts)  # the emptied tensors stay on their devices
    for name, expert in zip(names, experts, strict=True):
        expert.register_forward_pre_hook(_released(name))
    if any(t.is_cuda for expert in experts for t in (*expert.parameters(), *expert.buffers())):
        torch.cuda.empty_cache()  # TensorRT allocates outside torch's cache: hand the blocks back to the driver
    return released


def _released(name: str):
    def refuse(module, args):
        raise RuntimeError(f"the torch {name}-noise expert was released: its weights are in the TensorRT engines "
                           "only (run it through the tensorrt backend, or create that with keep_torch_experts=True)")

    return refuse


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifacts: Path, manifest: dict, device: str = "cuda", model=None,
                 keep_torch_experts: bool = False, one_expert_at_a_time: bool | None = None):
        import tensorrt as trt

        self.trt = trt
        self.artifacts = Path(artifacts)
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine_files = {name: info.get("engines", {}) for name, info in manifest["experts"].items()}
        if not any(self.engine_files.values()):
            raise FileNotFoundError(f"{self.artifacts} has no TensorRT engines (build them on a GPU with `wanrt build`)")
        missing = [str(self.artifacts / f) for files in self.engine_files.values() for f in files.values()
                   if not (self.artifacts / f).is_file()]
        if missing:
            raise FileNotFoundError(f"TensorRT engines listed in the manifest are missing: {', '.join(missing)}")
        self.profiles = list(manifest["profiles"])
        # profile -> optimization profile index within its engine file (absent: one file per profile, index 0)
        self.profile_index = {name: info.get("engine_profiles", {}) for name, info in manifest["experts"].items()}
        self._loaded: dict[str, list] = {}  # engine file -> [engine, execution context, selected profile index]
        # Concurrency slots share this backend: a context's profile, shapes and addresses are set and enqueued as
        # one step (the enqueue is asynchronous, so the lock is held for microseconds of host work)
        self._lock = threading.Lock()
        self.loads = 0  # engine deserializations (each reads and uploads a whole expert)
        if one_expert_at_a_time is None:  # before the release below empties them (same devices)
            one_expert_at_a_time = self.device.type == "cuda" and model is not None and all(
                t.device.type == "cpu" for m in model.experts.values() for t in (*m.parameters(), *m.buffers()))
        self.one_expert_at_a_time = one_expert_at_a_time
        # An expert without engines would still run in torch; the others' weights live in the engines.
        self.released = [] if model is None or keep_torch_experts else [n for n, f in self.engine_files.items() if f]
        self.released_bytes = release_torch_experts(model, self.released) if self.released else 0

    @property
    def expert_bytes(self) -> dict[str, int]:
        """The device bytes each expert's engine holds (its largest file: one is loaded at a time), for the
        memory ledger: the torch experts it replaces count 0 once released."""
        return {e: max((self.artifacts / f).stat().st_size for f in files.values())
                for e, files in self.engine_files.items() if files}

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _context(self, expert: str, profile: str):
        """(engine, context) for `expert` with `profile` selected: the engine file is loaded once (after this
        expert's other file, from an engine-per-profile build, is dropped, and with one_expert_at_a_time every
        other expert's) and the profile switched on its context only when it changes."""
        path = self.engine_files[expert][profile]
        index = int(self.profile_index[expert].get(profile, 0))
        loaded = self._loaded.get(path)
        if loaded is None:
            mine = set(self.engine_files[expert].values())
            others = [f for f in self._loaded if f != path and (self.one_expert_at_a_time or f in mine)]
            if others and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # its last enqueue (any thread's stream) may still be running
            for other in others:
                self._loaded.pop(other)  # context, then engine, freed with the list: one copy of the weights
            engine = self.runtime.deserialize_cuda_engine((self.artifacts / path).read_bytes())
            if engine is None:
                raise RuntimeError(f"TensorRT could not load {self.artifacts / path} (built for another GPU or "
                                   "TensorRT version?)")
            self.loads += 1
            if index >= engine.num_optimization_profiles:
                raise RuntimeError(f"{self.artifacts / path} has {engine.num_optimization_profiles} optimization "
                                   f"profile(s); the manifest puts {profile!r} at index {index}")
            loaded = self._loaded[path] = [engine, self._new_context(engine), None]
        engine, ctx, selected = loaded
        if selected != index:
            if not ctx.set_optimization_profile_async(index, self._stream()):
                raise RuntimeError(f"TensorRT could not select profile {profile!r} (index {index}) of {path}")
            loaded[2] = index
        return engine, ctx

    def _new_context(self, engine):
        """An execution context whose activation memory is allocated for the profile in use (ON_PROFILE_CHANGE,
        TensorRT 10+), else TensorRT's default (sized for the largest profile)."""
        strategy = getattr(getattr(self.trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        if strategy is not None:
            try:
                return engine.create_execution_context(strategy)
            except TypeError:  # a binding without the strategy overload (IRuntimeConfig only)
                pass
        return engine.create_execution_context()

    @torch.inference_mode()
    def denoise(self, expert: str, latent_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, f, h, w = latent_input.shape
        profile = select_profile(f, h, w, self.profiles).name
        with self._lock:
            engine, ctx = self._context(expert, profile)
            feeds = {}
            for name, tensor in zip(INPUT_NAMES, (latent_input, timestep, context), strict=True):
                t = tensor.to(self.device, _torch_dtype(self.trt, engine.get_tensor_dtype(name))).contiguous()
                if ctx.set_input_shape(name, tuple(t.shape)) is False:
                    raise ValueError(f"{name} {tuple(t.shape)} is outside the {profile} profile of the {expert}-noise "
                                     "engine (see the manifest's profiles)")
                ctx.set_tensor_address(name, t.data_ptr())
                feeds[name] = t  # keep alive until the stream has run
            out_name = OUTPUT_NAMES[0]
            out = torch.empty(tuple(ctx.get_tensor_shape(out_name)), device=self.device,
                              dtype=_torch_dtype(self.trt, engine.get_tensor_dtype(out_name)))
            ctx.set_tensor_address(out_name, out.data_ptr())
            if not ctx.execute_async_v3(self._stream()):
                raise RuntimeError(f"TensorRT execution failed for the {expert}-noise expert ({profile} profile)")
        return out.to(latent_input.dtype)

    def describe(self) -> dict:
        files = {e: sorted(set(f.values())) for e, f in self.engine_files.items()}
        return {"backend": "tensorrt", "engines": {e: sorted(p) for e, p in self.engine_files.items()},
                "engine_files": files, "loaded": sorted(self._loaded), "engine_loads": self.loads,
                "one_expert_at_a_time": self.one_expert_at_a_time,
                "torch_experts_released": {"experts": self.released, "gb": round(self.released_bytes / 1e9, 2)}}

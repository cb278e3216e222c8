"""Memory plan: both experts resident when they fit (an 80 GB GPU holds two FP8 14B experts); otherwise one
expert on the GPU at a time, the other in pinned host memory.

With offload, the swap happens once per request at the high->low boundary, and the high-noise expert for the
next request is copied back on a side stream while the VAE decodes (`after_loop`), so the copy overlaps work
instead of adding to it. The text encoder can be offloaded the same way (it runs once per request).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass(frozen=True)
class MemoryPlan:
    mode: str  # "resident" or "offload"
    need_bytes: int
    free_bytes: int | None
    reason: str


HEADROOM = 0.25  # activations and attention workspace on top of the weights


def _decide(weight_bytes: float, free_bytes: int | None) -> MemoryPlan:
    need = int(weight_bytes * (1 + HEADROOM))
    if free_bytes is None or need <= free_bytes:
        return MemoryPlan("resident", need, free_bytes, "everything fits")
    return MemoryPlan("offload", need, free_bytes,
                      f"needs {need / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB free: one expert at a time")


def choose_plan(model, device: str | torch.device, free_bytes: int | None = None) -> MemoryPlan:
    """Resident when experts + text encoder + VAE + headroom fit in the device's free memory; offload
    otherwise. CPU: always resident."""
    device = torch.device(device)
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    parts = (model.transformer_high, model.transformer_low, model.text_encoder, model.vae)
    return _decide(sum(module_bytes(m) for m in parts), free_bytes)


A14B_EXPERT_PARAMS = 14.3e9
UMT5_XXL_PARAMS = 5.7e9


def estimate_plan(spec: str, device, dtype, requested: str = "auto") -> MemoryPlan:
    """The plan before loading anything (loading both experts onto a 24 GB card would fail first)."""
    if requested in ("resident", "offload"):
        return MemoryPlan(requested, 0, None, "requested")
    device = torch.device(device)
    if device.type != "cuda" or spec == "tiny":
        return MemoryPlan("resident", 0, None, "CPU or tiny model")
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    return _decide((2 * A14B_EXPERT_PARAMS + UMT5_XXL_PARAMS) * bytes_per, torch.cuda.mem_get_info(device)[0])


class ExpertSwapper:
    """Keeps at most one expert on `device`; the other waits on the host (pinned when the device is CUDA)."""

    def __init__(self, experts: dict[str, torch.nn.Module], device, log: list | None = None):
        self.experts = experts
        self.device = torch.device(device)
        self.host = torch.device("cpu")
        self.log = log if log is not None else []
        self.resident: str | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pending: torch.cuda.Event | None = None
        for name in experts:
            self._to_host(name)

    def _to_host(self, name: str) -> None:
        module = self.experts[name]
        for t in list(module.parameters()) + list(module.buffers()):
            host = t.data.to(self.host)
            if self.device.type == "cuda":
                host = host.pin_memory()
            t.data = host
        if self.resident == name:
            self.resident = None
        self.log.append(("evict", name))

    def _to_device(self, name: str, non_blocking: bool) -> None:
        for t in list(self.experts[name].parameters()) + list(self.experts[name].buffers()):
            t.data = t.data.to(self.device, non_blocking=non_blocking)
        self.resident = name

    def ensure(self, name: str) -> torch.nn.Module:
        """Make `name` the resident expert (waits for a prefetch of it)."""
        if self._pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending)
            self._pending = None
        if self.resident != name:
            if self.resident is not None:
                self._to_host(self.resident)
            self._to_device(name, non_blocking=False)
            self.log.append(("load", name))
        return self.experts[name]

    def prefetch(self, name: str) -> None:
        """Start copying `name` to the device on a side stream (evicting the other first)."""
        if self.resident == name:
            return
        if self.resident is not None:
            self._to_host(self.resident)
        if self._stream is None:
            self._to_device(name, non_blocking=False)
        else:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self._to_device(name, non_blocking=True)
                self._pending = torch.cuda.Event()
                self._pending.record(self._stream)
        self.log.append(("prefetch", name))


class OffloadingBackend:
    """Wraps any backend built on the same expert modules: swaps experts as the steps need them and, after
    the loop, prefetches the next request's first expert while the VAE decodes."""

    def __init__(self, inner, swapper: ExpertSwapper, first_expert: str = "high"):
        self.inner, self.swapper, self.first_expert = inner, swapper, first_expert
        self.name = f"{getattr(inner, 'name', 'backend')}+offload"

    def denoise(self, expert: str, latent_input, timestep, context):
        self.swapper.ensure(expert)
        return self.inner.denoise(expert, latent_input, timestep, context)

    def after_loop(self) -> None:
        self.swapper.prefetch(self.first_expert)

    def describe(self) -> dict:
        inner = self.inner.describe() if hasattr(self.inner, "describe") else {"backend": getattr(self.inner, "name", "?")}
        return {**inner, "memory": "offload", "resident": self.swapper.resident}

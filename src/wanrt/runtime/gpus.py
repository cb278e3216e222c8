"""The GPUs we plan for, in one table: memory, FP8 support and published dense peaks (the planner's projected
times, `wanrt plan --gpu`, and the benchmarks' "% of peak" all read it). Pure Python; `detect` asks torch.

Peaks are the vendors' dense tensor-core numbers (no sparsity) in TFLOP/s. GeForce cards: BF16/FP8 with
FP32 accumulate (what PyTorch's GEMMs use; the FP16-accumulate numbers are twice as high). `tf32`: what the
VAE's fp32 convolutions run at (cuDNN uses TF32 for convolutions by default). `memory_gib`: the card's
memory (a "24 GB" card has 24 GiB); `fp8`: FP8 tensor cores (SM >= 8.9), which torch._scaled_mm needs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger("wanrt.memory")

GiB = 2**30
# What a CUDA context, cuBLAS/cuDNN handles and the driver take before the first tensor (observed: an H100
# 80GB reports ~78.5 GiB free of 79.6). A card's free memory at start-up is its memory minus this.
CUDA_CONTEXT_BYTES = 1 * GiB
# Host-to-device copies from pinned memory over PCIe 4.0 x16 (32 GB/s raw, ~25 GB/s achieved).
PCIE4_X16_BYTES_PER_S = 25e9


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str  # as the benchmarks label it
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: float | None  # None: no FP8 tensor cores
    tf32_tflops: float
    sm: tuple[int, int]
    pcie_bytes_per_s: float = PCIE4_X16_BYTES_PER_S  # H100/H200 SXM hosts are PCIe 5; we plan for 4.0

    @property
    def fp8(self) -> bool:
        return self.fp8_tflops is not None

    @property
    def free_bytes(self) -> int:
        return int(self.memory_gib * GiB) - CUDA_CONTEXT_BYTES

    def as_dict(self) -> dict:
        return {**asdict(self), "fp8": self.fp8}


GPUS: dict[str, Gpu] = {g.key: g for g in (
    Gpu("h100", "H100 SXM", 80, 989.4, 1978.9, 494.7, (9, 0)),
    Gpu("h200", "H200", 141, 989.4, 1978.9, 494.7, (9, 0)),
    Gpu("a100", "A100 80GB", 80, 312.0, None, 156.0, (8, 0)),
    Gpu("l40s", "L40S", 48, 362.05, 733.0, 183.0, (8, 9)),
    Gpu("rtx4090", "RTX 4090", 24, 165.2, 330.3, 82.6, (8, 9)),
    Gpu("rtx3090", "RTX 3090", 24, 71.0, None, 35.6, (8, 6)),
    Gpu("rtx3080", "RTX 3080", 10, 59.5, None, 29.8, (8, 6)),
)}

_NAME_HINTS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("L40S", "l40s"), ("4090", "rtx4090"),
               ("3090", "rtx3090"), ("3080", "rtx3080"))


def get(key: str) -> Gpu:
    k = key.lower().replace(" ", "").replace("-", "").replace("_", "")
    if k in GPUS:
        return GPUS[k]
    if "rtx" + k in GPUS:
        return GPUS["rtx" + k]
    raise KeyError(f"unknown GPU {key!r} (known: {', '.join(GPUS)})")


def from_name(device_name: str) -> Gpu | None:
    """The table entry for a CUDA device name ("NVIDIA GeForce RTX 4090"), or None."""
    for hint, key in _NAME_HINTS:
        if hint in device_name:
            return GPUS[key]
    return None


def detect(device) -> Gpu | None:
    """The table entry of a CUDA device (None on CPU or for a card not in the table)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return from_name(torch.cuda.get_device_name(device))


def peaks_by_name() -> dict[str, dict[str, float | None]]:
    """{benchmark label: {"bf16": TFLOP/s, "fp8": TFLOP/s or None}}: the benchmarks' PEAKS_TFLOPS."""
    return {g.name: {"bf16": g.bf16_tflops, "fp8": g.fp8_tflops} for g in GPUS.values()}


# PyTorch's caching allocator maps growable segments instead of fixed cudaMalloc blocks: video requests of many
# sizes and the VAE's large transients leave less unusable cached memory between them (eager BF16 on an H200
# reserved 85.0 GiB for a 73.7 GiB peak). Read when CUDA's allocator starts: set before the first CUDA call; a
# setting already in the environment wins (PYTORCH_ALLOC_CONF, torch >= 2.9's name, or the older one we set).
CUDA_ALLOC_CONF = "expandable_segments:True"
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def prefer_expandable_segments() -> str | None:
    """Sets PYTORCH_CUDA_ALLOC_CONF to CUDA_ALLOC_CONF unless the environment has an allocator setting (even an
    empty one: torch reads it), and applies it to the running allocator when CUDA has started; returns what
    applies (None when it could not be applied)."""
    import torch

    for name in ALLOC_CONF_VARS:
        if name in os.environ:
            return os.environ[name]
    if torch.cuda.is_initialized():  # new segments follow it from here on
        try:
            _set_allocator_settings(CUDA_ALLOC_CONF)
        except (AttributeError, RuntimeError) as e:
            log.warning("CUDA started before the allocator setting could be made (%s): default segments "
                        "(set PYTORCH_CUDA_ALLOC_CONF=%s in the environment)", e, CUDA_ALLOC_CONF)
            return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF  # and for the processes this one starts
    return CUDA_ALLOC_CONF


def _set_allocator_settings(conf: str) -> None:
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
    (setter or torch.cuda.memory._set_allocator_settings)(conf)

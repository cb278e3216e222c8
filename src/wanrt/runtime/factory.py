"""Settings -> model, memory plan, backend, pipeline: the one place a runtime is assembled (the worker and
`wanrt generate` call `build_runtime`).

The memory plan decides where the experts live and the backend follows it. The plan is estimated for the
experts as the backend will store them (FP8 with the compiled backend's fp8 on) and for the warm-up buckets.

- resident: the model loads on the device; every backend runs the experts there (the compiled backend
  swaps its FP8 linears in place, on the device).
- offload: the model loads on the host; the text encoder and VAE go to the device, and an ExpertSwapper
  keeps one expert there at a time (OffloadingBackend swaps at the high->low boundary and prefetches
  during the decode).

Offload with the compiled backend: the experts are quantised on the GPU before they are offloaded, one layer
at a time. The backend gets the device explicitly and offload=True: each targeted linear's weight goes to
the GPU, is quantised there, and its FP8 weight and scales come back to the host expert. The swapper is built
after that (it keeps host copies of the tensors as they are then, so it moves the FP8 weights: half the bytes
per swap). So the device never holds more than the plan's one expert plus one layer, no expert is copied
whole, the GPU runs scaled_mm (not the emulation a host-side expert would pick), and CUDA graphs are off
(they capture weight addresses, which every swap changes).
"""

from __future__ import annotations

from wanrt.model.components import EULER_SCHEDULER_CONFIG
from wanrt.model.loading import load_model
from wanrt.runtime.artifacts import load_artifacts_into
from wanrt.runtime.backends import make_backend
from wanrt.runtime.memory import ExpertSwapper, OffloadingBackend, estimate_plan
from wanrt.runtime.pipeline import WanI2VPipeline


def build_runtime(settings) -> WanI2VPipeline:
    """Model + memory plan + backend + pipeline for these settings."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    compiled = settings.backend == "compiled"
    plan = estimate_plan(settings.model, device, dtype, settings.memory, fp8=compiled and settings.fp8,
                         warmup=settings.warmup)
    offload = plan.mode == "offload"
    # Offload: load on the host (loading both experts onto a small GPU would fail first).
    model = load_model(settings.model, "cpu" if offload else device, dtype)
    if settings.artifacts:
        load_artifacts_into(model, settings.artifacts, settings.model)
    if settings.scheduler == "euler":
        model.scheduler_config = dict(EULER_SCHEDULER_CONFIG)
    if offload:
        model.text_encoder.to(device)
        model.vae.to(device)
    options = {}
    if compiled:
        options = dict(fp8=settings.fp8, attn=settings.attn, compile=settings.compile, cudagraphs=settings.cudagraphs,
                       offload=offload)
    elif settings.backend == "tensorrt":
        options = dict(artifacts=settings.artifacts)
    backend = make_backend(settings.backend, model, device=device, **options)
    if offload:  # after the backend's FP8 swap: the swapper holds the experts' tensors as they are now
        backend = OffloadingBackend(backend, ExpertSwapper(model.experts, device))
    return WanI2VPipeline(model, backend, device=device, dtype=dtype)

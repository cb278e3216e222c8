"""Backends run the expert forwards; one interface: denoise(expert, latent_input, timestep, context)."""

from __future__ import annotations


def make_backend(name: str, model, **options):
    if name == "eager":
        from wanrt.runtime.backends.eager import EagerBackend

        return EagerBackend(model)
    if name == "compiled":
        from wanrt.runtime.backends.compiled import CompiledBackend

        return CompiledBackend(model, **options)
    if name == "tensorrt":
        from wanrt.engine_build.manifest import read_manifest
        from wanrt.engine_build.tensorrt_build import TensorRTUnavailable, tensorrt_available
        from wanrt.runtime.backends.tensorrt import TensorRTBackend

        ok, why = tensorrt_available()
        if not ok:
            raise TensorRTUnavailable(why)
        artifacts = options.get("artifacts")
        if not artifacts:
            raise ValueError("the tensorrt backend needs --artifacts (a `wanrt build` output with engines)")
        return TensorRTBackend(artifacts, read_manifest(artifacts), options.get("device", "cuda"))
    raise ValueError(f"unknown backend {name!r} (available: eager, compiled, tensorrt)")

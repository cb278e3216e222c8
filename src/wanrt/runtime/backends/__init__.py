"""Backends run the expert forwards; one interface: denoise(expert, latent_input, timestep, context)."""

from __future__ import annotations


def make_backend(name: str, model, device=None, **options):
    """`device`: where the pipeline runs (the runtime factory always passes it); the compiled backend refuses
    experts that are elsewhere, TensorRT runs its engines there (default "cuda")."""
    if name == "eager":
        from wanrt.runtime.backends.eager import EagerBackend

        return EagerBackend(model)
    if name == "compiled":
        from wanrt.runtime.backends.compiled import CompiledBackend

        return CompiledBackend(model, device=device, **options)
    if name == "tensorrt":
        from wanrt.runtime import artifacts as art
        from wanrt.runtime.backends.tensorrt import TensorRTBackend

        ok, why = art.tensorrt_available()
        if not ok:
            raise art.TensorRTUnavailable(why)
        artifacts = options.get("artifacts")
        if not artifacts:
            raise ValueError("the tensorrt backend needs --artifacts (a `wanrt build` output with engines)")
        # model: its torch experts are released once their engines are found (the engines embed the same weights).
        # one_expert_at_a_time: a plan that is not resident (left out: inferred from where the experts are)
        return TensorRTBackend(artifacts, art.read_manifest(artifacts), device or "cuda", model=model,
                               one_expert_at_a_time=options.get("one_expert_at_a_time"))
    raise ValueError(f"unknown backend {name!r} (available: eager, compiled, tensorrt)")

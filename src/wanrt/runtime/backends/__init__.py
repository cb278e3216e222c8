"""Backends run the expert forwards; one interface: denoise(expert, latent_input, timestep, context)."""

from __future__ import annotations


def make_backend(name: str, model, **options):
    if name == "eager":
        from wanrt.runtime.backends.eager import EagerBackend

        return EagerBackend(model)
    if name == "compiled":
        from wanrt.runtime.backends.compiled import CompiledBackend

        return CompiledBackend(model, **options)
    raise ValueError(f"unknown backend {name!r} (available: eager, compiled)")

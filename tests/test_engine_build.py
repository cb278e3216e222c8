"""engine_build on the tiny model: FP8 round trip, ONNX parity, manifest cache, runtime use of artifacts."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanrt.engine_build import quantize
from wanrt.engine_build.build import BuildOptions, build, load_artifacts_into
from wanrt.engine_build.lora import LoraSpec
from wanrt.engine_build.manifest import ArtifactMismatch
from wanrt.engine_build.tensorrt_build import (
    PROFILES,
    TensorRTUnavailable,
    build_engine,
    select_profile,
    tensorrt_available,
)

from lora_fixtures import as_format, random_lora


@pytest.mark.parametrize("granularity,bound", [("channel", 0.035), ("tensor", 0.06)])
def test_fp8_roundtrip_error_bounds(granularity, bound):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * torch.logspace(-2, 0, 256).unsqueeze(1)  # rows of very different size
    q, scale = quantize.quantize_weight(w, granularity)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ((256, 1) if granularity == "channel" else ())
    d = quantize.dequantize_weight(q, scale)
    rel = ((w - d).norm() / w.norm()).item()
    assert rel < bound, rel
    assert (d.abs().max() <= w.abs().max() * 1.0001)
    # e4m3 has 3 mantissa bits: each element within 1/16 relative of its value (plus underflow)
    mask = w.abs() > scale * 2 ** -6
    assert ((w - d).abs()[mask] <= w.abs()[mask] / 16 + 1e-12).all()


def test_per_channel_beats_per_tensor_on_uneven_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 64, generator=g) * torch.logspace(-3, 0, 64).unsqueeze(1)
    errs = {}
    for gran in ("channel", "tensor"):
        q, s = quantize.quantize_weight(w, gran)
        errs[gran] = ((w - quantize.dequantize_weight(q, s)).norm() / w.norm()).item()
    assert errs["channel"] < errs["tensor"]


def test_quantize_expert_layers_and_guard(tiny_model):
    layers = quantize.quantizable_layers(tiny_model.transformer_high)
    assert len(layers) == 2 * 10  # 2 blocks x (4 self + 4 cross + 2 ffn)
    assert not any(l.startswith(("patch_embedding", "condition_embedder", "proj_out")) for l in layers)
    sd = quantize.quantize_expert(tiny_model.transformer_high)
    assert sd["blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    assert sd["proj_out.weight"].dtype == torch.bfloat16 and sd["scale_shift_table"].dtype == torch.float32
    excluded = quantize.quantize_expert(tiny_model.transformer_high, exclude=(r"attn2",))
    assert excluded["blocks.0.attn2.to_k.weight"].dtype == torch.bfloat16
    import copy

    cand = copy.deepcopy(tiny_model.transformer_high)
    cand.load_state_dict(quantize.dequantize_state_dict(sd, torch.float32))
    guard = quantize.quality_guard(tiny_model.transformer_high, cand)
    assert guard.passes() and 0 < guard.rel_error < 0.05
    broken = copy.deepcopy(tiny_model.transformer_high)
    broken.proj_out.weight.data *= -1
    assert not quantize.quality_guard(tiny_model.transformer_high, broken).passes()


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("loras")
    save_file(as_format(random_lora(tiny_model.transformer_high, alpha=4.0, seed=1), "comfy"), str(d / "high.safetensors"))
    save_file(as_format(random_lora(tiny_model.transformer_low, seed=2), "peft"), str(d / "low.safetensors"))
    return d / "high.safetensors", d / "low.safetensors"


@pytest.mark.slow  # long (suite budget: 15 min on 2 cores); run with --runslow
def test_cli_build_fp8_onnx_manifest_and_cache(tmp_path, lora_files):
    high, low = lora_files
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "wanrt.cli", "build", "--model", "tiny", "--lora", f"high:{high}:0.8",
           "--lora", f"low:{low}:1.0", "--precision", "fp8", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "touched 6 layers" in r.stdout and "the build stopped after the ONNX stage" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["cache_hit"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("high", "low"):
        info = manifest["experts"][name]
        assert (out / info["weights"]).is_file() and (out / info["onnx"]).is_file()
        assert all(p["max_abs_error"] < 1e-4 for p in info["onnx_parity"])
        assert info["quality_guard"]["passes"] and info["loras"][0]["layers_touched"] == 6
        assert load_file(str(out / info["weights"]))["blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    assert manifest["experts"]["high"]["loras"][0]["strength"] == 0.8
    assert manifest["precision"] == "fp8" and set(manifest["profiles"]) == {"small", "default", "large"}
    assert manifest["tools"]["torch"] and manifest["tensorrt"]["built"] is False

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["cache_hit"] is True
    changed = [c if not c.startswith("high:") else f"high:{high}:0.5" for c in cmd]
    r3 = subprocess.run(changed + ["--no-onnx"], capture_output=True, text=True, timeout=300)
    assert json.loads(r3.stdout.strip().splitlines()[-1])["cache_hit"] is False


def test_unmatched_lora_stops_the_build_naming_keys(tmp_path, tiny_model):
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(32, 4)}, str(bad))
    r = subprocess.run([sys.executable, "-m", "wanrt.cli", "build", "--model", "tiny", "--lora", f"both:{bad}",
                        "--out", str(tmp_path / "o"), "--no-onnx"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "blocks.9.self_attn.q" in r.stderr and "Traceback" not in r.stderr


def test_runtime_uses_fused_artifacts(tmp_path, tiny_model, lora_files, image64):
    import copy

    from wanrt.engine_build.lora import fuse_loras
    from wanrt.model.tiny import build_tiny_model
    from wanrt.params import GenerateParams
    from wanrt.runtime.pipeline import WanI2VPipeline

    high, low = lora_files
    specs = [LoraSpec("high", high, 0.8), LoraSpec("low", low, 1.0)]
    build(BuildOptions(model="tiny", loras=specs, precision="fp32", out=tmp_path / "a", onnx=False), log=lambda m: None)
    served = build_tiny_model()
    load_artifacts_into(served, tmp_path / "a", "tiny")
    expected = copy.copy(build_tiny_model())
    fuse_loras(expected, specs)
    p = GenerateParams(prompt="a cat", width=64, height=64, frames=9, steps=2)
    got = WanI2VPipeline(served).generate(p, image64, None).latents
    want = WanI2VPipeline(expected).generate(p, image64, None).latents
    base = WanI2VPipeline(build_tiny_model()).generate(p, image64, None).latents
    assert torch.equal(got, want) and not torch.allclose(got, base)


def test_runtime_refuses_artifacts_of_another_model(tmp_path, tiny_model):
    from wanrt.engine_build.manifest import write_manifest
    from wanrt.model.tiny import build_tiny_model

    build(BuildOptions(model="tiny", precision="bf16", out=tmp_path / "a", onnx=False), log=lambda m: None)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["base"]["experts"] = "sha256:0000"
    write_manifest(tmp_path / "a", manifest)
    with pytest.raises(ArtifactMismatch, match="rebuild"):
        load_artifacts_into(build_tiny_model(), tmp_path / "a", "tiny")


def test_profiles_cover_the_seed_range():
    for w in (256, 640, 832, 1024):
        for h in (256, 480, 640, 1024):
            for frames in (16, 81, 121):
                lf = (frames + 2) // 4 + 1 if (frames - 1) % 4 else (frames - 1) // 4 + 1
                select_profile(lf, h // 8, w // 8)
    assert select_profile(21, 80, 80).name == "default"


def needs_tensorrt():
    """Skip without TensorRT, or without the ONNX stage before it (a TensorRT host may lack the `gpu` extras)."""
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"TensorRT is here but the ONNX stage needs {name} (pip install wanrt[gpu])")


def test_tensorrt_build_skips_with_a_clear_reason(tmp_path):
    ok, why = tensorrt_available()
    if ok:
        pytest.skip("TensorRT is installed here: engines are built in the GPU job")
    assert "TensorRT" in why and "ONNX stage" in why
    with pytest.raises(TensorRTUnavailable, match="TensorRT"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", PROFILES["default"])


@pytest.mark.gpu
def test_tensorrt_engine_builds_and_matches_onnx(tmp_path, tiny_model):
    needs_tensorrt()
    import copy

    from wanrt.engine_build.onnx_export import export_expert
    from wanrt.model.components import cast_module

    # strongly typed: an fp16 engine comes from an fp16 ONNX (TensorRT 11 has no FP16 builder flag)
    expert = cast_module(copy.deepcopy(tiny_model.transformer_high), dtype=torch.float16)
    onnx_path = export_expert(expert, tmp_path / "e.onnx")
    engine = build_engine(onnx_path, tmp_path / "e.plan", PROFILES["small"], precision="fp16",
                          in_channels=36, text_len=512, text_dim=32, timing_cache=tmp_path / "t.cache")
    assert engine.stat().st_size > 0 and (tmp_path / "t.cache").is_file()


def test_engines_are_built_with_no_torch_weights_left(tmp_path, monkeypatch, tiny_model):
    """`wanrt build` with TensorRT: by the time TensorRT builds an engine (monkeypatched here: it cannot run on
    this machine) no torch weights are left (both experts, the text encoder and the VAE hold no storage); each
    expert was exported while it still had its weights, the text encoder and the VAE were gone by then."""
    import copy
    import dataclasses

    import wanrt.engine_build.build as b
    from wanrt.engine_build import onnx_export
    from wanrt.model import loading

    loaded, exported, built = [], [], []

    def holding(**modules):  # the names of those that still hold weights
        return [n for n, m in modules.items()
                if any(t.untyped_storage().nbytes() for t in (*m.parameters(), *m.buffers()))]

    def load_model(spec, device, dtype):  # the session's tiny model (building one takes seconds), fp32 on the CPU
        parts = ("transformer_high", "transformer_low", "text_encoder", "vae")
        loaded.append(dataclasses.replace(tiny_model, **{p: copy.deepcopy(getattr(tiny_model, p)) for p in parts}))
        return loaded[-1]

    def export_expert(expert, path, text_len=512):
        model = loaded[0]
        exported.append((path.parent.name, holding(expert=expert, text_encoder=model.text_encoder, vae=model.vae)))
        path.write_bytes(b"onnx")
        return path

    def build_engine(onnx_path, engine_path, profiles, **kwargs):
        model = loaded[0]
        built.append((engine_path.parent.name,
                      holding(**model.experts, text_encoder=model.text_encoder, vae=model.vae)))
        engine_path.write_bytes(b"plan")
        return engine_path

    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(onnx_export, "export_expert", export_expert)
    monkeypatch.setattr(b, "tensorrt_available", lambda: (True, ""))
    monkeypatch.setattr(b, "check_disk_space", lambda *args: 0)
    monkeypatch.setattr(b, "build_engine", build_engine)
    manifest = build(BuildOptions(model="tiny", precision="bf16", out=tmp_path / "a", profiles=("small",)),
                     log=lambda m: None)
    assert exported == [("high", ["expert"]), ("low", ["expert"])]
    assert built == [("high", []), ("low", [])]
    assert manifest["experts"]["low"]["engines"] == {"small": "low/engine.plan"}
    assert manifest["experts"]["high"]["engine_profiles"] == {"small": 0}


def test_in_place_guard_equals_copy_guard_and_restores(tiny_model):
    import copy

    expert = copy.deepcopy(tiny_model.transformer_low)
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    sd = quantize.quantize_expert(expert, keep_dtype=torch.float32)
    cand = copy.deepcopy(expert)
    cand.load_state_dict(quantize.dequantize_state_dict(sd, torch.float32))
    a = quantize.quality_guard(expert, cand)
    b = quantize.quality_guard_in_place(expert, sd)
    assert abs(a.cosine - b.cosine) < 1e-9 and abs(a.rel_error - b.rel_error) < 1e-9
    assert all(torch.equal(v, before[k]) for k, v in expert.state_dict().items())


def test_tensorrt_backend_refuses_clearly_without_tensorrt(tmp_path, tiny_model):
    from wanrt.runtime.backends import make_backend

    if tensorrt_available()[0]:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(TensorRTUnavailable, match="TensorRT"):
        make_backend("tensorrt", tiny_model, artifacts=str(tmp_path))


@pytest.mark.gpu
def test_tensorrt_backend_matches_eager_on_gpu(tmp_path, tiny_model, image64):
    """Build tiny engines, serve them through the pipeline, compare with the eager path."""
    needs_tensorrt()
    import copy

    from wanrt.params import GenerateParams
    from wanrt.runtime.backends import make_backend
    from wanrt.runtime.pipeline import WanI2VPipeline

    model = copy.deepcopy(tiny_model).to("cuda")
    build(BuildOptions(model="tiny", precision="fp16", out=tmp_path / "a", profiles=("small", "default"),
                       device="cuda"), log=lambda m: None)
    sizes = [GenerateParams(prompt="a cat", width=w, height=w, frames=17, steps=2) for w in (256, 528)]
    refs = [WanI2VPipeline(model, device="cuda").generate(p, image64, None).latents for p in sizes]
    backend = make_backend("tensorrt", model, artifacts=str(tmp_path / "a"), device="cuda")
    for p, ref in zip(sizes, refs, strict=True):  # one engine per expert, its two optimization profiles
        got = WanI2VPipeline(model, backend, device="cuda").generate(p, image64, None).latents
        assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.999
    assert backend.loads == 2

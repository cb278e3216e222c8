"""Every loader round-trips the tiny model written with the real key names: identical outputs."""

import json

import pytest
import torch

from wanrt.model import keymaps, sizes
from wanrt.model.loading import (
    WAN22_I2V_A14B_TRANSFORMER_CONFIG,
    ModelLoadError,
    build_random_full,
    load_expert,
    load_model,
    save_single_files,
)
from wanrt.params import GenerateParams
from wanrt.runtime.pipeline import WanI2VPipeline

from model_files import save_diffusers_dir

P = GenerateParams(prompt="a woman turning her head", width=64, height=64, frames=9, steps=3, seed=3)


@pytest.fixture(scope="module")
def reference_latents(tiny_model):
    from conftest import make_image

    return WanI2VPipeline(tiny_model).generate(P, make_image(), None).latents


def run(model):
    from conftest import make_image

    return WanI2VPipeline(model).generate(P, make_image(), None).latents


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_diffusers_dir_roundtrip(tiny_model, reference_latents, tmp_path):
    save_diffusers_dir(tiny_model, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}
    loaded = load_model(str(tmp_path / "m"))
    assert_same_weights(loaded.transformer_high, tiny_model.transformer_high)
    assert_same_weights(loaded.transformer_low, tiny_model.transformer_low)
    assert torch.equal(run(loaded), reference_latents)


@pytest.mark.parametrize("layout", ["comfyui", "wan"])
def test_single_file_roundtrip(tiny_model, reference_latents, tmp_path, layout):
    paths = save_single_files(tiny_model, tmp_path / layout, layout=layout)
    if layout == "comfyui":
        from safetensors.torch import load_file

        keys = load_file(str(paths["high"])).keys()
        assert "model.diffusion_model.blocks.0.self_attn.q.weight" in keys
        assert "model.diffusion_model.head.modulation" in keys
        assert "encoder.block.0.layer.0.SelfAttention.q.weight" in load_file(str(paths["text_encoder"]))
        assert "decoder.upsamples.4.shortcut.weight" in load_file(str(paths["vae"]))
    else:
        t5 = torch.load(paths["text_encoder"], weights_only=True)
        assert "blocks.0.ffn.gate.0.weight" in t5 and "token_embedding.weight" in t5
        assert json.loads((paths["high"] / "config.json").read_text())["num_heads"] == 2
    loaded = load_model(str(tmp_path / layout))
    for part in ("transformer_high", "transformer_low", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, part), getattr(tiny_model, part))
    assert torch.equal(run(loaded), reference_latents)


def test_fp8_scaled_comfy_expert_is_dequantized(tiny_model, tmp_path):
    from safetensors.torch import save_file

    sd = keymaps.transformer_to_original(tiny_model.transformer_high.state_dict(), prefix=keymaps.COMFY_PREFIX)
    fp8, expected = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            fp8[k], fp8[k[:-len("weight")] + "scale_weight"] = q, scale.reshape(1)
            expected[k] = q.to(torch.float32) * scale
        else:
            fp8[k] = expected[k] = v
    fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file({k: v.contiguous() for k, v in fp8.items()}, str(tmp_path / "high_fp8_scaled.safetensors"))
    cfg = dict(tiny_model.transformer_high.config)
    expert = load_expert(tmp_path / "high_fp8_scaled.safetensors",
                         config={k: v for k, v in cfg.items() if not k.startswith("_")})
    got = keymaps.transformer_to_original(expert.state_dict(), prefix=keymaps.COMFY_PREFIX)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    w, q = tiny_model.transformer_high.state_dict()["blocks.0.attn1.to_q.weight"], expert.state_dict()["blocks.0.attn1.to_q.weight"]
    assert 0 < (w - q).abs().max() < 0.1 * w.abs().max()  # really quantized, and close


def test_wrong_keys_are_refused_by_name(tiny_model, tmp_path):
    from safetensors.torch import save_file

    sd = keymaps.transformer_to_original(tiny_model.transformer_high.state_dict())
    sd.pop("blocks.1.ffn.2.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "broken.safetensors"))
    cfg = {k: v for k, v in tiny_model.transformer_high.config.items() if not k.startswith("_")}
    with pytest.raises(ModelLoadError, match="ffn.net.2.weight"):
        load_expert(tmp_path / "broken.safetensors", config=cfg)


def test_missing_parts_are_named(tmp_path):
    (tmp_path / "wan2.2_i2v_high_noise_14B_fp16.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="low-noise expert"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_random_full_has_the_a14b_shape_on_meta():
    m = build_random_full("meta", torch.bfloat16, with_text_encoder=False)
    cfg = m.transformer_high.config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim, cfg.in_channels) == (40, 5120, 13824, 36)
    n = sum(p.numel() for p in m.transformer_high.parameters())
    assert 14.0e9 < n < 14.5e9, n  # "A14B": two ~14B experts
    assert m.transformer_high.patch_embedding.weight.device.type == "meta"
    sd = {k: v for k, v in m.transformer_high.state_dict().items()}
    assert keymaps.infer_transformer_config(sd)["num_attention_heads"] == 40
    assert {k: v for k, v in keymaps.infer_transformer_config(sd).items()} == {
        k: v for k, v in WAN22_I2V_A14B_TRANSFORMER_CONFIG.items() if k != "rope_max_seq_len"}
    assert n == sizes.expert_params().total  # the size model the memory planner uses
    full = build_random_full("meta", torch.bfloat16)
    te = full.text_encoder
    assert te.shared.weight is te.encoder.embed_tokens.weight  # tied: 5.68 B, not 6.73 B
    assert sum(p.numel() for p in te.parameters()) == sizes.umt5_params(tied=True) == 5_680_910_336


def test_random_full_materialises_each_parameter_in_its_final_dtype(monkeypatch):
    """One block at the real widths (5120 / 13824): every parameter is made in bf16 (fp32 only where diffusers
    keeps it), never in fp32 first, and the bytes are what the size model says."""
    import wanrt.model.loading as loading
    from wanrt.runtime.memory import module_bytes

    seen = []  # dtypes as _materialise_random leaves them, before the final cast_module
    real_cast = loading.cast_module

    def spy(module, device=None, dtype=None):
        seen.append({p.dtype for p in module.parameters()})
        return real_cast(module, device, dtype)

    monkeypatch.setattr(loading, "cast_module", spy)
    m = build_random_full("cpu", torch.bfloat16, with_text_encoder=False, num_layers=1)
    assert seen[0] == seen[1] == seen[2] == {torch.bfloat16, torch.float32}  # experts, text encoder (its `wo`)
    assert seen[3] == {torch.float32}  # the VAE
    config = {**WAN22_I2V_A14B_TRANSFORMER_CONFIG, "num_layers": 1}
    keep = set(m.transformer_high._keep_in_fp32_modules)
    for expert in m.experts.values():
        for name, p in expert.named_parameters():
            wanted = torch.float32 if keep & set(name.split(".")) else torch.bfloat16
            assert p.dtype == wanted, name
        assert module_bytes(expert) == sizes.expert_params(config).bytes(2) == 1_225_268_352
    assert m.transformer_high.blocks[0].ffn.net[0].proj.weight.shape == (13824, 5120)
    te = m.text_encoder
    assert te.shared.weight is te.encoder.embed_tokens.weight
    assert module_bytes(te) == sizes.umt5_bytes(dict(num_layers=1, vocab_size=te.config.vocab_size), 2)
    w = m.transformer_high.blocks[0].attn1.to_q.weight.float()
    assert torch.isfinite(w).all() and 0.3 < w.std().item() * 5120**0.5 / 0.5 < 3  # 0.5/sqrt(fan_in)


@pytest.mark.gpu
def test_random_full_on_cuda_never_holds_an_fp32_copy():
    from wanrt.runtime.memory import module_bytes

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    m = build_random_full("cuda", torch.bfloat16, with_text_encoder=False, num_layers=2)
    total = sum(module_bytes(part) for part in (m.transformer_high, m.transformer_low, m.text_encoder, m.vae))
    assert torch.cuda.max_memory_allocated() - base < 1.1 * total  # fp32 first would be ~2x

"""LoRA fusion: every format equals diffusers' fuse_lora (where diffusers reads it), errors name keys."""

import copy
import logging

import pytest
import torch

from wanrt.engine_build.lora import LoraError, LoraSpec, fuse_lora, fuse_loras
from wanrt.runtime.sampler import make_scheduler

from lora_fixtures import TARGETS, as_format, lightx2v_like, random_lora, to_original


def diffusers_fused(model, sd, strength, expert="high"):
    from diffusers import WanImageToVideoPipeline

    high, low = copy.deepcopy(model.transformer_high), copy.deepcopy(model.transformer_low)
    pipe = WanImageToVideoPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                                   scheduler=make_scheduler(model.scheduler_config), image_processor=None,
                                   image_encoder=None, transformer=high, transformer_2=low, boundary_ratio=0.9)
    if expert == "high":
        pipe.load_lora_weights(sd, adapter_name="x")
        pipe.fuse_lora(components=["transformer"], lora_scale=strength)
    else:
        pipe.load_lora_weights(sd, adapter_name="x", load_into_transformer_2=True)
        pipe.fuse_lora(components=["transformer_2"], lora_scale=strength)
    pipe.unload_lora_weights()
    return high if expert == "high" else low


def max_weight_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize("fmt,alpha,targets,diffusers_prefix", [
    ("peft", None, TARGETS, ""),
    ("comfy", None, TARGETS, ""),
    ("comfy", 2.0, TARGETS[:-1], ""),  # diffusers' converter cannot read an alpha on head.head
    ("wan", None, TARGETS, "diffusion_model."),  # diffusers silently ignores un-prefixed keys; we don't
])
@pytest.mark.parametrize("expert", ["high", "low"])
def test_fusion_equals_diffusers_fuse_lora(tiny_model, fmt, alpha, targets, diffusers_prefix, expert):
    module = tiny_model.experts[expert]
    lora = random_lora(module, alpha=alpha, targets=targets, seed=3)
    ours = copy.deepcopy(module)
    report = fuse_lora(ours, as_format(lora, fmt), 0.8)
    assert report.layers_touched == len(targets) and report.skipped == []
    ref_sd = {diffusers_prefix + k: v for k, v in as_format(lora, fmt).items()}
    ref = diffusers_fused(tiny_model, ref_sd, 0.8, expert)
    assert max_weight_diff(ours, ref) <= 1e-6
    assert max_weight_diff(ours, module) > 1e-3  # it really changed something


def test_kohya_underscored_equals_comfy(tiny_model):
    lora = random_lora(tiny_model.transformer_high, alpha=4.0)
    a, b = copy.deepcopy(tiny_model.transformer_high), copy.deepcopy(tiny_model.transformer_high)
    assert fuse_lora(a, as_format(lora, "kohya"), 1.0).layers_touched == len(TARGETS)
    fuse_lora(b, as_format(lora, "comfy"), 1.0)
    assert max_weight_diff(a, b) == 0.0


def test_exact_formula_and_callers_tensors_untouched(tiny_model):
    lora = random_lora(tiny_model.transformer_high, rank=4, alpha=2.0, targets=["blocks.0.attn1.to_q"])
    sd = as_format(lora, "comfy")
    before = {k: v.clone() for k, v in sd.items()}
    expert = copy.deepcopy(tiny_model.transformer_high)
    w0 = expert.blocks[0].attn1.to_q.weight.detach().clone()
    fuse_lora(expert, sd, 0.5)
    a, b, _ = lora["blocks.0.attn1.to_q"]
    assert torch.allclose(expert.blocks[0].attn1.to_q.weight, w0 + 0.5 * (2.0 / 4) * b @ a, atol=1e-7)
    for k in sd:
        assert torch.equal(sd[k], before[k])  # the trap in diffusers' converter: inputs scaled in place


def test_known_effect_doubling_the_head_doubles_its_output(tiny_model):
    """A LoRA with B @ A = W on proj_out makes W' = 2W: the expert's output is exactly predictable."""
    expert = copy.deepcopy(tiny_model.transformer_high)
    w = expert.proj_out.weight.detach().clone()  # (64, 32)
    sd = {"diffusion_model.head.head.lora_down.weight": w.clone(),
          "diffusion_model.head.head.lora_up.weight": torch.eye(w.shape[0]),
          "diffusion_model.head.head.alpha": torch.tensor(float(w.shape[0]))}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 36, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 512, 32, generator=g)
    t = torch.tensor([500.0])

    predicted = copy.deepcopy(tiny_model.transformer_high)
    predicted.proj_out.weight.data = 2 * w
    with torch.no_grad():
        want = predicted(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        base = expert(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        fuse_lora(expert, sd, 1.0)
        got = expert(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-2)


def test_diff_and_diff_b_keys(tiny_model):
    expert = copy.deepcopy(tiny_model.transformer_high)
    lin = expert.blocks[1].ffn.net[2]
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    dw, db = torch.full_like(w0, 0.01), torch.full_like(b0, -0.5)
    fuse_lora(expert, {"diffusion_model.blocks.1.ffn.2.diff": dw, "diffusion_model.blocks.1.ffn.2.diff_b": db}, 2.0)
    assert torch.allclose(lin.weight, w0 + 0.02) and torch.allclose(lin.bias, b0 - 1.0)


def test_unmatched_keys_are_an_error_naming_them(tiny_model):
    sd = as_format(random_lora(tiny_model.transformer_high, targets=["blocks.0.attn1.to_q"]), "comfy")
    sd["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, 32)  # the tiny model has 2 blocks
    sd["diffusion_model.some.unknown.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(LoraError) as e:
        fuse_lora(copy.deepcopy(tiny_model.transformer_high), sd, 1.0)
    assert "blocks.7.self_attn.q" in str(e.value) and "some.unknown" in str(e.value)
    report = fuse_lora(copy.deepcopy(tiny_model.transformer_high), sd, 1.0, allow_unmatched=True)
    assert report.layers_touched == 1 and len(report.skipped) == 2


def test_wan21_image_keys_are_skipped_and_reported(tiny_model):
    sd = as_format(random_lora(tiny_model.transformer_high, targets=["blocks.0.attn2.to_q"]), "comfy")
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(4, 32)
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = torch.zeros(32, 4)
    sd["diffusion_model.blocks.0.cross_attn.norm_k_img.diff"] = torch.zeros(32)
    report = fuse_lora(copy.deepcopy(tiny_model.transformer_high), sd, 1.0)
    assert report.layers_touched == 1 and len(report.skipped) == 3 and all("img" in k for k in report.skipped)


def test_shape_mismatch_names_the_layer(tiny_model):
    sd = {f"diffusion_model.{to_original('blocks.0.attn1.to_q')}.lora_down.weight": torch.zeros(4, 99),
          f"diffusion_model.{to_original('blocks.0.attn1.to_q')}.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(Exception, match="blocks.0.attn1.to_q"):
        fuse_lora(copy.deepcopy(tiny_model.transformer_high), sd, 1.0)


def test_spec_parsing_and_per_expert_targets(tiny_model, tmp_path):
    from safetensors.torch import save_file

    assert LoraSpec.parse("high:/a/b.safetensors:0.8") == LoraSpec("high", __import__("pathlib").Path("/a/b.safetensors"), 0.8)
    assert LoraSpec.parse("both:x.safetensors").strength == 1.0
    with pytest.raises(LoraError):
        LoraSpec.parse("middle:x:1")
    path = tmp_path / "l.safetensors"
    save_file(as_format(random_lora(tiny_model.transformer_high), "comfy"), str(path))
    model = copy.copy(tiny_model)
    model.transformer_high, model.transformer_low = copy.deepcopy(tiny_model.transformer_high), copy.deepcopy(tiny_model.transformer_low)
    reports = fuse_loras(model, [LoraSpec("low", path, 1.0)])
    assert reports["high"] == [] and reports["low"][0].layers_touched == len(TARGETS)
    assert max_weight_diff(model.transformer_high, tiny_model.transformer_high) == 0.0


# --------------------------------------------------------------------------------------------- formats from the wild
def test_modulation_deltas_fuse_into_scale_shift_tables(tiny_model):
    expert = copy.deepcopy(tiny_model.transformer_high)
    before = {n: p.detach().clone() for n, p in expert.named_parameters()}
    sd = lightx2v_like(expert)
    report = fuse_lora(expert, sd, 0.5)
    assert report.layers_touched == 6 and report.skipped == []
    after = dict(expert.named_parameters())
    for name, key in (("blocks.0.scale_shift_table", "blocks.0.diff_m"), ("blocks.1.scale_shift_table",
                                                                          "blocks.1.modulation.diff"),
                      ("scale_shift_table", "head.modulation.diff"), ("proj_out.weight", "head.head.diff"),
                      ("proj_out.bias", "head.head.diff_b")):
        assert torch.allclose(after[name], before[name] + 0.5 * sd[f"diffusion_model.{key}"], atol=1e-7), name


def test_a_diff_must_have_its_weights_shape_and_only_conv_pairs_are_reshaped(tiny_model):
    expert = copy.deepcopy(tiny_model.transformer_high)
    with pytest.raises(LoraError, match=r"blocks.0.ffn.net.2: .diff shape \(64, 32\) does not fit weight \(32, 64\)"):
        fuse_lora(expert, {"diffusion_model.blocks.0.ffn.2.diff": torch.ones(64, 32)}, 1.0)  # transposed
    w0 = expert.patch_embedding.weight.detach().clone()  # (32, 36, 1, 2, 2): a conv LoRA is its flattened kernel
    down, up = torch.randn(4, 36, 1, 2, 2) * 0.1, torch.randn(32, 4, 1, 1, 1) * 0.1
    fuse_lora(expert, {"diffusion_model.patch_embedding.lora_down.weight": down,
                       "diffusion_model.patch_embedding.lora_up.weight": up}, 1.0)
    want = w0 + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    assert torch.allclose(expert.patch_embedding.weight, want, atol=1e-6)


@pytest.mark.parametrize("fmt", ["videox-fun", "lycoris", "diffsynth"])
def test_videox_fun_lycoris_and_diffsynth_names(tiny_model, fmt):
    lora = random_lora(tiny_model.transformer_high, alpha=2.0)
    sd = {}
    for k, v in as_format(lora, "comfy").items():
        base, _, suffix = k[len("diffusion_model."):].partition(".lora_")
        base, suffix = (base.rpartition(".")[0], "alpha") if k.endswith(".alpha") else (base, "lora_" + suffix)
        if fmt == "videox-fun":  # lora_unet__blocks_0_cross_attn_k: kohya names after a double underscore
            sd[f"lora_unet__{base.replace('.', '_')}.{suffix}"] = v
        elif fmt == "diffsynth":
            sd[f"pipe.dit.{base}.{suffix}"] = v
    if fmt == "lycoris":  # SimpleTuner: diffusers names, underscored
        for name, (a, b, alpha) in lora.items():
            sd[f"lycoris_{name.replace('.', '_')}.lora_down.weight"] = a
            sd[f"lycoris_{name.replace('.', '_')}.lora_up.weight"] = b
            sd[f"lycoris_{name.replace('.', '_')}.alpha"] = torch.tensor(alpha)
    ours, ref = copy.deepcopy(tiny_model.transformer_high), copy.deepcopy(tiny_model.transformer_high)
    assert fuse_lora(ours, sd, 0.7).layers_touched == len(TARGETS)
    fuse_lora(ref, as_format(lora, "comfy"), 0.7)
    assert max_weight_diff(ours, ref) == 0.0


def test_text_encoder_and_wan21_image_keys_are_skipped_and_logged(tiny_model, caplog):
    sd = as_format(random_lora(tiny_model.transformer_high, targets=["blocks.0.attn1.to_q"]), "peft")
    harmless = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
                "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 8),
                # a diffusers-format Wan 2.1 I2V LoRA: the image embedder diffusers calls condition_embedder.image_embedder
                "transformer.condition_embedder.image_embedder.ff.net.0.proj.lora_A.weight": torch.zeros(4, 32),
                "transformer.condition_embedder.image_embedder.ff.net.0.proj.lora_B.weight": torch.zeros(32, 4),
                "transformer.blocks.0.attn2.add_k_proj.lora_A.weight": torch.zeros(4, 32)}
    with caplog.at_level(logging.INFO, logger="wanrt.lora"):
        report = fuse_lora(copy.deepcopy(tiny_model.transformer_high), {**sd, **harmless}, 1.0, "style.safetensors")
    assert report.layers_touched == 1 and sorted(report.skipped) == sorted(harmless)
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "style.safetensors" in line and "3 text-encoder keys" in line and "3 Wan 2.1 image keys" in line
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in line
    bad = {**sd, "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(LoraError, match="wanrt build --allow-unmatched"):  # the flag this path has
        fuse_lora(copy.deepcopy(tiny_model.transformer_high), bad, 1.0)


@pytest.mark.parametrize("keys, fmt", [
    (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa"),
    (("lokr_w1", "lokr_w2"), "LoKr"),
    (("lora_down.weight", "lora_up.weight", "dora_scale"), "DoRA"),
    (("lora_down.weight", "lora_up.weight", "lora_mid.weight"), "LoCon (Tucker lora_mid)"),
])
def test_loha_lokr_dora_and_lora_mid_are_refused_by_name(tiny_model, keys, fmt):
    sd = {f"lycoris_blocks_0_attn1_to_q.{k}": torch.zeros(4, 4) for k in keys}
    with pytest.raises(LoraError) as e:
        fuse_lora(copy.deepcopy(tiny_model.transformer_high), sd, 1.0, "wild.safetensors")
    assert f"wild.safetensors is a {fmt}" in str(e.value) and "not supported" in str(e.value)
    assert "match no layer" not in str(e.value)


def test_peft_lora_b_bias_is_a_bias_delta_scaled_like_the_pair(tiny_model):
    lora = random_lora(tiny_model.transformer_high, targets=["blocks.0.attn1.to_q"], seed=5)
    sd = as_format(lora, "peft")
    bias = torch.randn(32) * 0.1
    sd["transformer.blocks.0.attn1.to_q.lora_B.bias"] = bias
    expert = copy.deepcopy(tiny_model.transformer_high)
    assert fuse_lora(expert, sd, 0.8).layers_touched == 1
    assert max_weight_diff(expert, diffusers_fused(tiny_model, sd, 0.8)) <= 1e-6  # diffusers reads it as lora_bias
    scaled = copy.deepcopy(tiny_model.transformer_high)  # alpha 8 on rank 4: the pair and its bias scale by 2
    fuse_lora(scaled, {**sd, "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(8.0)}, 1.0)
    b0 = tiny_model.transformer_high.blocks[0].attn1.to_q.bias
    assert torch.allclose(scaled.blocks[0].attn1.to_q.bias, b0 + 2.0 * bias, atol=1e-7)


def test_alpha_from_diffusers_lora_adapter_metadata(tiny_model, tmp_path):
    """A diffusers-saved file has no .alpha keys: alpha is in its header (lora_alpha, alpha_pattern)."""
    import json

    from safetensors.torch import save_file

    lora = random_lora(tiny_model.transformer_high, rank=4, seed=8)
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"blocks.0.attn1.to_q": 2},
            "transformer.rank_pattern": {}, "transformer.target_modules": sorted(lora)}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(as_format(lora, "peft"), str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    model = copy.copy(tiny_model)
    model.transformer_high, model.transformer_low = copy.deepcopy(tiny_model.transformer_high), tiny_model.transformer_low
    fuse_loras(model, [LoraSpec("high", path, 1.0)])
    base = dict(tiny_model.transformer_high.named_modules())
    for name, (a, b, _) in lora.items():
        scale = 2 / 4 if name == "blocks.0.attn1.to_q" else 8 / 4
        got = dict(model.transformer_high.named_modules())[name].weight
        assert torch.allclose(got, base[name].weight + scale * b @ a, atol=1e-6), name

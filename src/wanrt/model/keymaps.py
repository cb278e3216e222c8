"""Key-name conversion between checkpoint layouts.

Loading (original Wan / ComfyUI -> diffusers) reuses diffusers' own converters for the transformer and the
VAE; UMT5 has none in diffusers, so its mapping (original Wan T5 <-> transformers UMT5) is written here.
The reverse maps (diffusers -> original) are used to export fused experts in ComfyUI layout and by the
tests to write the tiny model with the real key names; the tests check that diffusers' forward converter
undoes them exactly.
"""

from __future__ import annotations

import re

import torch

COMFY_PREFIX = "model.diffusion_model."
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # stored quantised: never cast as a dtype change


# --------------------------------------------------------------------------------------------- FP8 scaled
def is_fp8_marker(key: str) -> bool:
    """ComfyUI fp8_scaled bookkeeping (a weight's `scale_weight`, `scale_input`, the `scaled_fp8` flag): no model
    tensor of its own."""
    return key.endswith((".scale_weight", ".scale_input")) or key == "scaled_fp8"


def scale_key(key: str) -> str | None:
    """The ComfyUI `scale_weight` key beside a `.weight` key (None for other keys)."""
    return key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None


def dequantize_comfy_fp8(sd: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """ComfyUI's `*_fp8_scaled` files store e4m3 weights with a per-tensor `scale_weight` beside them."""
    out = {}
    for key, value in sd.items():
        if is_fp8_marker(key):
            continue
        scale = sd.get(scale_key(key))
        if scale is not None:
            value = value.to(torch.float32) * scale.to(torch.float32)
        if value.dtype in FP8_DTYPES:
            value = value.to(torch.float32)
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def strip_prefix(sd: dict, prefixes=(COMFY_PREFIX, "diffusion_model.", "model.")) -> dict:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------- transformer
def transformer_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan / ComfyUI expert keys -> diffusers WanTransformer3DModel keys (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(strip_prefix(dict(sd)))


_TRANSFORMER_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    # diffusers' norm2 is the cross-attention norm, the original's norm3 (and vice versa)
    (r"\.norm2\.", ".__norm3__."),
    (r"\.norm3\.", ".norm2."),
    (r"\.__norm3__\.", ".norm3."),
]


def transformer_to_original(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers expert keys -> original Wan keys (prefix=COMFY_PREFIX for ComfyUI's layout)."""
    out = {}
    for key, value in sd.items():
        new = key
        for pat, rep in _TRANSFORMER_TO_ORIGINAL:
            new = re.sub(pat, rep, new)
        out[prefix + new] = value
    return out


def infer_transformer_config(sd: dict[str, torch.Tensor], head_dim: int = 128) -> dict:
    """Read the architecture from a diffusers-keyed expert state dict.

    q/k RMSNorm is "across heads" (weights of size dim), so the head count is not in any shape: the real
    model has head dim 128; a smaller model passes its own."""
    pe = sd["patch_embedding.weight"]
    dim = pe.shape[0]
    return dict(
        patch_size=tuple(pe.shape[2:]),
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        in_channels=pe.shape[1],
        out_channels=sd["proj_out.weight"].shape[0] // (pe.shape[2] * pe.shape[3] * pe.shape[4]),
        text_dim=sd["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        freq_dim=sd["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        ffn_dim=sd["blocks.0.ffn.net.0.proj.weight"].shape[0],
        num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        cross_attn_norm="blocks.0.norm2.weight" in sd,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=sd["condition_embedder.image_embedder.norm1.weight"].shape[0]
        if "condition_embedder.image_embedder.norm1.weight" in sd else None,
        added_kv_proj_dim=sd["blocks.0.attn2.add_k_proj.weight"].shape[1]
        if "blocks.0.attn2.add_k_proj.weight" in sd else None,
    )


# --------------------------------------------------------------------------------------------- VAE
def vae_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan 2.1 VAE keys (also ComfyUI's wan_2.1_vae) -> diffusers AutoencoderKLWan keys."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(strip_prefix(dict(sd), prefixes=("vae.", "first_stage_model.")))


_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _resnet_to_original(rest: str) -> str:
    for d, o in _RES.items():
        if rest.startswith(d + ".") or rest == d:
            return o + rest[len(d):]
    return rest


def vae_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLWan keys -> original Wan 2.1 VAE keys (real block structure)."""
    out = {}
    for key, value in sd.items():
        new = None
        if key.startswith("quant_conv."):
            new = "conv1." + key[len("quant_conv."):]
        elif key.startswith("post_quant_conv."):
            new = "conv2." + key[len("post_quant_conv."):]
        else:
            part, rest = key.split(".", 1)  # encoder / decoder
            if rest.startswith("conv_in."):
                new = f"{part}.conv1.{rest[len('conv_in.'):]}"
            elif rest.startswith("norm_out."):
                new = f"{part}.head.0.{rest[len('norm_out.'):]}"
            elif rest.startswith("conv_out."):
                new = f"{part}.head.2.{rest[len('conv_out.'):]}"
            elif rest.startswith("mid_block."):
                m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest)
                kind, idx, tail = m.group(1), int(m.group(2)), m.group(3)
                if kind == "resnets":
                    new = f"{part}.middle.{idx * 2}.{_resnet_to_original(tail)}"
                else:
                    new = f"{part}.middle.1.{tail}"
            elif rest.startswith("down_blocks."):
                m = re.match(r"down_blocks\.(\d+)\.(.*)", rest)
                new = f"{part}.downsamples.{m.group(1)}.{_resnet_to_original(m.group(2))}"
            elif rest.startswith("up_blocks."):
                m = re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", rest)
                blk, kind, idx, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
                if kind == "resnets":
                    new = f"{part}.upsamples.{blk * 4 + idx}.{_resnet_to_original(tail)}"
                else:
                    new = f"{part}.upsamples.{blk * 4 + 3}.{tail}"
        if new is None:
            raise KeyError(f"no original Wan VAE name for {key}")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------- UMT5
# Original Wan T5 (models_t5_umt5-xxl-enc-bf16.pth) <-> transformers UMT5EncoderModel.
_UMT5_BLOCK = [
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),  # GELU branch
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),  # linear branch
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
]


def umt5_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan or ComfyUI UMT5 keys -> transformers UMT5EncoderModel keys."""
    sd = strip_prefix(dict(sd), prefixes=("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "transformer."))
    if any(k.startswith("encoder.block.") for k in sd):  # ComfyUI / HF layout already
        out = dict(sd)
        if "shared.weight" not in out and "encoder.embed_tokens.weight" in out:
            out["shared.weight"] = out["encoder.embed_tokens.weight"]
        out["encoder.embed_tokens.weight"] = out["shared.weight"]  # tied in UMT5EncoderModel
        return out
    out = {}
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        else:
            m = re.match(r"blocks\.(\d+)\.(.*)", key)
            if not m:
                raise KeyError(f"unknown UMT5 key {key}")
            for orig, hf in _UMT5_BLOCK:
                if m.group(2) == orig:
                    out[f"encoder.block.{m.group(1)}.{hf}"] = value
                    break
            else:
                raise KeyError(f"unknown UMT5 key {key}")
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def umt5_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.embed_tokens.weight":
            continue
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        else:
            m = re.match(r"encoder\.block\.(\d+)\.(.*)", key)
            for orig, hf in _UMT5_BLOCK:
                if m and m.group(2) == hf:
                    out[f"blocks.{m.group(1)}.{orig}"] = value
                    break
            else:
                raise KeyError(f"no original Wan T5 name for {key}")
    return out


def infer_umt5_config(sd: dict[str, torch.Tensor]) -> dict:
    """UMT5 encoder architecture from HF-keyed shapes (d_kv is 64 in UMT5-XXL: 64 heads x 64)."""
    vocab, d_model = sd["shared.weight"].shape
    num_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    return dict(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads, num_layers=num_layers,
        d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1,
    )

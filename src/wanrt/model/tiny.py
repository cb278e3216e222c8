"""A deterministic, randomly initialised WAN 2.2 I2V model: the real architecture at small sizes.

Built in code in about a second, no downloads. It is the embedded default whenever no weights are
configured, and what every CPU test runs. The VAE keeps the real block structure (dim_mult [1,2,4,4],
two res blocks) so that the real checkpoint key names and diffusers' converters apply to it unchanged.
"""

from __future__ import annotations

import string

import torch

from wanrt.model.components import UNIPC_SCHEDULER_CONFIG, WanI2VModel

TEXT_DIM = 32

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=36,  # 16 noisy latent + 4 mask + 16 first-frame latent
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,  # Wan 2.2 I2V has no CLIP image branch
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)

TINY_VAE_CONFIG = dict(
    base_dim=4,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)

TINY_UMT5_CONFIG = dict(
    d_model=TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
    pad_token_id=0,
    eos_token_id=1,
)

_WORDS = (
    "a an the and of to in on with is are person woman man cat dog smiling smile waving wave nodding "
    "turning head slowly gentle camera zoom pan static blurry low quality fast motion"
).split()


def build_tiny_tokenizer():
    """A T5-style unigram tokenizer (pad=0, eos=1, unk=2) built from a fixed vocabulary, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [f"▁{w}" for w in _WORDS] + ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -1.0 - i / 100.0) for i, p in enumerate(pieces)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def build_tiny_model(seed: int = 0) -> WanI2VModel:
    """Same seed => bit-identical weights. Each part gets its own derived seed so adding one keeps the rest."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    with torch.device("cpu"):
        torch.manual_seed(seed * 1000 + 1)
        high = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        torch.manual_seed(seed * 1000 + 2)
        low = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        torch.manual_seed(seed * 1000 + 3)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        torch.manual_seed(seed * 1000 + 4)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5_CONFIG))
    # Default inits leave the output heads and modulation at zero in places; perturb every parameter a
    # little so that each layer (and each LoRA on it later) visibly changes the output.
    g = torch.Generator().manual_seed(seed * 1000 + 5)
    for module in (high, low):
        for p in module.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.02)
    model = WanI2VModel(
        transformer_high=high,
        transformer_low=low,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(UNIPC_SCHEDULER_CONFIG),
        name=f"tiny-seed{seed}",
    )
    return model.eval()

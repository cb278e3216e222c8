"""What each part of a WAN 2.2 I2V model weighs on the device, from its config alone (nothing is built).

Parameter counts follow diffusers' `WanTransformer3DModel` (Wan 2.2 I2V: no image branch, no added k/v,
RMSNorm on q and k across heads) and transformers' `UMT5EncoderModel`; tests/test_loading.py holds them
equal to the built modules. Weight bytes follow what our code puts on the device: `cast_module` keeps
diffusers' `_keep_in_fp32_modules` in fp32, and the compiled backend's FP8 swap stores the block linears
(attention q/k/v/out, FFN up/down) as e4m3 with one fp32 scale per output row, biases in the model dtype.

Activation workspaces are formulas over the token count; the memory planner (runtime/memory.py) adds them
to the weights per phase. Their coefficients are explained where they are defined and checked against
live-tensor measurements on CPU in tests/test_memory.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GiB = 2**30

# Defaults for the calls below (identical to loading.WAN22_I2V_A14B_TRANSFORMER_CONFIG / UMT5_XXL_CONFIG;
# repeated here so this module stays importable without torch).
A14B_EXPERT = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                   cross_attn_norm=True, rope_max_seq_len=1024)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
# AutoencoderKLWan() (the Wan 2.1 VAE, default config), counted on meta; the VAE always runs in fp32.
WAN21_VAE_PARAMS = 126_892_531
TEXT_LEN = 512
FP32_MODULES = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")  # diffusers keeps these fp32


@dataclass(frozen=True)
class ExpertParams:
    """Parameter counts of one expert, split by how each is stored."""

    total: int
    fp32: int  # kept in fp32 whatever the model dtype (time embedder, modulation tables, norms)
    fp8_weights: int  # weights of the linears the FP8 swap quantises
    fp8_rows: int  # their output rows: one fp32 scale each
    buffers_fp32: int  # RoPE tables

    def bytes(self, dtype_bytes: int = 2, fp8: bool = False) -> int:
        """Device bytes: parameters + buffers. fp8: the quantised linears at 1 byte + a 4-byte row scale."""
        other = self.total - self.fp32
        out = self.fp32 * 4 + self.buffers_fp32 * 4
        if fp8:
            return out + self.fp8_weights + self.fp8_rows * 4 + (other - self.fp8_weights) * dtype_bytes
        return out + other * dtype_bytes


def expert_params(config: dict | None = None) -> ExpertParams:
    c = {**A14B_EXPERT, **(config or {})}
    d = c["num_attention_heads"] * c["attention_head_dim"]
    f, n, p = c["ffn_dim"], c["num_layers"], c["patch_size"][0] * c["patch_size"][1] * c["patch_size"][2]
    time_embedder = c["freq_dim"] * d + d + d * d + d
    embed = (d * c["in_channels"] * p + d  # patch embedding (Conv3d)
             + time_embedder
             + d * 6 * d + 6 * d  # time projection to the 6 modulation vectors
             + c["text_dim"] * d + d + d * d + d)  # text embedder
    attn = 4 * (d * d + d) + 2 * d  # q, k, v, out (+ bias) and the q/k RMSNorm weights
    norm2 = 2 * d if c.get("cross_attn_norm", True) else 0
    block = 6 * d + 2 * attn + norm2 + d * f + f + f * d + d
    head = 2 * d + d * c["out_channels"] * p + c["out_channels"] * p
    fp8_weights = n * (8 * d * d + 2 * d * f)
    return ExpertParams(
        total=embed + n * block + head,
        fp32=time_embedder + n * (6 * d + norm2) + 2 * d,
        fp8_weights=fp8_weights,
        fp8_rows=n * (8 * d + f + d),
        buffers_fp32=2 * c.get("rope_max_seq_len", 1024) * c["attention_head_dim"],
    )


def expert_block_bytes(config: dict | None = None, dtype_bytes: int = 2, fp8: bool = False) -> int:
    """Device bytes of one transformer block (what block streaming moves per block): its modulation table and
    cross-attention norm in fp32, the eight attention projections and the FFN's two linears at 1 byte + a row
    scale (fp8) or at `dtype_bytes`, biases and q/k norm weights at `dtype_bytes`."""
    c = {**A14B_EXPERT, **(config or {})}
    d, f = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"]
    norm2 = 2 * d if c.get("cross_attn_norm", True) else 0
    fp32 = 6 * d + norm2
    weights = 8 * d * d + 2 * d * f
    small = 2 * (4 * d + 2 * d) + f + d  # biases and the q/k RMSNorm weights
    if fp8:
        return fp32 * 4 + weights + (8 * d + f + d) * 4 + small * dtype_bytes
    return fp32 * 4 + (weights + small) * dtype_bytes


def expert_stem_bytes(config: dict | None = None, dtype_bytes: int = 2, fp8: bool = False) -> int:
    """Everything of an expert but its blocks (patch and condition embedders, head, RoPE tables): what block
    streaming keeps on the device for the running expert (0.5 GB for the A14B)."""
    c = {**A14B_EXPERT, **(config or {})}
    return expert_params(config).bytes(dtype_bytes, fp8) - c["num_layers"] * expert_block_bytes(config, dtype_bytes, fp8)


def largest_linear_params(config: dict | None = None) -> int:
    """The largest block linear (the FFN's): a weight-only FP8 layer upcasts one such weight at a time."""
    c = {**A14B_EXPERT, **(config or {})}
    return c["num_attention_heads"] * c["attention_head_dim"] * c["ffn_dim"]


def umt5_params(config: dict | None = None, tied: bool = False) -> int:
    """UMT5 encoder. transformers 5 builds `shared` and `encoder.embed_tokens` as two tensors (untied:
    6.73 B for XXL); a loader that ties them carries 5.68 B."""
    c = {**UMT5_XXL, **(config or {})}
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    ffn = (3 if str(c.get("feed_forward_proj", "")).startswith("gated") else 2) * d * ff
    layer = 4 * d * inner + c["relative_attention_num_buckets"] * c["num_heads"] + d + ffn + d
    return c["vocab_size"] * d * (1 if tied else 2) + c["num_layers"] * layer + d


def umt5_bytes(config: dict | None = None, dtype_bytes: int = 2, tied: bool = True) -> int:
    """Device bytes of the UMT5 encoder: transformers keeps the FFN output projections (`wo`,
    `_keep_in_fp32_modules`) in fp32 whatever the dtype, and so does our cast_module: 1.0 B of XXL's 5.7 B."""
    c = {**UMT5_XXL, **(config or {})}
    wo = c["num_layers"] * c["d_ff"] * c["d_model"]
    return (umt5_params(config, tied) - wo) * dtype_bytes + wo * max(4, dtype_bytes)


def umt5_block_bytes(config: dict | None = None, dtype_bytes: int = 2) -> int:
    """One UMT5 encoder layer (self-attention with its own relative bias, gated FFN, two norms; `wo` in fp32):
    what streaming the text encoder moves per layer (0.47 GB for XXL)."""
    c = {**UMT5_XXL, **(config or {})}
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    gated = str(c.get("feed_forward_proj", "")).startswith("gated")
    wo = ff * d
    other = 4 * d * inner + c["relative_attention_num_buckets"] * c["num_heads"] + 2 * d + (2 if gated else 1) * d * ff
    return other * dtype_bytes + wo * max(4, dtype_bytes)


def latent_tokens(frames: int, height: int, width: int, patch=(1, 2, 2)) -> int:
    """Transformer tokens for a video (frames rounded up to 4k+1, VAE 4x8x8, patch 1x2x2)."""
    f_lat = (-(-(frames - 1) // 4) * 4) // 4 + 1
    return (f_lat // patch[0]) * (height // 8 // patch[1]) * (width // 8 // patch[2])


def sequence_length(latent_shape, patch_size) -> int:
    """Tokens after patchify of a (B, C, F, H, W) latent."""
    _, _, f, h, w = latent_shape
    pt, ph, pw = patch_size
    return (f // pt) * (h // ph) * (w // pw)


def bucket_tokens(bucket: str) -> int:
    """"WxHxF" (the warm-up bucket syntax) -> tokens."""
    w, h, f = (int(v) for v in bucket.lower().split("x"))
    return latent_tokens(f, h, w)


# ------------------------------------------------------------------------------------------- workspaces
# One transformer block forward in eager diffusers (WanTransformerBlock), batch B, L tokens, width d,
# FFN width f, activations a bytes (bf16: 2). X = B*L*d*a is one hidden state, F = B*L*f*a one FFN
# intermediate. Live at the two peaks (the block's input, held by the caller, and the residual stream
# stay alive throughout; so do the normed input and the attention outputs until they are reassigned):
#   gated residual adds in fp32: input + residual + normed + cross-attn out + FFN out (5X) + residual.float()
#                   and ffn_out.float() and their product (3 x 2X) = 11X (self-attention + RoPE peaks ~9X)
#   FFN:            input + residual + normed + cross-attn out + up-projection + GELU output = 4X + 2F
# Measured with a live-tensor counter on CPU (tests/test_memory.py): the formula is within a few % above.
# torch.compile fuses the fp32 chains, so compiled backends peak lower; we plan for eager (the worst case,
# and what offload runs).
BLOCK_X, FFN_X = 11, 4


def forward_workspace_bytes(tokens: int, batch: int = 2, dim: int = 5120, ffn: int = 13824, head_dim: int = 128,
                            act_bytes: int = 2, text_len: int = TEXT_LEN) -> int:
    """Peak activation bytes of one expert forward: max(11X, 4X + 2F) + the tensors that outlive the
    blocks: RoPE cos/sin (L x head_dim fp32 each) and the text context before and after its projection."""
    x = batch * tokens * dim * act_bytes
    f = batch * tokens * ffn * act_bytes
    rope, context, temb = 2 * tokens * head_dim * 4, 2 * batch * text_len * dim * act_bytes, 16 * batch * dim * 4
    return max(BLOCK_X * x, FFN_X * x + 2 * f) + rope + context + temb


def loop_workspace_bytes(tokens: int, batch: int = 2, dim: int = 5120, ffn: int = 13824, head_dim: int = 128,
                         act_bytes: int = 2, text_len: int = TEXT_LEN) -> int:
    """One denoising step: the forward's peak + the sampler's latents around it (model input, noise
    prediction, fp32 latents and scheduler history: ~1 KiB per token per batch row, 69 MB at 33,600)."""
    return forward_workspace_bytes(tokens, batch, dim, ffn, head_dim, act_bytes, text_len) + batch * tokens * 1024


def text_workspace_bytes(batch: int = 2, text_len: int = TEXT_LEN, d_model: int = 4096, d_ff: int = 10240,
                         heads: int = 64) -> int:
    """UMT5 encoder forward (prompt + negative prompt): 8 hidden states and 3 FFN intermediates in fp32
    plus scores and probabilities (B*H*Lt^2 fp32). An upper bound (2-3x what a live-tensor count measures
    on small configs); 0.5 GB for XXL, small next to its 11.4 GB of weights."""
    return batch * text_len * (8 * d_model + 3 * d_ff) * 4 + 2 * batch * heads * text_len**2 * 4


# Wan 2.1 VAE in fp32, streaming one latent frame (4 video frames) at a time with its causal feature cache:
# live bytes per output pixel (H*W) at the peak, measured with a live-tensor counter on CPU on the real
# AutoencoderKLWan config (base dim 96): decode 19.7 KB/px at 64x64 and 96x96 (18.6 at 32x32), encode
# 14.3 KB/px; flat in the frame count (the cache holds 2 frames per conv). 640x640: 8.2 GB decode.
VAE_DECODE_BYTES_PER_PIXEL = 20_000
VAE_ENCODE_BYTES_PER_PIXEL = 14_500


def vae_decode_workspace_bytes(width: int, height: int) -> int:
    return VAE_DECODE_BYTES_PER_PIXEL * width * height


def vae_encode_workspace_bytes(width: int, height: int) -> int:
    return VAE_ENCODE_BYTES_PER_PIXEL * width * height


# ------------------------------------------------------------------------------------------- FLOPs
# The FLOP model of a request (benchmarks/flops.py prints it; the memory planner projects times from it).
# Multiply-adds count 2 FLOPs; the transformer only (patch embed, blocks, head). Text encoder and VAE have
# their own constants below.
FLOP_ARCH = dict(dim=5120, layers=40, ffn=13824, heads=40, in_channels=36, out_channels=16, text_dim=4096,
                 text_len=512, patch=(1, 2, 2), freq_dim=256)

# The seed's presets ("Performance Tips") at the default 640x640; "fast" with cfg 1 as our fast path.
PRESETS = {
    "fast": dict(steps=4, frames=49, width=640, height=640, cfg_high_noise=1.0, cfg_low_noise=1.0),
    "default": dict(steps=6, frames=81, width=640, height=640, cfg_high_noise=3.5, cfg_low_noise=3.5),
    "high_quality": dict(steps=8, frames=121, width=640, height=640, cfg_high_noise=3.5, cfg_low_noise=3.5),
}
# The seed's published times (api_contract.md, "Expected Processing Times"), seconds.
SEED_TARGETS_S = {
    "fast": {"RTX 4090": 30, "RTX 3080": 60},
    "default": {"RTX 4090": 60, "RTX 3080": 120},
    "high_quality": {"RTX 4090": 120, "RTX 3080": 240},
}


@dataclass
class ForwardFlops:
    tokens: int
    linear: float
    attention_self: float
    attention_cross: float

    @property
    def attention(self) -> float:
        return self.attention_self + self.attention_cross

    @property
    def total(self) -> float:
        return self.linear + self.attention


def forward_flops(frames: int, height: int, width: int, arch: dict = FLOP_ARCH) -> ForwardFlops:
    """One expert forward for one sample (batch 1); frames are rounded up to 4k+1 as the runtime does."""
    L, Lt = latent_tokens(frames, height, width, arch["patch"]), arch["text_len"]
    d, f, n = arch["dim"], arch["ffn"], arch["layers"]
    p = arch["patch"][0] * arch["patch"][1] * arch["patch"][2]
    per_layer_linear = (
        2 * L * d * d * 4  # self-attention q, k, v, o
        + 2 * L * d * d * 2  # cross-attention q, o
        + 2 * Lt * d * d * 2  # cross-attention k, v on the text
        + 2 * L * d * f * 2  # FFN up + down
    )
    linear = n * per_layer_linear
    linear += 2 * L * arch["in_channels"] * p * d  # patch embedding
    linear += 2 * L * d * arch["out_channels"] * p  # head
    linear += 2 * Lt * (arch["text_dim"] * d + d * d)  # text embedding MLP
    attn_self = n * 4 * L * L * d  # QK^T and PV
    attn_cross = n * 4 * L * Lt * d
    return ForwardFlops(L, float(linear), float(attn_self), float(attn_cross))


def request_flops(steps: int, frames: int, width: int, height: int, cfg_high_noise: float, cfg_low_noise: float,
                  steps_high: int, arch: dict = FLOP_ARCH) -> dict:
    """FLOPs of the denoising loop; steps_high: steps on the high-noise expert (from the schedule)."""
    fwd = forward_flops(frames, height, width, arch)
    per_expert = {}
    for expert, n_steps, cfg in (("high", steps_high, cfg_high_noise), ("low", steps - steps_high, cfg_low_noise)):
        batch = 2 if cfg > 1 else 1
        per_expert[expert] = {"steps": n_steps, "batch": batch, "flops": fwd.total * batch * n_steps,
                              "linear": fwd.linear * batch * n_steps, "attention": fwd.attention * batch * n_steps}
    total = sum(e["flops"] for e in per_expert.values())
    return {"tokens": fwd.tokens, "forward": {**dataclasses.asdict(fwd), "total": fwd.total},
            "per_expert": per_expert, "total": total}


def text_encoder_flops(batch: int = 2, config: dict | None = None, text_len: int = TEXT_LEN) -> float:
    """UMT5 encoder over `batch` prompts padded to text_len: 2 FLOPs per weight per token + attention."""
    c = {**UMT5_XXL, **(config or {})}
    weights = umt5_params(config, tied=True) - c["vocab_size"] * c["d_model"]  # the embedding is a lookup
    attention = c["num_layers"] * 4 * text_len * text_len * c["num_heads"] * c["d_kv"]
    return float(batch * (2 * text_len * weights + attention))


# Wan 2.1 VAE (base dim 96), counted with torch's FlopCounterMode on CPU through our streaming loops: per
# output pixel of each video frame (flat in size and frame count, within 3%). Encode counts the zero frames too.
VAE_DECODE_FLOPS_PER_PIXEL_FRAME = 8.7e6
VAE_ENCODE_FLOPS_PER_PIXEL_FRAME = 5.2e6


def vae_flops(width: int, height: int, frames: int) -> dict[str, float]:
    n = -(-(frames - 1) // 4) * 4 + 1  # generated frames (4k+1)
    px = width * height * n
    return {"encode": VAE_ENCODE_FLOPS_PER_PIXEL_FRAME * px, "decode": VAE_DECODE_FLOPS_PER_PIXEL_FRAME * px}

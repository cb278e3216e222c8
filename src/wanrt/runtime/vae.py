"""VAE encode of the first frame (+ the I2V mask) and a streaming decode, both on diffusers' AutoencoderKLWan.

Both loops mirror AutoencoderKLWan's private `_encode`/`_decode` and use its private cache attributes
(`_enc_feat_map`, `_enc_conv_idx`, `_feat_map`, `_conv_idx`, `clear_cache`): pyproject pins the diffusers
range they were checked against (0.42.x), and tests compare both loops with `vae.encode`/`vae.decode`."""

from __future__ import annotations

from typing import Iterator

import torch


def latent_stats(vae, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, z, 1, 1, 1)
    return mean, inv_std


@torch.inference_mode()
def encode_first_frame_video(vae, image: torch.Tensor, num_frames: int, on_chunk=None) -> torch.Tensor:
    """Latent mean of [image, zeros x (num_frames-1)], chunk by chunk like AutoencoderKLWan._encode, but the
    zero frames are made per 4-frame chunk (the full pixel video is never built: 1.5 GB fp32 at
    1024x1024x121) and `on_chunk(i, n)` is called after each chunk (progress, cancel)."""
    _, _, height, width = image.shape
    device, dtype = next(vae.parameters()).device, vae.dtype
    first = image.unsqueeze(2).to(device, dtype)
    zeros = torch.zeros(1, 3, 4, height, width, device=device, dtype=dtype)
    n_chunks = 1 + (num_frames - 1) // 4
    # Copied from diffusers 0.42.1 AutoencoderKLWan._encode, with the zero frames made per chunk
    vae.clear_cache()
    try:
        outs = []
        for i in range(n_chunks):
            vae._enc_conv_idx = [0]
            chunk = first if i == 0 else zeros
            outs.append(vae.encoder(chunk, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
            if on_chunk is not None:
                on_chunk(i + 1, n_chunks)
        moments = vae.quant_conv(torch.cat(outs, dim=2))
    finally:
        vae.clear_cache()
    return moments[:, : vae.config.z_dim]  # the mode of the diagonal Gaussian is its mean


@torch.inference_mode()
def encode_condition(vae, image: torch.Tensor, num_frames: int, temporal: int = 4, spatial: int = 8,
                     on_chunk=None) -> torch.Tensor:
    """(1,3,H,W) in [-1,1] -> (1, 4+16, F', H/8, W/8): the first-frame mask and the normalised latent
    of [image, zeros x (num_frames-1)], exactly as diffusers' WanImageToVideoPipeline builds it."""
    _, _, height, width = image.shape
    latent = encode_first_frame_video(vae, image, num_frames, on_chunk).float()
    mean, inv_std = latent_stats(vae, latent.device)
    latent = (latent - mean) * inv_std

    lat_f, lat_h, lat_w = (num_frames - 1) // temporal + 1, height // spatial, width // spatial
    mask = torch.zeros(1, 1, num_frames, lat_h, lat_w, device=latent.device)
    mask[:, :, 0] = 1
    # The first pixel frame counts 4 times (the VAE's first latent frame stands for one pixel frame).
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
    mask = mask.view(1, lat_f, temporal, lat_h, lat_w).transpose(1, 2)
    return torch.cat([mask, latent], dim=1)


@torch.inference_mode()
def decode_stream(vae, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """Normalised latents (1,16,F',h,w) -> chunks of (1,3,n,H,W) in [-1,1]: 1 frame, then 4 per latent frame.

    Same maths as AutoencoderKLWan._decode (causal feature cache), but yields each chunk as soon as it is
    decoded so the MP4 encoder can take it and the full video never sits in memory."""
    vae_device = next(vae.parameters()).device
    mean, inv_std = latent_stats(vae, vae_device, vae.dtype)
    z = latents.to(vae_device, vae.dtype) / inv_std + mean
    # Copied from diffusers 0.42.1 AutoencoderKLWan._decode, yielding each chunk instead of concatenating
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(i == 0))
            yield out.clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()


def to_uint8_frames(chunk: torch.Tensor):
    """(1,3,n,H,W) in [-1,1] -> numpy uint8 (n,H,W,3), rounding as diffusers' postprocess does."""
    frames = ((chunk[0].float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()

"""VAE encode of the first frame (+ the I2V mask) and a streaming decode, both on diffusers' AutoencoderKLWan.

Both loops mirror AutoencoderKLWan's private `_encode`/`_decode` and use its private cache attributes
(`_enc_feat_map`, `_enc_conv_idx`, `_feat_map`, `_conv_idx`, `clear_cache`): pyproject pins the diffusers
range they were checked against (0.42.x), and tests compare both loops with `vae.encode`/`vae.decode`.

Memory: the decode already runs one latent frame at a time (chunked in time). A memory tier may attach a
`VaeMemory` to the VAE (runtime/memory.py does): it then brings the VAE to the device only for its encode and
decode (when the plan sends it away during the loop), counts the workspace in the device ledger, and may ask for
spatial tiles. Tiled, each overlapping tile runs the whole clip (its own causal cache, so a tile's workspace is
its own pixels' only) and the tiles are blended with linear ramps over the overlap; decoded frames gather in a
host buffer and are yielded in the same chunks as untiled. Tiles change the pixels near their seams (the VAE's
receptive field is cut), so they are used only where the whole frame does not fit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

TILE_OVERLAP = 0.25  # of a tile's side, in latent pixels (diffusers' AutoencoderKLWan tiling overlaps 25% too)


class VaeMemory:
    """How a memory tier lets the VAE use the device. `tile_for(kind, width, height)` -> latent tile side or
    None (whole frames); `workspace(kind, width, height, tile)` -> bytes to count in `ledger`; `shuttle`: brings
    the VAE's weights to the device for the session and drops them after (None: they stay)."""

    def __init__(self, ledger=None, shuttle=None, workspace: Callable | None = None, tile_for: Callable | None = None):
        self.ledger, self.shuttle, self.workspace, self.tile_for = ledger, shuttle, workspace, tile_for
        self.sessions: list[tuple[str, int, int, int | None]] = []  # (kind, width, height, tile): what ran

    def __deepcopy__(self, memo):
        # A VAE deep-copied for another worker slot shares the policy, not this VAE's shuttle.
        return VaeMemory(self.ledger, None, self.workspace, self.tile_for)

    @contextlib.contextmanager
    def session(self, kind: str, width: int, height: int):
        tile = self.tile_for(kind, width, height) if self.tile_for is not None else None
        if self.shuttle is not None:
            self.shuttle.bring()
        ws = self.workspace(kind, width, height, tile) if self.workspace is not None else 0
        if self.ledger is not None:
            self.ledger.place(f"vae_{kind}_workspace", ws)
        self.sessions.append((kind, width, height, tile))
        try:
            yield tile
        finally:
            if self.ledger is not None:
                self.ledger.free(f"vae_{kind}_workspace", ws)
            if self.shuttle is not None:
                self.shuttle.send_back()


def attach(vae, memory: VaeMemory | None) -> None:
    """Set (or clear) the VAE's memory policy."""
    vae.wanrt_memory = memory


def _session(vae, kind: str, width: int, height: int):
    memory = getattr(vae, "wanrt_memory", None)
    return memory.session(kind, width, height) if memory is not None else contextlib.nullcontext(None)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` covering [0, size) with at least `overlap` shared between neighbours."""
    if tile >= size:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(n: int, start: int, total: int, overlap: int, device) -> torch.Tensor:
    """Blend weights along one axis for a tile at `start` of length n: rising over the overlap where a tile
    precedes it, falling where one follows."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        if start > 0:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if start + n < total:
            w[n - overlap:] = torch.minimum(w[n - overlap:], r.flip(0))
    return w


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
def encode_first_frame_tiled(vae, image: torch.Tensor, num_frames: int, tile: int, spatial: int = 8,
                             on_chunk=None) -> torch.Tensor:
    """encode_first_frame_video over overlapping spatial tiles of `tile` latent pixels, blended."""
    _, _, height, width = image.shape
    lat_h, lat_w = height // spatial, width // spatial
    overlap = int(tile * TILE_OVERLAP)
    rows, cols = tile_starts(lat_h, tile, overlap), tile_starts(lat_w, tile, overlap)
    out = weight = None
    n_tiles, done = len(rows) * len(cols), 0
    for r in rows:
        for c in cols:
            th, tw = min(tile, lat_h), min(tile, lat_w)
            crop = image[:, :, r * spatial:(r + th) * spatial, c * spatial:(c + tw) * spatial]

            def progress(i, n, done=done):  # the whole encode's progress, tile by tile
                if on_chunk is not None:
                    on_chunk(done * n + i, n_tiles * n)

            part = encode_first_frame_video(vae, crop, num_frames, progress).float()
            if out is None:
                out = torch.zeros(part.shape[:3] + (lat_h, lat_w), device=part.device)
                weight = torch.zeros(lat_h, lat_w, device=part.device)
            w = _ramp(th, r, lat_h, overlap, part.device)[:, None] * _ramp(tw, c, lat_w, overlap, part.device)[None, :]
            out[..., r:r + th, c:c + tw] += part * w
            weight[r:r + th, c:c + tw] += w
            done += 1
    return out / weight


@torch.inference_mode()
def encode_condition(vae, image: torch.Tensor, num_frames: int, temporal: int = 4, spatial: int = 8,
                     on_chunk=None) -> torch.Tensor:
    """(1,3,H,W) in [-1,1] -> (1, 4+16, F', H/8, W/8): the first-frame mask and the normalised latent
    of [image, zeros x (num_frames-1)], exactly as diffusers' WanImageToVideoPipeline builds it."""
    _, _, height, width = image.shape
    with _session(vae, "encode", width, height) as tile:
        if tile is None or (tile >= height // spatial and tile >= width // spatial):
            latent = encode_first_frame_video(vae, image, num_frames, on_chunk).float()
        else:
            latent = encode_first_frame_tiled(vae, image, num_frames, tile, spatial, on_chunk)
    mean, inv_std = latent_stats(vae, latent.device)
    latent = (latent - mean) * inv_std

    lat_f, lat_h, lat_w = (num_frames - 1) // temporal + 1, height // spatial, width // spatial
    mask = torch.zeros(1, 1, num_frames, lat_h, lat_w, device=latent.device)
    mask[:, :, 0] = 1
    # The first pixel frame counts 4 times (the VAE's first latent frame stands for one pixel frame).
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
    mask = mask.view(1, lat_f, temporal, lat_h, lat_w).transpose(1, 2)
    return torch.cat([mask, latent], dim=1)


def decode_stream(vae, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """Normalised latents (1,16,F',h,w) -> chunks of (1,3,n,H,W) in [-1,1]: 1 frame, then 4 per latent frame.

    Same maths as AutoencoderKLWan._decode (causal feature cache), but yields each chunk as soon as it is
    decoded so the MP4 encoder can take it and the full video never sits in memory. Under a memory tier that
    asks for tiles, decode_tiled runs instead (chunks then come from a host buffer)."""
    _, _, _, h, w = latents.shape
    with _session(vae, "decode", w * 8, h * 8) as tile:
        if tile is None or (tile >= h and tile >= w):
            yield from _decode_frames(vae, latents)
        else:
            yield from decode_tiled(vae, latents, tile)


@torch.inference_mode()
def decode_tiled(vae, latents: torch.Tensor, tile: int, spatial: int = 8) -> Iterator[torch.Tensor]:
    """decode_stream over overlapping spatial tiles of `tile` latent pixels: each tile decodes the whole clip
    into a host buffer (weighted by the blend ramps), then the frames are yielded in decode_stream's chunks."""
    _, _, n_lat, lat_h, lat_w = latents.shape
    overlap = int(tile * TILE_OVERLAP)
    px_overlap = overlap * spatial
    height, width, n_frames = lat_h * spatial, lat_w * spatial, 1 + 4 * (n_lat - 1)
    out = torch.zeros(1, 3, n_frames, height, width)  # host: 1.6 GB for 1024x1024x121 in fp32
    weight = torch.zeros(height, width)
    for r in tile_starts(lat_h, tile, overlap):
        for c in tile_starts(lat_w, tile, overlap):
            th, tw = min(tile, lat_h), min(tile, lat_w)
            y0, x0, ph, pw = r * spatial, c * spatial, th * spatial, tw * spatial
            w = _ramp(ph, y0, height, px_overlap, "cpu")[:, None] * _ramp(pw, x0, width, px_overlap, "cpu")[None, :]
            t = 0
            for chunk in _decode_frames(vae, latents[:, :, :, r:r + th, c:c + tw]):
                n = chunk.shape[2]
                out[:, :, t:t + n, y0:y0 + ph, x0:x0 + pw] += chunk.float().cpu() * w
                t += n
            weight[y0:y0 + ph, x0:x0 + pw] += w
    out /= weight
    yield out[:, :, :1]
    for t in range(1, n_frames, 4):
        yield out[:, :, t:t + 4]


@torch.inference_mode()
def _decode_frames(vae, latents: torch.Tensor) -> Iterator[torch.Tensor]:
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

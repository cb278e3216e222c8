"""VAE encode of the first frame (+ the I2V mask) and a streaming decode, both on diffusers' AutoencoderKLWan.

Copied from diffusers 0.42.1; relies on diffusers >=0.38,<0.43 private attributes. Both loops mirror
AutoencoderKLWan's private `_encode`/`_decode` and use its private cache attributes (`_enc_feat_map`,
`_enc_conv_idx`, `_feat_map`, `_conv_idx`, `clear_cache`), its submodules (`encoder`, `decoder`, `quant_conv`,
`post_quant_conv`) and the decoder's `first_chunk` keyword. Those are identical in the sources of 0.35.0 through
0.42.1 (0.35.0 added `first_chunk` with Wan 2.2; checked against 0.35.x-0.40.0 and 0.42.1, 0.41 not seen); 0.38.0
made WanRMS_norm normalise bf16 inputs in fp32, which the bf16 decode below counts on for its accuracy. Tests
compare both loops with `vae.encode`/`vae.decode` (tests/test_pipeline.py) on the installed version.

Memory: the decode already runs one latent frame at a time (chunked in time). A memory tier may attach a
`VaeMemory` to the VAE (runtime/memory.py does): it then brings the VAE to the device only for its encode and
decode (when the plan sends it away during the loop), counts the workspace in the device ledger, and may ask for
spatial tiles. Tiled, each overlapping tile runs the whole clip (its own causal cache, so a tile's workspace is
its own pixels' only) and the tiles are blended with linear ramps over the overlap; decoded frames gather in a
host buffer and are yielded in the same chunks as untiled. Tiles change the pixels near their seams (the VAE's
receptive field is cut), so they are used only where the whole frame does not fit.

Precision (settings.vae_dtype, `decode_format`): on CUDA the decoder runs in bf16 with its conv weights in
channels_last_3d (channels_last for its 2-D convs) and cudnn.benchmark on around each decoder call; elsewhere in
the VAE's own dtype (fp32), exactly as diffusers does. The encode, quant_conv and post_quant_conv always run in
the VAE's own dtype. Frame PSNR of bf16 against fp32 (uint8 frames): 42.3-43.3 dB for the tiny random VAE on the
CPU (tests/test_vae_decode.py holds it above 40 dB); the real Wan 2.1 VAE's figure needs a GPU and its weights
(benchmarks/bench_vae.py --model <dir> --device cuda): under 40 dB there, vae_dtype=fp32 is the way back.
With cudnn.benchmark the kernels are chosen by timing, once per shape and process: bf16 frames are repeatable
within a process, not guaranteed bit-identical across processes (fp32 is diffusers' decode, unchanged), unless
settings.deterministic turns cudnn.benchmark off (factory.make_deterministic; read here from torch's own switch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DecodeFormat:
    """How the decoder runs: weights and activations in `dtype`, conv weights (and the decoder's input) in
    channels_last_3d / channels_last when `channels_last`, cudnn.benchmark on around each decoder call."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    cudnn_benchmark: bool = False


VAE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def decode_format(device, vae_dtype: str = "auto", own_dtype: torch.dtype = torch.float32) -> DecodeFormat:
    """settings.vae_dtype on `device` -> DecodeFormat. auto: bf16 + channels_last_3d + cudnn.benchmark on CUDA,
    `own_dtype` (the VAE's, fp32) elsewhere. bf16 gets the memory format and cudnn.benchmark on CUDA only (they are
    cuDNN kernel choices; on the CPU bf16 runs in the default layout). fp32 is diffusers' own decode everywhere."""
    cuda = torch.device(device).type == "cuda"
    if vae_dtype == "auto":
        dtype = torch.bfloat16 if cuda else own_dtype
    elif vae_dtype in VAE_DTYPES:
        dtype = VAE_DTYPES[vae_dtype]
    else:
        raise ValueError(f"vae_dtype must be auto, bf16 or fp32, not {vae_dtype!r}")
    fast = cuda and dtype == torch.bfloat16
    # settings.deterministic (factory.make_deterministic) turns cudnn.benchmark's choice-by-timing off
    return DecodeFormat(dtype, channels_last=fast, cudnn_benchmark=fast and not torch.backends.cudnn.deterministic)


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _memory_format(t: torch.Tensor, channels_last: bool):
    if channels_last and t.dim() == 5:
        return torch.channels_last_3d
    if channels_last and t.dim() == 4:  # the upsamplers' Conv2d
        return torch.channels_last
    return torch.preserve_format


class VaeDecoder:
    """`vae.decoder` as one decode runs it, in `fmt`.

    The VAE's own dtype and layout: the module itself, nothing copied (bit-identical to diffusers). Otherwise a
    transient copy of the decoder's weights, cast to fmt.dtype (conv weights channels_last_3d on CUDA), that
    each call swaps in with torch.func.functional_call for the call only. Why a copy per decode and not a cast in
    place or a kept bf16 decoder: the encoder, quant_conv and post_quant_conv stay in the VAE's dtype and are
    never touched (the encode path is unchanged); a non-resident VAE is moved by runtime/streaming.Shuttle, which
    points the parameters at its fp32 host copies and back, so an in-place cast would be undone or, worse,
    pinned-host fp32 bytes would be counted for bf16 ones; deep copies for worker slots, the tier's teardown
    and module_bytes all keep seeing the fp32 VAE; and nothing extra stays on the device between requests. The
    copy is made on the device the VAE is on (after a Shuttle has brought it): 73.3M parameters for Wan 2.1's
    decoder, 147 MB in bf16, cast in well under a millisecond on a GPU, and counted in the ledger while the decode
    runs (`nbytes`). The bf16 activations halve the workspace the tier priced in fp32, which more than covers it.
    Not thread-safe against another thread running this VAE's decoder at the same time (neither is the causal
    cache): one decode per VAE at a time, as before."""

    def __init__(self, vae, fmt: DecodeFormat | None = None):
        self.vae = vae
        self.fmt = fmt = fmt or DecodeFormat(vae.dtype)
        self.params: dict[str, torch.Tensor] | None = None
        self.nbytes = 0
        if fmt.dtype != vae.dtype or fmt.channels_last:
            self.params = {}
            with torch.no_grad():
                for name, t in list(vae.decoder.named_parameters()) + list(vae.decoder.named_buffers()):
                    if t.is_floating_point():
                        t = t.detach().to(dtype=fmt.dtype, memory_format=_memory_format(t, fmt.channels_last))
                        self.nbytes += t.numel() * t.element_size()
                    self.params[name] = t

    @property
    def dtype(self) -> torch.dtype:
        return self.fmt.dtype

    def __call__(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        vae = self.vae
        kwargs = dict(feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=first_chunk)
        if self.params is None:
            return vae.decoder(x, **kwargs)
        x = x.to(dtype=self.fmt.dtype, memory_format=_memory_format(x, self.fmt.channels_last))
        with _cudnn_benchmark(self.fmt.cudnn_benchmark):
            return torch.func.functional_call(vae.decoder, self.params, (x,), kwargs, tie_weights=False)


def decode_stream(vae, latents: torch.Tensor, vae_dtype: str | DecodeFormat = "auto") -> Iterator[torch.Tensor]:
    """Normalised latents (1,16,F',h,w) -> chunks of (1,3,n,H,W) in [-1,1]: 1 frame, then 4 per latent frame.

    Same maths as AutoencoderKLWan._decode (causal feature cache), but yields each chunk as soon as it is
    decoded so the MP4 encoder can take it and the full video never sits in memory. Under a memory tier that
    asks for tiles, decode_tiled runs instead (chunks then come from a host buffer). `vae_dtype`: settings.vae_dtype
    (resolved by decode_format on the device the VAE decodes on) or a DecodeFormat; chunks come in that dtype."""
    _, _, _, h, w = latents.shape
    with _session(vae, "decode", w * 8, h * 8) as tile:
        fmt = vae_dtype if isinstance(vae_dtype, DecodeFormat) else \
            decode_format(next(vae.parameters()).device, vae_dtype, vae.dtype)
        decoder = VaeDecoder(vae, fmt)
        memory = getattr(vae, "wanrt_memory", None)
        ledger = memory.ledger if memory is not None else None
        with ledger.hold("vae_decode_cast", decoder.nbytes) if ledger is not None else contextlib.nullcontext():
            if tile is None or (tile >= h and tile >= w):
                yield from _decode_frames(vae, latents, decoder)
            else:
                yield from decode_tiled(vae, latents, tile, decoder=decoder)


@torch.inference_mode()
def decode_tiled(vae, latents: torch.Tensor, tile: int, spatial: int = 8,
                 decoder: VaeDecoder | None = None) -> Iterator[torch.Tensor]:
    """decode_stream over overlapping spatial tiles of `tile` latent pixels: each tile decodes the whole clip
    into a host buffer (weighted by the blend ramps), then the frames are yielded in decode_stream's chunks."""
    _, _, n_lat, lat_h, lat_w = latents.shape
    overlap = int(tile * TILE_OVERLAP)
    px_overlap = overlap * spatial
    height, width, n_frames = lat_h * spatial, lat_w * spatial, 1 + 4 * (n_lat - 1)
    out = torch.zeros(1, 3, n_frames, height, width)  # host: 1.6 GB for 1024x1024x121 in fp32
    weight = torch.zeros(height, width)
    decoder = decoder or VaeDecoder(vae)  # one weight cast for all the tiles
    for r in tile_starts(lat_h, tile, overlap):
        for c in tile_starts(lat_w, tile, overlap):
            th, tw = min(tile, lat_h), min(tile, lat_w)
            y0, x0, ph, pw = r * spatial, c * spatial, th * spatial, tw * spatial
            w = _ramp(ph, y0, height, px_overlap, "cpu")[:, None] * _ramp(pw, x0, width, px_overlap, "cpu")[None, :]
            t = 0
            for chunk in _decode_frames(vae, latents[:, :, :, r:r + th, c:c + tw], decoder):
                n = chunk.shape[2]
                out[:, :, t:t + n, y0:y0 + ph, x0:x0 + pw] += chunk.float().cpu() * w
                t += n
            weight[y0:y0 + ph, x0:x0 + pw] += w
    out /= weight
    yield out[:, :, :1]
    for t in range(1, n_frames, 4):
        yield out[:, :, t:t + 4]


@torch.inference_mode()
def _decode_frames(vae, latents: torch.Tensor, decoder: VaeDecoder | None = None) -> Iterator[torch.Tensor]:
    decoder = decoder or VaeDecoder(vae)
    vae_device = next(vae.parameters()).device
    # The de-normalisation and post_quant_conv (a 1x1x1 conv on 16 channels) run in the VAE's own dtype; only
    # the decoder's input is cast (VaeDecoder), without autocast: explicit dtypes, nothing left switched on.
    mean, inv_std = latent_stats(vae, vae_device, vae.dtype)
    z = latents.to(vae_device, vae.dtype) / inv_std + mean
    # Copied from diffusers 0.42.1 AutoencoderKLWan._decode, yielding each chunk instead of concatenating
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out = decoder(x[:, :, i:i + 1], first_chunk=(i == 0))
            yield out.clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()


def to_uint8_frames(chunk: torch.Tensor):
    """(1,3,n,H,W) in [-1,1] -> numpy uint8 (n,H,W,3), rounding as diffusers' postprocess does."""
    frames = ((chunk[0].float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()

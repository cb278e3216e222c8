"""Memory tiers: where the experts, the text encoder and the VAE live, chosen from free GPU memory and host RAM
at start-up (`--memory auto`), and the runtime pieces that keep each tier's promise.

Tiers, richest first (`--memory NAME` forces one):
- resident: both experts, the text encoder and the VAE on the GPU (80 GB cards).
- swap (alias: offload): one expert on the GPU, the other pinned on the host; swapped once per request at the
  high->low boundary, the next request's first expert copied back on a side stream during the VAE decode.
- stream: each expert's transformer blocks live pinned on the host and visit the GPU a few blocks ahead of the
  one running (runtime/streaming.py); only the expert's small stem (embedders, head) stays on the GPU.
- mmap: stream, with the experts' blocks read from their memory-mapped safetensors files instead of being
  held in RAM (hosts that cannot hold both experts).

Within a tier the plan also decides, richest first: the text encoder stays on the GPU or streams its 24 layers
through it while it encodes (and leaves before the loop); the VAE stays or visits only for its encode and
decode; cond and uncond run as a batch of 2 or one after the other; the VAE decodes whole frames or spatial
tiles; block streaming prefetches 2 blocks or 1. The structural choices (text encoder, VAE) are made once at
start-up; the batch split and the VAE tiles are re-decided per request from its shape.

How auto chooses: for each tier in order, the smallest set of those sacrifices that makes every phase of a
request (load, text encode, VAE encode, loop, VAE decode) fit the free GPU memory, and the tier's host copies fit
host RAM; the first tier that fits wins. The byte model is model/sizes.py per part (experts at their storage
precision: FP8 at 1 byte + row scales), plus a flat allowance for cuBLAS/cuDNN workspaces and fragmentation.
No tier fits: the leanest is used and `fits` is False (the reason says by how much).

The ledger (streaming.DeviceLedger) counts what the tier places on the device as it places and frees it;
tests hold its peak under the budget for budgets that force each tier. A request that no tier can run is
refused before it queues (`capacity`, `fits`); an out-of-memory error during a job moves the runtime one tier
leaner and runs the job once more (`run_within_memory`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from wanrt.model import sizes
from wanrt.params import DEFAULT_BUCKET  # the seed's default request: 21x40x40 = 33,600 tokens
from wanrt.runtime import gpus
from wanrt.runtime.streaming import BlockStreamer, DeviceLedger, Shuttle, host_copies, move_to, nbytes, tensors_of
from wanrt.runtime.vae import VaeMemory, attach

log = logging.getLogger("wanrt.memory")

GiB = sizes.GiB
# Not in the formulas: cuBLAS/cuDNN workspaces, the caching allocator's fragmentation and rounding,
# compiled kernels' scratch. A flat allowance rather than a percentage: it does not grow with the weights.
OVERHEAD_BYTES = 2 * GiB
# Host RAM the OS and this process need besides the tier's host copies (Python, torch, CUDA host libraries).
HOST_RESERVE_BYTES = 4 * GiB
PHASES = ("load", "text", "vae_encode", "loop", "vae_decode")
TIERS = ("resident", "swap", "stream", "mmap")
ALIASES = {"offload": "swap"}
# On an out-of-memory error the runtime moves down this ladder (mmap is stream with mapped host copies: it saves
# host RAM, not GPU memory).
GPU_LADDER = {"resident": "swap", "swap": "stream"}
BLOCKS_AHEAD = 2
VAE_TILES = (64, 48, 32, 24, 16)  # tile sides in latent pixels (512 .. 128 output pixels), largest first
# Projected times: nothing measured on a big GPU yet, so these are assumptions (stated in `wanrt plan` and in
# the README's "What each card gets"): fractions of the card's dense peak the loop, the text encoder and the VAE
# reach.
ASSUMED_EFFICIENCY = {"loop": 0.5, "text": 0.3, "vae": 0.3}
# mmap: blocks come from the page cache through the driver's pageable staging; assumed rate.
PAGEABLE_BYTES_PER_S = 10e9


def normalize_tier(name: str) -> str:
    name = ALIASES.get(name, name)
    if name != "auto" and name not in TIERS:
        raise ValueError(f"memory must be auto or one of {', '.join(TIERS)} (or {', '.join(ALIASES)}), not {name!r}")
    return name


def module_bytes(module: torch.nn.Module) -> int:
    return nbytes(tensors_of(module))


# --------------------------------------------------------------------------------------------- byte model
@dataclass(frozen=True)
class ModelBytes:
    """What the planner needs to price any request: weights by part (device bytes at storage precision) and
    the workspace model's dimensions."""

    expert_high: int
    expert_low: int
    expert_load: int  # one expert as it arrives from the loaders (before an FP8 swap)
    stem: int  # an expert minus its blocks
    block: int  # the largest block
    n_blocks: int
    upcast: int  # weight-only FP8: one BF16 copy of the largest linear while it runs
    text_encoder: int
    text_stem: int  # the text encoder minus its layers (embedding, final norm)
    text_block: int
    n_text_blocks: int
    vae: int
    overhead: int
    dim: int = 5120
    ffn: int = 13824
    head_dim: int = 128
    act_bytes: int = 2
    text_len: int = sizes.TEXT_LEN
    text_dims: tuple = (4096, 10240, 64)  # d_model, d_ff, heads
    vae_scale: float = 1.0  # VAE workspace relative to the real one (channel width / 96)
    fp8: bool = False
    host_reserve: int = HOST_RESERVE_BYTES
    lora_cache: int = 0  # the LoRA prepared-tensor cache's device budget (the slot buffers are in the experts)
    load_mapped: bool = False  # streamed tiers read the experts from mapped files and quantise them a layer at a
    # time: the host holds their FP8 copies and file pages (the kernel's to drop), never both in the load dtype

    @property
    def expert(self) -> int:
        return max(self.expert_high, self.expert_low)

    def with_lora(self, expert_config: dict | None, max_rank: int, cache_bytes: int, dtype) -> "ModelBytes":
        """These bytes with LoRA slots installed (runtime/lora.py): each expert carries its slot buffers (they move
        with it under swap and stream), and the prepared-tensor cache may fill `cache_bytes` on the device."""
        whole, stem, block = lora_slot_bytes(expert_config, max_rank, dtype)
        return dataclasses.replace(self, expert_high=self.expert_high + whole, expert_low=self.expert_low + whole,
                                   stem=self.stem + stem, block=self.block + block, lora_cache=cache_bytes)

    def loop_ws(self, tokens: int, batch: int) -> int:
        return sizes.loop_workspace_bytes(tokens, batch, self.dim, self.ffn, self.head_dim, self.act_bytes,
                                          self.text_len)

    def text_ws(self, batch: int = 2, text_len: int | None = None) -> int:
        d, ff, heads = self.text_dims
        return sizes.text_workspace_bytes(batch, text_len or self.text_len, d, ff, heads)

    def vae_ws(self, kind: str, width: int, height: int, tile: int | None = None) -> int:
        if tile is not None:
            width, height = min(width, tile * 8), min(height, tile * 8)
        per_px = sizes.VAE_DECODE_BYTES_PER_PIXEL if kind == "decode" else sizes.VAE_ENCODE_BYTES_PER_PIXEL
        return int(per_px * width * height * self.vae_scale)

    @classmethod
    def from_config(cls, dtype_bytes: int = 2, fp8: bool = False, expert_config: dict | None = None,
                    text_config: dict | None = None, upcast: bool = False, overhead: int = OVERHEAD_BYTES,
                    load_fp8: bool = False) -> "ModelBytes":
        """The A14B (or `expert_config`) before anything is built. upcast: FP8 weights on a GPU without FP8
        GEMMs (weight-only). load_fp8: the experts arrive in FP8 (an FP8 checkpoint), else in the dtype."""
        c = {**sizes.A14B_EXPERT, **(expert_config or {})}
        t = {**sizes.UMT5_XXL, **(text_config or {})}
        expert = sizes.expert_params(expert_config).bytes(dtype_bytes, fp8=fp8)
        text = sizes.umt5_bytes(text_config, dtype_bytes, tied=True)
        text_block = sizes.umt5_block_bytes(text_config, dtype_bytes)
        return cls(
            expert_high=expert, expert_low=expert,
            expert_load=sizes.expert_params(expert_config).bytes(dtype_bytes, fp8=load_fp8),
            stem=sizes.expert_stem_bytes(expert_config, dtype_bytes, fp8),
            block=sizes.expert_block_bytes(expert_config, dtype_bytes, fp8), n_blocks=c["num_layers"],
            upcast=sizes.largest_linear_params(expert_config) * 2 if (fp8 and upcast) else 0,
            text_encoder=text, text_stem=text - t["num_layers"] * text_block, text_block=text_block,
            n_text_blocks=t["num_layers"], vae=sizes.WAN21_VAE_PARAMS * 4, overhead=overhead,
            dim=c["num_attention_heads"] * c["attention_head_dim"], ffn=c["ffn_dim"], head_dim=c["attention_head_dim"],
            act_bytes=dtype_bytes, text_dims=(t["d_model"], t["d_ff"], t["num_heads"]), fp8=fp8)

    @classmethod
    def measure(cls, model, overhead: int = 0, act_bytes: int | None = None, host_reserve: int = 0) -> "ModelBytes":
        """A built model's parts as they are now (after any FP8 swap); workspaces from its configs. overhead,
        host_reserve: the flat allowances (0 on the CPU, where tests give exact budgets)."""
        high, low = model.transformer_high, model.transformer_low
        blocks = [module_bytes(b) for b in high.blocks]
        te = model.text_encoder
        te_blocks = [module_bytes(b) for b in te.encoder.block]
        cfg, tc = high.config, te.config
        if act_bytes is None:
            act_bytes = next((p.element_size() for p in high.parameters() if p.is_floating_point()
                              and p.dtype in (torch.float32, torch.bfloat16, torch.float16)), 4)
        fp8 = any(t.dtype == torch.float8_e4m3fn for t in tensors_of(high))
        return cls(
            expert_high=module_bytes(high), expert_low=module_bytes(low),
            expert_load=max(module_bytes(high), module_bytes(low)),
            stem=module_bytes(high) - sum(blocks), block=max(blocks), n_blocks=len(blocks), upcast=0,
            text_encoder=module_bytes(te), text_stem=module_bytes(te) - sum(te_blocks), text_block=max(te_blocks),
            n_text_blocks=len(te_blocks), vae=module_bytes(model.vae), overhead=overhead,
            dim=cfg.num_attention_heads * cfg.attention_head_dim, ffn=cfg.ffn_dim, head_dim=cfg.attention_head_dim,
            act_bytes=act_bytes, text_len=model.max_sequence_length,
            text_dims=(tc.d_model, tc.d_ff, tc.num_heads), vae_scale=model.vae.config.base_dim / 96, fp8=fp8,
            host_reserve=host_reserve)


def lora_slot_bytes(expert_config: dict | None, max_rank: int, dtype) -> tuple[int, int, int]:
    """Device bytes of the LoRA slot buffers on one expert: (whole expert, stem, largest block). Counted, not
    modelled: an expert of this config built on the meta device, wrapped by the serving code's own
    install_lora_slots (whatever layers it targets, at the dtype the buffers take)."""
    return _lora_slot_bytes(json.dumps(expert_config or {}, sort_keys=True), max_rank, str(dtype))


@lru_cache(maxsize=8)
def _lora_slot_bytes(config_json: str, max_rank: int, dtype_name: str) -> tuple[int, int, int]:
    from diffusers import WanTransformer3DModel

    from wanrt.runtime.lora import LoraLinear, LoraNorm, install_lora_slots

    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    with torch.device("meta"):
        expert = WanTransformer3DModel.from_config({**sizes.A14B_EXPERT, **json.loads(config_json)})
    keep = set(WanTransformer3DModel._keep_in_fp32_modules or ())  # as from_pretrained(torch_dtype=) leaves them
    for name, param in expert.named_parameters():
        if not keep & set(name.split(".")):
            param.data = param.data.to(dtype)
    install_lora_slots(expert, max_rank)

    def slots(module: torch.nn.Module) -> int:
        return sum(b.numel() * b.element_size() for m in module.modules() if isinstance(m, (LoraLinear, LoraNorm))
                   for b in m.buffers(recurse=False))

    whole, blocks = slots(expert), [slots(b) for b in expert.blocks]
    return whole, whole - sum(blocks), max(blocks)


def model_parts(dtype_bytes: int = 2, fp8: bool = False, bucket: str = DEFAULT_BUCKET, expert_config=None,
                text_config=None, batch: int = 2, mb: ModelBytes | None = None) -> dict[str, int]:
    """Device bytes of each part for one shape bucket ("WxHxF"): the weights at their storage precision and
    the workspaces of each phase (batch 2: cond + uncond)."""
    mb = mb or ModelBytes.from_config(dtype_bytes, fp8, expert_config, text_config)
    w, h, _ = (int(v) for v in bucket.lower().split("x"))
    tokens = sizes.bucket_tokens(bucket)
    return {
        "expert_high": mb.expert_high, "expert_low": mb.expert_low, "expert_load": mb.expert_load,
        "expert_stem": mb.stem, "expert_block": mb.block,
        "text_encoder": mb.text_encoder, "text_stem": mb.text_stem, "text_block": mb.text_block, "vae": mb.vae,
        "text_workspace": mb.text_ws(batch), "vae_encode_workspace": mb.vae_ws("encode", w, h),
        "loop_workspace": mb.loop_ws(tokens, batch), "vae_decode_workspace": mb.vae_ws("decode", w, h),
        "overhead": mb.overhead, "lora_cache": mb.lora_cache, "n_blocks": mb.n_blocks,
    }


@dataclass(frozen=True)
class Options:
    """The sacrifices within a tier (see the module docstring), richest values as defaults."""

    text_encoder: str = "resident"  # or "streamed": its layers stream through the device while it encodes
    vae_resident: bool = True  # False: on the device only for its encode and decode
    cfg_batch: int = 2  # 1: cond and uncond one after the other
    vae_tile: int | None = None  # latent pixels per tile side; None: whole frames
    ahead: int = BLOCKS_AHEAD  # blocks prefetched (stream, mmap)

    @property
    def window(self) -> int:
        """Blocks whose memory may be in use at once on a GPU: running, prefetched, and the previous one."""
        return self.ahead + 2

    def blocks_in_flight(self, n_blocks: int) -> int:
        return min(self.window, n_blocks)


def streams_blocks(tier: str) -> bool:
    return tier in ("stream", "mmap")


def phase_bytes(mb: ModelBytes, tier: str, opts: Options = Options(), tokens: int = 33_600, width: int = 640,
                height: int = 640, fp8_at_load: bool = False) -> dict[str, int]:
    """Device bytes at each phase's peak. resident: both experts throughout; swap: one (the next request's first
    expert is prefetched during the decode, so it is there while the text encodes); stream: the running
    expert's stem always, a window of its blocks during the loop. load: the loaders put resident experts on the
    device in the model dtype and the FP8 swap runs afterwards, unless `fp8_at_load` (an FP8 checkpoint)."""
    tier = normalize_tier(tier)
    if tier == "resident":
        loop = idle = mb.expert_high + mb.expert_low
        load = loop if fp8_at_load else 2 * mb.expert_load
    elif tier == "swap":
        loop = idle = mb.expert
        load = 0
    else:
        loop, idle, load = mb.stem + opts.blocks_in_flight(mb.n_blocks) * mb.block + mb.upcast, mb.stem, 0
    te_kept = mb.text_encoder if opts.text_encoder == "resident" else 0
    te_text = te_kept or mb.text_stem + opts.blocks_in_flight(mb.n_text_blocks) * mb.text_block
    vae_kept = mb.vae if opts.vae_resident else 0
    base = mb.overhead + mb.lora_cache
    return {
        "load": load + te_kept + vae_kept + base,
        "text": idle + te_text + mb.text_ws(2) + vae_kept + base,
        "vae_encode": idle + te_kept + mb.vae + mb.vae_ws("encode", width, height, opts.vae_tile) + base,
        "loop": loop + te_kept + vae_kept + mb.loop_ws(tokens, opts.cfg_batch) + base,
        "vae_decode": idle + te_kept + mb.vae + mb.vae_ws("decode", width, height, opts.vae_tile) + base,
    }


def host_bytes_needed(mb: ModelBytes, tier: str, opts: Options = Options(), fp8_at_load: bool = False) -> int:
    """Host RAM the tier needs: both experts' host copies (swap, stream; while loading they are in the load
    dtype, unless mb.load_mapped on a streamed tier), only the stems for mmap (blocks are file pages), the text
    encoder and VAE copies when they leave the device, and the reserve for the OS and this process. Pinned copies take their bytes and no more: one
    buffer per expert, block or shuttle, locked at its exact size (streaming.host_copies; not torch's pinned
    allocator, which rounds each allocation up to a power of two)."""
    tier = normalize_tier(tier)
    aside = (mb.text_encoder if opts.text_encoder == "streamed" else 0) + (0 if opts.vae_resident else mb.vae)
    if tier == "resident":
        experts = 0
    elif tier == "mmap":
        experts = mb.stem * 2
    else:
        steady = mb.expert_high + mb.expert_low
        mapped = mb.load_mapped and streams_blocks(tier)  # (swap fuses each expert's Q/K/V before quantising)
        experts = max(steady, steady if fp8_at_load or mapped else 2 * mb.expert_load)
    return experts + aside + mb.host_reserve


def _loop_choices(tier: str) -> list[tuple[int, int]]:
    return [(2, BLOCKS_AHEAD), (1, BLOCKS_AHEAD)] + ([(1, 1)] if streams_blocks(tier) else [])


def fit_options(mb: ModelBytes, tier: str, base: Options, tokens: int, width: int, height: int,
                free: int | None, fp8_at_load: bool = False) -> tuple[Options, dict[str, int]]:
    """`base` (the structural choices) with the richest batch split / prefetch and VAE tile that fit `free`
    (the leanest ones when nothing fits)."""
    opts = base
    if free is not None:
        for cfg_batch, ahead in _loop_choices(tier):
            opts = dataclasses.replace(base, cfg_batch=min(cfg_batch, base.cfg_batch), ahead=ahead)
            if phase_bytes(mb, tier, opts, tokens, width, height, fp8_at_load)["loop"] <= free:
                break
        for tile in (None, *VAE_TILES):
            opts = dataclasses.replace(opts, vae_tile=tile)
            p = phase_bytes(mb, tier, opts, tokens, width, height, fp8_at_load)
            if max(p["vae_encode"], p["vae_decode"]) <= free:
                break
    return opts, phase_bytes(mb, tier, opts, tokens, width, height, fp8_at_load)


STRUCTURES = (Options(), Options(text_encoder="streamed"), Options(text_encoder="streamed", vae_resident=False))


@dataclass(frozen=True)
class MemoryPlan:
    tier: str  # resident | swap | stream | mmap
    need_bytes: int  # the largest phase (overhead included)
    free_bytes: int | None
    reason: str
    parts: dict = field(default_factory=dict)  # bytes by part (see model_parts)
    phases: dict = field(default_factory=dict)  # device bytes at each phase's peak
    fits: bool = True  # False: even the leanest tier does not fit
    options: Options = Options()
    host_need_bytes: int = 0
    host_bytes: int | None = None
    bucket: str = DEFAULT_BUCKET
    requested: str = "auto"

    @property
    def mode(self) -> str:  # the name before tiers had names of their own
        return self.tier

    @property
    def text_encoder_resident(self) -> bool:
        return self.options.text_encoder == "resident"

    def resident_parts(self) -> dict[str, int]:
        """Device bytes by part during the loop (the weights this tier keeps there) and the loop's workspace."""
        p, o = self.parts, self.options
        if self.tier == "resident":
            out = {"expert_high": p["expert_high"], "expert_low": p["expert_low"]}
        elif self.tier == "swap":
            out = {"expert (one)": max(p["expert_high"], p["expert_low"])}
        else:
            n = o.blocks_in_flight(p.get("n_blocks", o.window))
            out = {"expert stem": p["expert_stem"], f"expert blocks ({n} in flight)": n * p["expert_block"]}
        out["text_encoder"] = p["text_encoder"] if o.text_encoder == "resident" else 0
        out["vae"] = p["vae"] if o.vae_resident else 0
        if p.get("lora_cache"):
            out["lora_cache"] = p["lora_cache"]
        out["loop_workspace"] = self.phases["loop"] - sum(out.values()) - p["overhead"]
        out["overhead"] = p["overhead"]
        return out

    def describe_options(self) -> str:
        o = self.options
        bits = [f"text encoder {'on the GPU' if o.text_encoder == 'resident' else 'streamed while it encodes'}",
                "VAE on the GPU" if o.vae_resident else "VAE on the GPU only to encode/decode",
                "cond+uncond batched" if o.cfg_batch == 2 else "cond and uncond one after the other",
                "VAE whole frames" if o.vae_tile is None else f"VAE tiles of {o.vae_tile * 8} px"]
        if streams_blocks(self.tier):
            bits.append(f"{o.ahead} block{'s' if o.ahead != 1 else ''} prefetched")
        return "; ".join(bits)

    def table(self) -> str:
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes / GiB:.2f} GiB"
        host = "" if self.host_bytes is None else (f", host {self.host_need_bytes / GiB:.1f} of "
                                                   f"{self.host_bytes / GiB:.1f} GiB")
        rows = [f"{self.tier}: need {self.need_bytes / GiB:.2f} GiB, free {free}{host} ({self.reason})",
                f"  {self.describe_options()}"]
        if self.parts:
            rows += [f"  on the GPU in the loop: {k:<28}{v / GiB:>8.2f} GiB" for k, v in self.resident_parts().items()]
        rows += [f"  phase {k:<16}{v / GiB:>8.2f} GiB" for k, v in self.phases.items()]
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"tier": self.tier, "requested": self.requested, "fits": self.fits, "reason": self.reason,
                "bucket": self.bucket, "need_gib": round(self.need_bytes / GiB, 2),
                "free_gib": None if self.free_bytes is None else round(self.free_bytes / GiB, 2),
                "host_need_gib": round(self.host_need_bytes / GiB, 2),
                "host_gib": None if self.host_bytes is None else round(self.host_bytes / GiB, 2),
                "options": dataclasses.asdict(self.options),
                "phases_gib": {k: round(v / GiB, 2) for k, v in self.phases.items()},
                "resident_gib": {k: round(v / GiB, 2) for k, v in self.resident_parts().items()} if self.parts else {}}


def _bucket(bucket: str) -> tuple[int, int, int]:
    w, h, _ = (int(v) for v in bucket.lower().split("x"))
    return sizes.bucket_tokens(bucket), w, h


def decide(mb: ModelBytes, free_bytes: int | None, host_bytes: int | None = None, requested: str = "auto",
           bucket: str = DEFAULT_BUCKET, fp8_at_load: bool = False, mmap_ok: bool = True,
           mb_mapped: ModelBytes | None = None, max_batch: int = 2) -> MemoryPlan:
    """The first tier (richest first) whose phases fit `free_bytes` and whose host copies fit `host_bytes`, with
    the fewest sacrifices. A requested tier is priced the same way, alone. `mb_mapped`: the experts as their
    files store them (mmap streams them as stored). mmap_ok False: no files to map (auto skips mmap).
    max_batch: 1 when no request will use CFG (guidance 1 for both experts): the loop is priced at batch 1."""
    requested = normalize_tier(requested)
    tiers = [t for t in TIERS if mmap_ok or t != "mmap"] if requested == "auto" else [requested]
    tokens, w, h = _bucket(bucket)
    structures = [dataclasses.replace(s, cfg_batch=min(s.cfg_batch, max_batch)) for s in STRUCTURES]
    tried = []
    # Pass 1: each tier with only the structural choices (a leaner tier costs less than splitting the CFG batch
    # or tiling the VAE: a streamed block's copy hides behind compute). Pass 2: with those as well.
    candidates = [(t, s, False) for t in tiers for s in structures] + [(t, s, True) for t in tiers for s in structures]
    for tier, structure, local in candidates:
        m = (mb_mapped or mb) if tier == "mmap" else mb
        if local:
            opts, phases = fit_options(m, tier, structure, tokens, w, h, free_bytes, fp8_at_load)
        else:
            opts, phases = structure, phase_bytes(m, tier, structure, tokens, w, h, fp8_at_load)
        need, host_need = max(phases.values()), host_bytes_needed(m, tier, opts, fp8_at_load)
        gpu_ok = free_bytes is None or need <= free_bytes
        host_ok = host_bytes is None or host_need <= host_bytes
        tried.append((tier, m, opts, phases, need, host_need, gpu_ok, host_ok))
        if gpu_ok and host_ok:
            peak = max(phases, key=phases.get)
            how = "requested" if requested != "auto" else "fits"
            free = "" if free_bytes is None else f" of {free_bytes / GiB:.1f} GiB free"
            return MemoryPlan(tier, need, free_bytes, f"{how}: {need / GiB:.1f} GiB at {peak}{free}",
                              model_parts(bucket=bucket, mb=m), phases, True, opts, host_need, host_bytes, bucket,
                              requested)
    tier, m, opts, phases, need, host_need, gpu_ok, host_ok = tried[-1]
    why = []
    if not gpu_ok:
        why.append(f"needs {need / GiB:.1f} GiB at {max(phases, key=phases.get)}, {free_bytes / GiB:.1f} GiB free")
    if not host_ok:
        why.append(f"needs {host_need / GiB:.1f} GiB of host RAM, {host_bytes / GiB:.1f} GiB available")
    pre = "requested; " if requested != "auto" else ""
    return MemoryPlan(tier, need, free_bytes, f"{pre}does not fit: {tier} {' and '.join(why)}",
                      model_parts(bucket=bucket, mb=m), phases, False, opts, host_need, host_bytes, bucket, requested)


# --------------------------------------------------------------------------------------------- capacity
def max_tokens(mb: ModelBytes, tier: str, opts: Options, free: int | None, fp8_at_load: bool = False) -> int | None:
    """The most tokens whose loop (and text phase) fit `free` in this tier with these structural options, cond
    and uncond one after the other and 1 block ahead (the leanest loop); None when unbounded (no budget)."""
    if free is None:
        return None
    lean = dataclasses.replace(opts, cfg_batch=1, ahead=1 if streams_blocks(tier) else opts.ahead,
                               vae_tile=VAE_TILES[-1])
    p = phase_bytes(mb, tier, lean, 1, 256, 256, fp8_at_load)
    if max(p["text"], p["vae_encode"], p["vae_decode"], p["loop"]) > free:
        return 0
    lo, hi = 1, 1 << 22
    while lo < hi:  # the loop phase grows with the tokens
        mid = (lo + hi + 1) // 2
        if phase_bytes(mb, tier, lean, mid, 256, 256, fp8_at_load)["loop"] <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def request_tokens(width: int, height: int, frames: int) -> int:
    return sizes.latent_tokens(frames, height, width)


def largest_bucket(limit_tokens: int | None) -> str | None:
    """The largest request WxWxF (sides multiples of 32 in 256-1024, F in 49/81/121: the seed's presets) within
    `limit_tokens`, by tokens."""
    if limit_tokens is None:
        return "1024x1024x121"
    fitting = [(request_tokens(side, side, f), f"{side}x{side}x{f}") for f in (49, 81, 121)
               for side in range(256, 1025, 32) if request_tokens(side, side, f) <= limit_tokens]
    return max(fitting)[1] if fitting else None


def capacity_of(max_tok: int | None, tier: str) -> dict:
    """What a worker publishes (worker info "memory"."capacity"): the API refuses requests above max_tokens."""
    return {"max_tokens": max_tok, "tier": tier, "largest_bucket": largest_bucket(max_tok),
            "max_frames_at_640": next((f for f in range(121, 15, -4) if max_tok is None
                                       or request_tokens(640, 640, f) <= max_tok), None)}


def fits(params, capacity: dict | None) -> str | None:
    """None when a request (GenerateParams or its dict) fits a capacity, else the message naming the limit.
    The API cannot import this module (no torch there): routes.py repeats the same three lines."""
    if not capacity or capacity.get("max_tokens") is None:
        return None
    get = params.get if isinstance(params, dict) else (lambda k: getattr(params, k))
    tokens = request_tokens(int(get("width")), int(get("height")), int(get("frames")))
    if tokens <= capacity["max_tokens"]:
        return None
    return (f"this request needs {tokens} latent tokens ({get('width')}x{get('height')}x{get('frames')}); the "
            f"workers' GPUs run at most {capacity['max_tokens']} (e.g. {capacity.get('largest_bucket')}): "
            "lower width, height or frames")


# --------------------------------------------------------------------------------------------- projection
def projected_seconds(plan: MemoryPlan, mb: ModelBytes, gpu: gpus.Gpu, steps: int, frames: int, width: int,
                      height: int, cfg_high_noise: float, cfg_low_noise: float, steps_high: int,
                      fp8_compute: bool | None = None, efficiency: dict | None = None) -> dict:
    """Seconds per stage on `gpu` under `plan`: FLOPs (model/sizes.py) at ASSUMED_EFFICIENCY of the card's dense
    peak (linears at FP8 peak where the card has FP8 GEMMs and the weights are FP8, attention at BF16, the VAE at
    TF32) plus host-to-device copies over PCIe 4.0 x16 (~25 GB/s) where they do not overlap compute: a
    streamed block's copy hides behind the previous blocks' compute when it is shorter; the swap at the boundary
    and the text encoder's stream do not hide."""
    eff = {**ASSUMED_EFFICIENCY, **(efficiency or {})}
    arch = dict(sizes.FLOP_ARCH, dim=mb.dim, ffn=mb.ffn, heads=mb.dim // mb.head_dim)
    fwd = sizes.forward_flops(frames, height, width, arch)
    fp8_compute = (mb.fp8 and gpu.fp8) if fp8_compute is None else fp8_compute
    linear_peak = (gpu.fp8_tflops if fp8_compute else gpu.bf16_tflops) * 1e12 * eff["loop"]
    attn_peak = gpu.bf16_tflops * 1e12 * eff["loop"]
    o = plan.options
    pcie = gpu.pcie_bytes_per_s
    rate = min(pcie, PAGEABLE_BYTES_PER_S) if plan.tier == "mmap" else pcie
    loop = exposed = 0.0
    forwards = 0
    for n_steps, cfg in ((steps_high, cfg_high_noise), (steps - steps_high, cfg_low_noise)):
        batch = 2 if cfg > 1 else 1
        calls = batch if o.cfg_batch == 1 else 1  # forward calls per step
        per_call = (fwd.linear / linear_peak + fwd.attention / attn_peak) * batch / calls
        loop += n_steps * calls * per_call
        forwards += n_steps * calls
        if streams_blocks(plan.tier) and n_steps:
            copy = mb.block / rate
            compute = per_call / mb.n_blocks
            # the first blocks of the expert's first forward are not prefetched; then copies hide behind compute
            exposed += min(o.ahead, mb.n_blocks) * copy + n_steps * calls * mb.n_blocks * max(0.0, copy - compute)
    vae = sizes.vae_flops(width, height, frames)
    vae_peak = gpu.tf32_tflops * 1e12 * eff["vae"]
    encode_s, decode_s = vae["encode"] / vae_peak, vae["decode"] / vae_peak
    if o.vae_tile is not None:  # overlapping tiles decode some pixels twice (25% overlap per side)
        encode_s, decode_s = encode_s * 1.5, decode_s * 1.5
    text_s = sizes.text_encoder_flops(2 if max(cfg_high_noise, cfg_low_noise) > 1 else 1) / (
        gpu.bf16_tflops * 1e12 * eff["text"])
    transfers = {"loop_exposed_s": exposed}
    if plan.tier == "swap":
        transfers["swap_s"] = mb.expert / pcie  # at the boundary, nothing to overlap
        transfers["prefetch_exposed_s"] = max(0.0, mb.expert / pcie - decode_s)  # the next request's expert
    if o.text_encoder == "streamed":
        transfers["text_exposed_s"] = max(0.0, mb.text_encoder / pcie - text_s)
    if not o.vae_resident:
        transfers["vae_s"] = 2 * mb.vae / pcie
    total = text_s + encode_s + loop + decode_s + sum(transfers.values())
    return {"text_encode_s": text_s, "vae_encode_s": encode_s, "loop_s": loop, "vae_decode_s": decode_s,
            **transfers, "total_s": total, "forwards": forwards,
            "h2d_gb_per_step": (mb.n_blocks * mb.block * forwards / max(1, steps) / 1e9) if streams_blocks(plan.tier)
            else 0.0, "linear_precision": "fp8" if fp8_compute else "bf16", "efficiency": eff}


# --------------------------------------------------------------------------------------------- planners
def host_available_bytes() -> int | None:
    """MemAvailable (Linux): what this process can still get without swapping."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_plan(model, device: str | torch.device, free_bytes: int | None = None, bucket: str = DEFAULT_BUCKET,
                fp8_at_load: bool = True, host_bytes: int | None = None, requested: str = "auto",
                mmap_ok: bool = False) -> MemoryPlan:
    """The plan for a model already built (weights measured, workspaces from its configs). CPU without
    free_bytes: resident (host memory is the device). The flat overhead applies on CUDA only."""
    device = torch.device(device)
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    cuda = device.type == "cuda"
    mb = ModelBytes.measure(model, overhead=OVERHEAD_BYTES if cuda else 0, host_reserve=HOST_RESERVE_BYTES if cuda else 0)
    if free_bytes is None and requested == "auto":
        return MemoryPlan("resident", 0, None, "host memory", model_parts(bucket=bucket, mb=mb),
                          phase_bytes(mb, "resident", Options(), *_bucket(bucket), fp8_at_load), bucket=bucket)
    return decide(mb, free_bytes, host_bytes, requested, bucket, fp8_at_load, mmap_ok)


def estimate_plan(spec: str, device, dtype, requested: str = "auto", *, fp8: bool = False,
                  warmup: tuple[str, ...] = (), free_bytes: int | None = None, fp8_at_load: bool = False,
                  host_bytes: int | None = None, mmap_ok: bool | None = None, checkpoint_fp8: bool = False,
                  mb: ModelBytes | None = None, mb_mapped: ModelBytes | None = None) -> MemoryPlan:
    """The plan before loading anything (loading both experts onto a 24 GB card would fail first).

    fp8: the experts will be stored in FP8 (compiled backend with fp8 on, or an FP8 checkpoint). warmup: the
    "WxHxF" buckets the worker warms up; the largest sets the activation workspace (default 640x640x81).
    free_bytes: the device's free memory (default: asked from CUDA). host_bytes: host RAM available (default:
    MemAvailable on CUDA; unchecked on CPU). mmap_ok: the experts are safetensors files (default: look). fp8_at_load: the experts reach the device already in FP8 (an FP8
    checkpoint; otherwise both arrive in `dtype` first, as the loaders do). checkpoint_fp8: the files store FP8
    (mmap streams the files' precision)."""
    device = torch.device(device)
    requested = normalize_tier(requested)
    bucket = max(warmup or (DEFAULT_BUCKET,), key=sizes.bucket_tokens)
    if spec == "tiny" or (device.type != "cuda" and free_bytes is None):
        tier = requested if requested != "auto" else "resident"
        return MemoryPlan(tier, 0, None, "requested" if requested != "auto" else "CPU or tiny model",
                          bucket=bucket, requested=requested)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if host_bytes is None and device.type == "cuda":
        host_bytes = host_available_bytes()
    if mmap_ok is None:  # files to map?
        from wanrt.model.loading import checkpoint_info

        mmap_ok = checkpoint_info(spec)["mmap"]
    if mb is None:
        dtype_bytes = torch.tensor([], dtype=dtype).element_size()
        upcast = fp8 and fp8_upcasts(device)
        mb = ModelBytes.from_config(dtype_bytes, fp8, upcast=upcast, load_fp8=fp8_at_load)
        mb_mapped = ModelBytes.from_config(dtype_bytes, checkpoint_fp8, upcast=upcast and checkpoint_fp8,
                                           load_fp8=checkpoint_fp8)
    return decide(mb, free_bytes, host_bytes, requested, bucket, fp8_at_load, mmap_ok, mb_mapped)


def fp8_upcasts(device) -> bool:
    """FP8 weights run weight-only here (one BF16 copy of a linear while it runs): a CUDA GPU without FP8 GEMMs.
    Planning for a CUDA device from a machine without one (tests, `wanrt plan`) assumes FP8 GEMMs."""
    from wanrt.runtime.fp8 import fp8_gemm_supported

    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and not fp8_gemm_supported(device)


def plan_for_card(gpu: gpus.Gpu | str, gpu_memory_gib: float | None = None, host_memory_gib: float | None = None,
                  preset: str = "default", weights: str = "fp8", requested: str = "auto",
                  params: dict | None = None) -> dict:
    """`wanrt plan`: the tier, bytes by part, peak and projected time for a card, host RAM and preset, from the
    byte and FLOP models alone (nothing is loaded). weights: how the experts are stored ("fp8": an FP8
    checkpoint or the compiled backend's FP8; "bf16"). Free memory: the card's memory minus a CUDA context;
    host RAM: all of it is offered (the plan keeps HOST_RESERVE_BYTES for the OS and the process)."""
    from wanrt.runtime import sampler

    if isinstance(gpu, str):
        gpu = gpus.get(gpu)
    gpu_memory_gib = gpu.memory_gib if gpu_memory_gib is None else gpu_memory_gib
    free = int(gpu_memory_gib * GiB) - gpus.CUDA_CONTEXT_BYTES
    host = None if host_memory_gib is None else int(host_memory_gib * GiB)
    req = dict(sizes.PRESETS[preset]) if params is None else dict(params)
    fp8 = weights == "fp8"
    mb = ModelBytes.from_config(2, fp8, upcast=fp8 and not gpu.fp8, load_fp8=fp8)
    bucket = f"{req['width']}x{req['height']}x{req['frames']}"
    cfg = max(req["cfg_high_noise"], req["cfg_low_noise"]) > 1
    plan = decide(mb, free, host, requested, bucket, fp8_at_load=fp8, mmap_ok=True, max_batch=2 if cfg else 1)
    from wanrt.model.components import UNIPC_SCHEDULER_CONFIG

    steps_plan = sampler.plan_steps(sampler.make_scheduler(UNIPC_SCHEDULER_CONFIG), req["steps"], 0.9, 1.0, 1.0)
    steps_high = sum(1 for s in steps_plan if s.expert == "high")
    times = projected_seconds(plan, mb, gpu, steps_high=steps_high, **req)
    tier = plan.tier if plan.tier == "mmap" else "stream"
    cap = capacity_of(max_tokens(mb, tier, STRUCTURES[-1], free, fp8), tier)
    return {"gpu": gpu.as_dict(), "gpu_memory_gib": gpu_memory_gib, "host_memory_gib": host_memory_gib,
            "preset": preset, "request": req, "weights": weights, "steps_high": steps_high,
            "plan": plan.as_dict(), "projected_s": {k: (round(v, 2) if isinstance(v, float) else v)
                                                     for k, v in times.items()},
            "capacity": cap, "plan_obj": plan}


def format_card_plan(r: dict) -> str:
    plan, t, g = r["plan_obj"], r["projected_s"], r["gpu"]
    req = r["request"]
    host = "unknown" if r["host_memory_gib"] is None else f"{r['host_memory_gib']:g} GiB"
    lines = [
        f"{g['name']} ({r['gpu_memory_gib']:g} GiB, FP8 GEMMs: {'yes' if g['fp8'] else 'no'}), host RAM {host}, "
        f"preset {r['preset']} ({req['width']}x{req['height']}x{req['frames']}, {req['steps']} steps, "
        f"cfg {req['cfg_high_noise']:g}/{req['cfg_low_noise']:g}), weights {r['weights']}",
        f"tier: {plan.tier}{'' if plan.fits else ' (DOES NOT FIT)'} - {plan.reason}",
        f"  {plan.describe_options()}",
        "resident bytes on the GPU during the loop:",
        *[f"  {k:<30}{v / GiB:>8.2f} GiB" for k, v in plan.resident_parts().items()],
        "phase peaks:",
        *[f"  {k:<30}{v / GiB:>8.2f} GiB" for k, v in plan.phases.items()],
        f"projected peak: {plan.need_bytes / GiB:.2f} GiB of {plan.free_bytes / GiB:.2f} GiB free; host RAM "
        f"{plan.host_need_bytes / GiB:.1f} GiB",
        f"projected time: {t['total_s']:.0f} s (text {t['text_encode_s']:.1f}, VAE encode {t['vae_encode_s']:.1f}, "
        f"loop {t['loop_s']:.1f} with {t['linear_precision']} linears, VAE decode {t['vae_decode_s']:.1f}, "
        f"copies not hidden {sum(v for k, v in t.items() if k.endswith('_exposed_s') or k in ('swap_s', 'vae_s')):.1f})",
        f"  a projection: FLOP model at assumed efficiencies {ASSUMED_EFFICIENCY} of the dense peaks (nothing "
        f"measured yet), host-to-device at {gpus.PCIE4_X16_BYTES_PER_S / 1e9:.0f} GB/s where not overlapped",
        f"largest request this card runs: {r['capacity']['max_tokens']} tokens (e.g. {r['capacity']['largest_bucket']},"
        f" or 640x640 up to {r['capacity']['max_frames_at_640']} frames)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- expert swap
class ExpertSwapper:
    """Keeps at most one expert on `device`; every expert keeps one host copy (pinned when the device is
    CUDA), made once here. Weights never change, so evicting is dropping the device tensors (`param.data`
    goes back to the host copy) and loading is one copy in; nothing is ever copied back.

    `exclude(module)` -> submodules left alone (block streaming swaps only the stems; its streamers move the
    blocks). `ledger`: counts what is on the device under `part`.

    Build it after any module surgery (the FP8 swap): it holds the experts' tensors as they are now.
    On CUDA a prefetch allocates on the compute stream (so it reuses what the evicted expert freed, in
    stream order), copies on a side stream that first waits for the compute stream, `record_stream`s the
    new tensors to the side stream (never handed out again before the copy ends), and records an event
    that the compute stream waits for before the expert's first forward. On CPU copies are synchronous."""

    def __init__(self, experts: dict[str, torch.nn.Module], device, log: list | None = None, exclude=None,
                 ledger: DeviceLedger | None = None, part: str = "expert"):
        self.experts = experts
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.log = log if log is not None else []
        self.ledger, self.part = ledger, part
        self.copies: Counter = Counter()  # "host": host copies made (once per tensor); "to_device": tensors copied in
        self.seconds: Counter = Counter()  # host-side time in load/prefetch (copies are async on CUDA)
        self.resident: str | None = None
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pending: torch.cuda.Event | None = None
        self._host: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._bytes: dict[str, int] = {}
        for name, module in experts.items():
            tensors = tensors_of(module, exclude(module) if exclude else ())
            # one pinned buffer per expert; drops a device copy, if the expert arrived on the device
            if made := host_copies(tensors, self.cuda):
                self.copies["host"] += made
            pairs = [(t, t.data) for t in tensors]
            self._host[name] = pairs
            self._bytes[name] = nbytes(h for _, h in pairs)
            self.log.append(("host", name))

    def _evict(self, name: str) -> None:
        for t, host in self._host[name]:
            t.data = host
        if self.resident == name:
            self.resident = None
        if self.ledger is not None:
            self.ledger.free(self.part, self._bytes[name])
        self.log.append(("evict", name))

    def _copy_in(self, name: str, side_stream: bool) -> None:
        t0 = time.perf_counter()
        pairs = self._host[name]
        # Allocated on the current (compute) stream: reuses, in stream order, what the evicted expert freed.
        device_copies = [torch.empty(host.shape, dtype=host.dtype, device=self.device) for _, host in pairs]
        if side_stream:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the evicted expert's last use
            with torch.cuda.stream(self._stream):
                for dev, (_, host) in zip(device_copies, pairs, strict=True):
                    dev.copy_(host, non_blocking=True)
                    dev.record_stream(self._stream)
                self._pending = torch.cuda.Event()
                self._pending.record(self._stream)
        else:
            for dev, (_, host) in zip(device_copies, pairs, strict=True):
                dev.copy_(host, non_blocking=self.cuda)  # pinned -> async, ordered before the next kernels
        for dev, (t, _) in zip(device_copies, pairs, strict=True):
            t.data = dev
        self.copies["to_device"] += len(pairs)
        self.resident = name
        if self.ledger is not None:
            self.ledger.place(self.part, self._bytes[name])
        self.seconds["side" if side_stream else "compute"] += time.perf_counter() - t0

    def ensure(self, name: str) -> torch.nn.Module:
        """Make `name` the resident expert (the compute stream waits for a prefetch of it)."""
        if self._pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending)
            self._pending = None
        if self.resident != name:
            if self.resident is not None:
                self._evict(self.resident)
            self._copy_in(name, side_stream=False)
            self.log.append(("load", name))
        return self.experts[name]

    def prefetch(self, name: str) -> None:
        """Start copying `name` to the device on the side stream (evicting the other first)."""
        if self.resident == name:
            return
        if self.resident is not None:
            self._evict(self.resident)
        self._copy_in(name, side_stream=self._stream is not None)
        self.log.append(("prefetch", name))

    def release(self) -> None:
        """Nothing on the device any more (a tier change): every tensor points at its host copy."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None
        if self.resident is not None:
            self._evict(self.resident)


class OffloadingBackend:
    """Wraps any backend built on the same expert modules: swaps experts as the steps need them and, after
    the loop, prefetches the next request's first expert while the VAE decodes. (TieredBackend does this and
    more for the runtime; this small wrapper stays for benchmarks that assemble a swap by hand.)"""

    def __init__(self, inner, swapper: ExpertSwapper, first_expert: str = "high"):
        self.inner, self.swapper, self.first_expert = inner, swapper, first_expert
        self.name = f"{getattr(inner, 'name', 'backend')}+offload"

    def denoise(self, expert: str, latent_input, timestep, context):
        self.swapper.ensure(expert)
        return self.inner.denoise(expert, latent_input, timestep, context)

    def after_loop(self) -> None:
        self.swapper.prefetch(self.first_expert)

    def describe(self) -> dict:
        inner = self.inner.describe() if hasattr(self.inner, "describe") else {"backend": getattr(self.inner, "name", "?")}
        return {**inner, "memory": "offload", "resident": self.swapper.resident}


# --------------------------------------------------------------------------------------------- the runtime tier
class TieredBackend:
    """The memory tier around an inner backend (eager, compiled): places the model as `plan` says, keeps the
    ledger, runs cond and uncond one after the other when a request's batch of 2 would not fit, sets the VAE's
    tiles per request, and moves one tier leaner on demand (`demote`).

    make_inner(tier) -> the inner backend for the model as placed for `tier` (the factory's closure: the
    compiled backend's FP8 swap runs there, before the swapper and streamers take their host copies).
    Not thread-safe: one request at a time (worker concurrency 1) under any tier but resident."""

    def __init__(self, model, device, plan: MemoryPlan, mb: ModelBytes, make_inner, ledger: DeviceLedger | None = None,
                 first_expert: str = "high", can_demote: bool = True, gpu: gpus.Gpu | None = None, on_inner=None):
        self.model, self.device = model, torch.device(device)
        self.plan, self.mb, self.make_inner, self.gpu = plan, mb, make_inner, gpu
        self.on_inner = on_inner  # on_inner(inner): module surgery after the inner backend's (LoRA slots), before host copies
        self.first_expert, self.can_demote = first_expert, can_demote
        self.ledger = ledger or DeviceLedger(plan.free_bytes)
        self.ledger.place("overhead", mb.overhead)
        self.log: list = []
        self.history: list[tuple[str, str]] = []  # (tier, why) for each tier change
        self.stats: Counter = Counter()
        self.inner = None
        self._setup()

    # ------------------------------------------------------------------ placement
    @property
    def tier(self) -> str:
        return self.plan.tier

    @property
    def options(self) -> Options:
        return self.plan.options

    @property
    def name(self) -> str:
        inner = getattr(self.inner, "name", "backend")
        suffix = {"resident": "", "swap": "+offload", "stream": "+stream", "mmap": "+mmap"}[self.tier]
        return inner + suffix

    def _setup(self) -> None:
        model, device, tier, o = self.model, self.device, self.tier, self.options
        self.swapper, self.streamers, self.text_streamer = None, {}, None
        self._placed: list[tuple[str, int]] = []
        self._hooks = []
        self.inner = self.make_inner(tier)  # module surgery (FP8) before any host copy is taken
        if self.on_inner is not None:
            self.on_inner(self.inner)
        engines = getattr(self.inner, "expert_bytes", {})  # TensorRT: engines hold the (released) experts' weights
        if tier == "resident":  # as the surgery left them (the inner backend may run copies: it counts the model's)
            for name, module in model.experts.items():  # a released expert counts 0, a kept one its own bytes too
                self._place(f"expert_{name}", engines.get(name, 0) + module_bytes(module))
        elif engines:  # not resident: one expert's engine loaded at a time (one_expert_at_a_time), the largest
            self._place("expert_engine", max(engines.values()))
        experts = {n: getattr(m, "_orig_mod", m) for n, m in model.experts.items()}
        if tier == "swap":
            self.swapper = ExpertSwapper(experts, device, log=self.log, ledger=self.ledger, part="expert")
        elif streams_blocks(tier):
            self.swapper = ExpertSwapper(experts, device, log=self.log, exclude=lambda m: list(m.blocks),
                                         ledger=self.ledger, part="expert_stem")
            for name, module in experts.items():
                self.streamers[name] = BlockStreamer("expert_blocks", module.blocks, device, self.ledger,
                                                     ahead=o.ahead, wrap=True, pin=tier != "mmap")
        self._setup_text_encoder()
        self._setup_vae()

    def _place(self, part: str, n: int) -> None:
        self.ledger.place(part, n)
        self._placed.append((part, n))

    def _setup_text_encoder(self) -> None:
        te, device = self.model.text_encoder, self.device
        if self.options.text_encoder == "resident":
            if any(t.device != device for t in tensors_of(te)):
                te.to(device)
            self._place("text_encoder", module_bytes(te))
            stem = None
        else:
            blocks = list(te.encoder.block)
            self.text_streamer = BlockStreamer("text_blocks", blocks, device, self.ledger, ahead=self.options.ahead,
                                               wrap=False)
            stem = Shuttle("text_stem", te, device, self.ledger, exclude=blocks)
        mb, ledger = self.mb, self.ledger

        def before(module, args, kwargs):
            after(module, args, kwargs, None)  # a forward that raised (out of memory) left its share behind
            if stem is not None:
                stem.bring()
            ids = args[0] if args else kwargs.get("input_ids")
            batch, length = (ids.shape[0], ids.shape[1]) if ids is not None else (2, mb.text_len)
            module._wanrt_ws = mb.text_ws(batch, length)
            ledger.place("text_workspace", module._wanrt_ws)
            return move_to(args, device), move_to(kwargs, device)  # ids were put where the embedding was

        def after(module, args, kwargs, output):
            ledger.free("text_workspace", getattr(module, "_wanrt_ws", 0))
            module._wanrt_ws = 0
            if stem is not None:
                stem.send_back()
                self.text_streamer.release_all()

        self._hooks.append(te.register_forward_pre_hook(before, with_kwargs=True))
        self._hooks.append(te.register_forward_hook(after, with_kwargs=True))
        self._text_stem = stem

    def _setup_vae(self) -> None:
        vae, device = self.model.vae, self.device
        shuttle = None
        if self.options.vae_resident:
            if any(t.device != device for t in tensors_of(vae)):
                vae.to(device)
            self._place("vae", module_bytes(vae))
        else:
            shuttle = Shuttle("vae", vae, device, self.ledger)
        attach(vae, VaeMemory(self.ledger, shuttle, workspace=self.mb.vae_ws, tile_for=self.vae_tile_for))
        self._vae_shuttle = shuttle

    def _teardown(self) -> None:
        """Every weight back on the host (its host copy) and every hook removed: the state a new tier starts from.
        Also after a request that raised midway (out of memory): visitors sent back, workspaces released."""
        for shuttle in (self._text_stem, self._vae_shuttle):
            if shuttle is not None:
                shuttle.send_back()
        for part, n in list(self.ledger.parts.items()):
            if part.endswith("_workspace") and n:
                self.ledger.free(part, n)
        if getattr(self.model.text_encoder, "_wanrt_ws", 0):
            self.model.text_encoder._wanrt_ws = 0
        for s in self.streamers.values():
            s.close()
        if self.swapper is not None:
            self.swapper.release()
        if self.text_streamer is not None:
            self.text_streamer.close()
        for h in self._hooks:
            h.remove()
        attach(self.model.vae, None)
        for part, n in self._placed:
            self.ledger.free(part, n)
        # Resident parts move to the host (a swapper/streamer/shuttle will pin what it keeps).
        for module in (self.model.text_encoder, self.model.vae, *self.model.experts.values()):
            for t in tensors_of(module):
                if t.device.type != "cpu":
                    t.data = t.data.to("cpu")
        self.swapper, self.streamers, self.text_streamer = None, {}, None

    # ------------------------------------------------------------------ per request
    def _fits(self, phase: str, opts: Options, tokens: int = 1, width: int = 256, height: int = 256) -> bool:
        free = self.plan.free_bytes
        return free is None or phase_bytes(self.mb, self.tier, opts, tokens, width, height)[phase] <= free

    def cfg_batch_for(self, tokens: int) -> int:
        return 2 if self._fits("loop", dataclasses.replace(self.options, cfg_batch=2), tokens) else 1

    def vae_tile_for(self, kind: str, width: int, height: int) -> int | None:
        phase = f"vae_{kind}"
        for tile in (None, *VAE_TILES):
            if self._fits(phase, dataclasses.replace(self.options, vae_tile=tile), width=width, height=height):
                return tile
        return VAE_TILES[-1]

    def fits_request(self, width: int, height: int, frames: int) -> bool:
        lean = dataclasses.replace(self.options, cfg_batch=1)
        return self._fits("loop", lean, request_tokens(width, height, frames))

    def _switch(self, expert: str) -> None:
        if self.swapper is not None:
            self.swapper.ensure(expert)
        for name, streamer in self.streamers.items():
            if name != expert and streamer.live:
                streamer.release_all()  # its wrap-around prefetch: that expert is done for this request

    def settle(self, expert: str) -> None:
        """`expert` in place for its steps (waits for a prefetch in flight) and no block on the device: before
        LoRA buffers are written (a write into a streamed block's device copy is lost when the block is dropped)."""
        self._switch(expert)
        self.release()

    def release(self) -> None:
        """Every streamed block back to its host copy: a loop that ended early (cancelled, failed) left its
        prefetched blocks on the device, where the next request's text and VAE phases were not priced to meet them."""
        for streamer in self.streamers.values():
            streamer.release_all()

    def denoise(self, expert: str, latent_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor):
        self._switch(expert)
        b, _, f, h, w = latent_input.shape
        tokens = f * (h // 2) * (w // 2)
        if b == 2 and self.cfg_batch_for(tokens) == 1:
            self.stats["sequential_cfg_steps"] += 1
            with self.ledger.hold("loop_workspace", self.mb.loop_ws(tokens, 1)):
                outs = [self.inner.denoise(expert, latent_input[i:i + 1], timestep[i:i + 1], context[i:i + 1])
                        for i in range(2)]
            return torch.cat(outs)
        with self.ledger.hold("loop_workspace", self.mb.loop_ws(tokens, b)):
            return self.inner.denoise(expert, latent_input, timestep, context)

    def after_loop(self) -> None:
        if hasattr(self.inner, "after_loop"):
            self.inner.after_loop()
        self.release()
        if self.tier == "swap":
            self.swapper.prefetch(self.first_expert)

    # ------------------------------------------------------------------ tier changes
    def leaner(self) -> MemoryPlan | None:
        """The plan one step leaner on the GPU: the next tier, or within stream/mmap the leanest structure."""
        tokens, w, h = _bucket(self.plan.bucket)
        nxt = GPU_LADDER.get(self.tier)
        if nxt is None:
            if self.options.text_encoder == "streamed" and not self.options.vae_resident and self.options.ahead == 1:
                return None
            nxt, structure = self.tier, dataclasses.replace(STRUCTURES[-1], ahead=1)
        else:
            structure = self.options
        opts, phases = fit_options(self.mb, nxt, structure, tokens, w, h, self.plan.free_bytes)
        if nxt == self.tier:
            opts = dataclasses.replace(opts, ahead=1)
            phases = phase_bytes(self.mb, nxt, opts, tokens, w, h)
        need = max(phases.values())
        free = self.plan.free_bytes
        return MemoryPlan(nxt, need, free, f"one step leaner than {self.tier}", self.plan.parts, phases,
                          free is None or need <= free, opts, host_bytes_needed(self.mb, nxt, opts),
                          self.plan.host_bytes, self.plan.bucket, "auto")

    def demote(self, why: str) -> str | None:
        """Rebuild the placement one step leaner (no reload: weights move to their host copies and are placed
        again). None when there is no leaner step or this backend cannot change (TensorRT engines)."""
        if not self.can_demote:
            return None
        plan = self.leaner()
        if plan is None:
            return None
        if plan.host_bytes is not None and plan.host_need_bytes > plan.host_bytes:
            # the leaner tier's host copies would not fit the RAM measured at start-up: failing the job beats
            # the kernel's OOM killer taking the worker
            log.warning("memory: cannot go %s -> %s (%s): it needs %.1f GiB of host RAM, %.1f available", self.tier,
                        plan.tier, why, plan.host_need_bytes / GiB, plan.host_bytes / GiB)
            return None
        log.warning("memory: %s -> %s (%s)", self.tier, plan.tier, why)
        self._teardown()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self.history.append((plan.tier, why))
        self.plan = plan
        self._setup()
        return plan.tier

    def prepare(self, width: int, height: int, frames: int) -> str | None:
        """Before a request: demote until its loop fits (it would otherwise fail after minutes). Returns the
        new tier, or None when nothing changed."""
        changed = None
        while not self.fits_request(width, height, frames):
            tier = self.demote(f"a {width}x{height}x{frames} request does not fit {self.tier}")
            if tier is None:
                break
            changed = tier
        return changed

    # ------------------------------------------------------------------ reports
    def capacity(self) -> dict:
        """The largest request this runtime can run: its leanest reachable tier's loop limit."""
        tier = self.tier if (not self.can_demote or streams_blocks(self.tier)) else "stream"
        structure = self.options if not self.can_demote else STRUCTURES[-1]
        return capacity_of(max_tokens(self.mb, tier, structure, self.plan.free_bytes), tier)

    def describe(self) -> dict:
        inner = self.inner.describe() if hasattr(self.inner, "describe") else {"backend": getattr(self.inner, "name", "?")}
        out = {**inner, "memory": "offload" if self.tier == "swap" else self.tier, "tier": self.tier,
               "memory_plan": self.plan.as_dict(), "ledger": self.ledger.summary(), "capacity": self.capacity()}
        if self.tier == "swap":
            out["resident"] = self.swapper.resident
        if self.streamers:
            out["streaming"] = {n: s.describe() for n, s in self.streamers.items()}
        if self.history:
            out["tier_changes"] = [{"tier": t, "why": w} for t, w in self.history]
        if self.stats:
            out["memory_stats"] = dict(self.stats)
        return out


def tiered(backend) -> TieredBackend | None:
    """The TieredBackend under any wrappers (ParallelBackend, test doubles with `.inner`)."""
    b = backend
    while b is not None and not isinstance(b, TieredBackend):
        b = getattr(b, "inner", None)
    return b


# --------------------------------------------------------------------------------------------- the worker's calls
def is_out_of_memory(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def worker_memory_info(pipeline) -> dict:
    """For the worker info (`/debug/workers`): the tier, its plan and the capacity the API checks against."""
    t = tiered(pipeline.backend)
    if t is None:
        return {}
    return {"tier": t.tier, "plan": t.plan.as_dict(), "capacity": t.capacity(),
            "projection": projection_for(t.plan, t.mb, t.gpu),
            "tier_changes": [{"tier": tier, "why": why} for tier, why in t.history]}


def run_within_memory(pipeline, params, run):
    """run() -> result under the pipeline's memory tier: first demote if `params` cannot fit the current tier,
    then on an out-of-memory error move one step leaner and run once more; a second out-of-memory (or none
    leaner) propagates (the worker ends the job with error_type out_of_memory). `params`: GenerateParams."""
    t = tiered(pipeline.backend)
    if t is not None:
        t.prepare(params.width, params.height, params.frames_generated)
    try:
        return run()
    except Exception as e:
        if t is None or not is_out_of_memory(e):
            raise
        # the failed run's frames hold its activations (through the traceback, and the errors it was raised
        # from): dropped here, collected below, before the leaner placement and the second run need the memory
        failure = e.with_traceback(None)
        failure.__cause__ = failure.__context__ = None
    gc.collect()
    if t.device.type == "cuda":
        torch.cuda.empty_cache()
    if t.demote(f"out of memory: {str(failure)[:200]}") is None:
        raise failure
    return run()


def projection_for(plan: MemoryPlan, mb: ModelBytes, gpu: gpus.Gpu | None, preset: str = "default") -> dict | None:
    """The projected seconds of a seed preset under this plan on a known card (None for cards not in the table)."""
    if gpu is None:
        return None
    from wanrt.model.components import UNIPC_SCHEDULER_CONFIG
    from wanrt.runtime import sampler

    req = sizes.PRESETS[preset]
    steps = sampler.plan_steps(sampler.make_scheduler(UNIPC_SCHEDULER_CONFIG), req["steps"], 0.9, 1.0, 1.0)
    t = projected_seconds(plan, mb, gpu, steps_high=sum(1 for s in steps if s.expert == "high"), **req)
    return {"gpu": gpu.name, "preset": preset, "total_s": round(t["total_s"], 1), "loop_s": round(t["loop_s"], 1),
            "linears": t["linear_precision"], "efficiency_assumed": t["efficiency"]}


def log_plan(plan: MemoryPlan, mb: ModelBytes | None = None, gpu: gpus.Gpu | None = None) -> None:
    projection = projection_for(plan, mb, gpu) if mb is not None else None
    extra = "" if projection is None else (f"\n  projected (not measured) for the default preset on a {gpu.name}: "
                                          f"{projection['total_s']:.0f} s")
    log.info("memory plan:\n%s%s", plan.table(), extra)

#!/usr/bin/env python3
"""Per-request LoRAs (runtime.lora): what the side path costs and how fast a swap is.

    python benchmarks/bench_lora.py                  # CPU: tiny model, A14B linear shapes at --tokens, A14B swaps
    python benchmarks/bench_lora.py --device cuda    # GPU: BF16, 33,600 tokens, inductor-compiled tiny rows too

Sections (one table each, all in benchmarks/results/bench_lora.json):
1. FLOP model at the real A14B shapes (dim 5120, FFN 13824, 40 layers, 33,600 tokens = 640x640x81, text 512):
   the side path of a linear (in -> out) on T tokens costs 2*T*R*(in + out) FLOPs against the base's 2*T*in*out,
   so per forward  side = 2R * sum_linears T_l (in_l + out_l)
                        = 2R * n_layers * [L (6*2d + 2(d + f)) + Lt (2*2d)]   (+ the head and embedders: ~0)
   and the share of a forward is side / (linear + attention FLOPs), attention from benchmarks/flops.py.
   Also the slot buffers' bytes per expert (A and B at max_rank, BF16; fp32 scales).
2. One linear at each A14B shape (5120x5120, 5120->13824, 13824->5120) on --tokens tokens: the base GEMM, the
   empty slot (eager skip: one Python flag), and the side path alone at rank 16/64/128 (zeros or a LoRA: the
   same work; what a compiled graph runs when no LoRA is loaded) as a share of the base GEMM.
3. A whole expert step (tiny model, real module structure): base, build-time fused, slots empty (skipped),
   side path on zeros and with a LoRA at max_rank 16/64/128.
4. Swaps at the A14B layer count and shapes (slot buffers real size, base weights on the meta device: a swap
   never reads them): first use (prepare: host fp32 -> device dtype), swap to another LoRA (cached), strength
   change (rescale), the same set (skip), clear.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_model  # noqa: E402

RANKS = (16, 64, 128)
A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
TOKENS, TEXT_LEN = 33_600, 512  # 640x640x81: 21 x 40 x 40 latent tokens


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def race(fns: dict, device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best seconds of each fn over `repeats` rounds, the configurations interleaved in every round: on a shared
    machine, noise then hits every configuration alike and the best run is the least disturbed one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[label] = min(best[label], time.perf_counter() - t0)
    return best


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def meta_a14b_expert():
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**A14B)


def tokens_of(name: str) -> int:
    """Tokens a linear of the A14B expert sees in one forward (batch 1)."""
    if ".attn2.to_k" in name or ".attn2.to_v" in name or name.startswith("condition_embedder.text_embedder"):
        return TEXT_LEN
    if name.startswith("condition_embedder."):
        return 1  # timestep embedding
    return TOKENS


# --------------------------------------------------------------------------------------------- 1. FLOPs
def flop_section(ranks) -> dict:
    import torch

    expert = meta_a14b_expert()
    linears = {n: m for n, m in expert.named_modules() if isinstance(m, torch.nn.Linear)}
    fwd = flop_model.forward_flops(81, 640, 640)
    assert fwd.tokens == TOKENS
    d, f, n = 5120, 13824, 40
    rows = []
    for r in ranks:
        side = sum(2 * tokens_of(name) * r * (m.in_features + m.out_features) for name, m in linears.items())
        closed = 2 * r * n * (TOKENS * (6 * 2 * d + 2 * (d + f)) + TEXT_LEN * 2 * 2 * d)
        buf = sum(r * (m.in_features + m.out_features) * 2 + r * 4 + (m.out_features * 2 if m.bias is not None else 0)
                  for m in linears.values())
        rows.append({"rank": r, "side_tflop": side / 1e12, "side_blocks_closed_form_tflop": closed / 1e12,
                     "forward_tflop": fwd.total / 1e12, "share_of_forward_pct": 100 * side / fwd.total,
                     "share_of_linear_pct": 100 * side / fwd.linear, "buffer_gib_per_expert_bf16": buf / 2**30})
    print("\n1. FLOP model, A14B expert forward at 640x640x81 (33,600 tokens), batch 1")
    print("   side = 2R * sum_l T_l (in_l + out_l) = 2R * 40 * [L (12d + 2(d+f)) + Lt * 4d]; "
          f"forward = linear {fwd.linear / 1e12:.0f} + attention {fwd.attention / 1e12:.0f} TFLOP")
    print(f"{'rank':>6}{'side TFLOP':>12}{'closed form':>13}{'% forward':>11}{'% linear':>10}{'slots GiB/expert':>18}")
    for row in rows:
        print(f"{row['rank']:>6}{row['side_tflop']:>12.2f}{row['side_blocks_closed_form_tflop']:>13.2f}"
              f"{row['share_of_forward_pct']:>10.2f}%{row['share_of_linear_pct']:>9.2f}%"
              f"{row['buffer_gib_per_expert_bf16']:>18.2f}")
    return {"linears": len(linears), "rows": rows}


# --------------------------------------------------------------------------------------------- 2. one linear
def linear_section(device, dtype, tokens: int, ranks, repeats: int) -> list[dict]:
    """The side path timed on its own next to the base GEMM (a difference of two noisy large numbers would
    drown it), and the whole LoraLinear for the record."""
    import torch
    import torch.nn.functional as F

    from wanrt.runtime.lora import LoraLinear

    rows = []
    g = torch.Generator().manual_seed(0)
    print(f"\n2. One linear at the A14B shapes, {tokens} tokens, {str(dtype).removeprefix('torch.')}, eager: "
          "side path alone vs the base GEMM (best of the interleaved rounds)")
    print(f"{'shape':>14}{'base ms':>9}{'empty ms':>10}" + "".join(f"{'side r' + str(r):>10}{'+%':>7}{'flop+%':>8}"
                                                              for r in ranks) + f"{'whole r' + str(ranks[-1]):>12}")
    for fin, fout in ((5120, 5120), (5120, 13824), (13824, 5120)):
        fns = _linear_fns(torch.nn.Linear(fin, fout, device=device, dtype=dtype),
                          torch.randn(1, tokens, fin, generator=g).to(device, dtype), ranks, F, LoraLinear)
        with torch.inference_mode():
            best = race(fns, device, repeats)
        t_base = best["base"]
        row = {"in": fin, "out": fout, "tokens": tokens, "base_ms": 1e3 * t_base, "empty_skip_ms": 1e3 * best["empty"],
               f"whole_r{ranks[-1]}_ms": 1e3 * best["whole"]}
        for r in ranks:
            row[f"side_r{r}_ms"] = 1e3 * best[f"side{r}"]
            row[f"side_r{r}_pct"] = 100 * best[f"side{r}"] / t_base
            row[f"r{r}_flop_pct"] = 100 * r * (fin + fout) / (fin * fout)
        rows.append(row)
        print(f"{f'{fin}->{fout}':>14}{row['base_ms']:>9.2f}{row['empty_skip_ms']:>10.2f}" + "".join(
            f"{row[f'side_r{r}_ms']:>10.2f}{row[f'side_r{r}_pct']:>6.1f}%{row[f'r{r}_flop_pct']:>7.1f}%" for r in ranks)
            + f"{row[f'whole_r{ranks[-1]}_ms']:>12.2f}")
        del fns
    return rows


def _linear_fns(base, x, ranks, F, LoraLinear) -> dict:
    empty = LoraLinear(base, max(ranks))
    fns = {"base": lambda: base(x), "empty": lambda: empty(x)}
    for r in ranks:
        m = LoraLinear(base, r)
        m.lora_A.normal_()
        m.lora_B.normal_()
        m.lora_scale.fill_(1e-3)
        m.active = True  # the side path runs, as in a compiled graph

        def side(m=m):  # LoraLinear.forward minus base(x) and the final add
            h = (F.linear(x, m.lora_A).float() * m.lora_scale).to(m.lora_B.dtype)
            return F.linear(h, m.lora_B, m.lora_bias)

        fns[f"side{r}"] = side
    fns["whole"] = lambda: m(x)  # the largest rank, base + side path
    return fns


# --------------------------------------------------------------------------------------------- 3. expert step
def step_section(device, dtype, ranks, repeats: int, compile_: bool, latent=(1, 36, 5, 32, 32)) -> list[dict]:
    import torch

    from wanrt.engine_build.lora import fuse_lora
    from wanrt.model.components import cast_module
    from wanrt.model.tiny import build_tiny_model
    from wanrt.runtime.lora import ExpertLayout, LoraEntry, LoraLinear, LoraNorm, install_lora_slots

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from lora_fixtures import as_format, random_lora  # real key names

    model = build_tiny_model()
    base_expert = cast_module(model.transformer_high, device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*latent, generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    ctx = torch.randn(1, 512, 32, generator=g).to(device, dtype)
    targets = [n for n, m in base_expert.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]

    experts = {"base": (base_expert, {})}
    fused = copy.deepcopy(base_expert)
    fuse_lora(fused, as_format(random_lora(model.transformer_high, rank=16, targets=targets), "comfy"), 1.0)
    experts["fused r16 (build time)"] = (fused, {})
    for r in ranks:
        empty = copy.deepcopy(base_expert)
        install_lora_slots(empty, r, name="high")
        if r == ranks[0]:
            experts["slots, none loaded (eager skip)"] = (empty, {"rank": r})
            empty = copy.deepcopy(empty)
        for m in empty.modules():
            if isinstance(m, (LoraLinear, LoraNorm)):
                m.active = True
        experts[f"side path on zeros r{r}"] = (empty, {"rank": r})
        loaded = copy.deepcopy(base_expert)
        slots = install_lora_slots(loaded, r, name="high")
        sd = as_format(random_lora(model.transformer_high, rank=r, targets=targets), "comfy")
        slots.apply([(LoraEntry.from_state_dict("l", sd, ExpertLayout.of(loaded), r), 1.0, "both")])
        experts[f"LoRA r{r} loaded"] = (loaded, {"rank": r})

    def caller(expert):
        fn = torch.compile(expert, dynamic=False) if compile_ else expert
        return lambda: fn(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    with torch.inference_mode():
        best = race({k: caller(e) for k, (e, _) in experts.items()}, device, repeats, warmup=2 if compile_ else 1)
    rows = [{"config": k, "ms": 1e3 * best[k], **extra} for k, (_, extra) in experts.items()]
    base_ms = rows[0]["ms"]
    tokens = latent[2] * latent[3] * latent[4] // 4
    print(f"\n3. Tiny expert step (dim 32, 2 blocks, {tokens} tokens), {'inductor' if compile_ else 'eager'}: "
          "per-op overhead, not FLOPs, at this size")
    print(f"{'config':<34}{'ms':>9}{'vs base':>9}")
    for row in rows:
        row["vs_base_pct"] = 100 * (row["ms"] - base_ms) / base_ms
        print(f"{row['config']:<34}{row['ms']:>9.3f}{row['vs_base_pct']:>8.1f}%")
    return rows


# --------------------------------------------------------------------------------------------- 4. swaps
def swap_section(device, dtype, rank: int, repeats: int) -> dict:
    import torch

    from wanrt.runtime.lora import LoraEntry, LoraLayer, install_lora_slots

    expert = meta_a14b_expert()
    slots = install_lora_slots(expert, rank, name="high")
    for m in slots.modules.values():  # the slot buffers at full size where the bench runs; the base stays on meta
        for name, buf in list(m.named_buffers(recurse=False)):
            if buf is not None:  # scales stay fp32, the rest in the model dtype
                setattr(m, name, torch.zeros(buf.shape, dtype=torch.float32 if name == "lora_scale" else dtype,
                                             device=device))
    slots._dtypes = None
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, m in slots.linears.items():  # a LoRA on every linear at full rank: the largest swap there is
        layers[name] = LoraLayer(name, down=torch.randn(rank, m.in_features, generator=g, dtype=torch.float32) * 0.01,
                                 up=torch.randn(m.out_features, rank, generator=g, dtype=torch.float32) * 0.01,
                                 alpha=float(rank))
    a = LoraEntry("a", Path("<memory:a>"), 0, 0, "a" * 64, layers={"high": len(layers)})
    a._loader = lambda: layers
    b = dataclasses.replace(a, name="b", sha256="b" * 64)
    moved = sum(m.lora_A.nbytes + m.lora_B.nbytes for m in slots.linears.values())

    def timed(action, loras):
        t0 = time.perf_counter()
        got = slots.apply(loras)
        assert got == action, (got, action)
        return 1e3 * (time.perf_counter() - t0)

    out = {"rank": rank, "linears": len(slots.linears), "norms": len(slots.norms), "bytes_per_swap": moved,
           "buffer_bytes": slots.buffer_bytes()}
    out["first_use_ms"] = timed("swap", [(a, 1.0, "both")])  # prepare (host fp32 -> device dtype) + copy
    timed("swap", [(b, 1.0, "both")])  # prepare b
    swaps, rescales, skips, clears = [], [], [], []
    for _ in range(repeats):  # b is loaded: swap to a, change its strength, ask again, clear, reload b
        swaps.append(timed("swap", [(a, 1.0, "both")]))
        rescales.append(timed("rescale", [(a, 0.5, "both")]))
        skips.append(timed("skip", [(a, 0.5, "both")]))
        clears.append(timed("clear", []))
        timed("swap", [(b, 1.0, "both")])
    out |= {"swap_ms": statistics.median(swaps), "rescale_ms": statistics.median(rescales),
            "skip_ms": statistics.median(skips), "clear_ms": statistics.median(clears)}
    out["swap_gb_per_s"] = moved / (out["swap_ms"] / 1e3) / 1e9
    print(f"\n4. Swaps, one A14B expert ({out['linears']} linears + {out['norms']} norms), rank {rank} on every linear, "
          f"{str(dtype).removeprefix('torch.')} slots ({moved / 2**30:.2f} GiB of A/B rows per swap)")
    print(f"{'first use':>11}{'swap':>9}{'rescale':>9}{'skip':>9}{'clear':>9}   ms (median of {repeats}); "
          f"swap {out['swap_gb_per_s']:.1f} GB/s")
    print(f"{out['first_use_ms']:>11.1f}{out['swap_ms']:>9.1f}{out['rescale_ms']:>9.2f}{out['skip_ms']:>9.3f}"
          f"{out['clear_ms']:>9.1f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens for section 2 (default 256 on CPU, 33600 on GPU)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds per timing (best of)")
    ap.add_argument("--swap-rank", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: flops,linear,step,swap")
    ap.add_argument("--compile", action="store_true", default=None, help="section 3 through inductor (GPU default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_lora.json"))
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    compile_ = gpu if args.compile is None else args.compile
    skip = {s for s in args.skip.split(",") if s}
    result = {"device": device_name(device), "dtype": str(dtype), "torch": torch.__version__, "ranks": list(RANKS)}
    print(f"bench_lora on {result['device']}, torch {torch.__version__}")
    if "flops" not in skip:
        result["flops"] = flop_section(RANKS)
    if "linear" not in skip:
        result["linear"] = linear_section(device, dtype, args.tokens or (TOKENS if gpu else 256), RANKS, args.repeats)
    if "step" not in skip:
        result["step"] = step_section(device, dtype, RANKS, args.repeats, compile_)
    if "swap" not in skip:
        result["swap"] = swap_section(device, torch.bfloat16, args.swap_rank, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

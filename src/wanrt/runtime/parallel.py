"""One video on several GPUs: Ulysses sequence parallelism and CFG parallelism behind the backend interface.

`ParallelBackend(inner)` wraps any backend that runs diffusers `WanTransformer3DModel` experts (eager, compiled,
either behind the offloading wrapper) in a torch.distributed group; the pipeline still calls
`denoise(expert, latent_input, timestep, context)` and never knows.

- Rank 0 runs the pipeline. Each `denoise` broadcasts the call (a pickled header, then the latents, timesteps and
  context) to the other ranks, which wait for it in `follow()`; then every rank runs the same forward.
- Layout per forward: batch 2 (cond + uncond) on an even group is split CFG-parallel (the two halves of the
  group each run one row with Ulysses over half the ranks; the rows are all-gathered once at the end); anything
  else runs Ulysses over the whole group. 40 heads: 2, 4, 5 or 8 ranks (1 x 2/4/5/8 or 2 x 1/2/4).
- Ulysses (as Wan2.2's `wan/distributed/`): hooks on the expert shard the token sequence after patchify (the
  hidden states entering block 0, the RoPE tables, a per-token timestep) and gather the projected output once
  before unpatchify; self-attention is replaced by `UlyssesAttnProcessor` (q/k/v: one all-to-all that scatters
  heads and gathers the sequence; attention; one all-to-all back). Cross-attention stays local: every rank
  holds the whole 512-token text context, so routing it through the all-to-all would be exact but wasted.
- Token counts that do not divide are padded at the end of the sequence; after the all-to-all every rank holds
  the whole sequence for its heads, so the padded keys (and their queries) are cut off before attention: the
  mask, applied by exclusion, which keeps the fused kernels (FlashAttention takes no mask).
- Collectives are functional (`_functional_collectives`), so torch.compile traces them inside the compiled
  backend's graph; gloo runs them on CPU, NCCL on GPU. FP8 linears quantise per token, so sharding tokens
  changes nothing in them.
- Any error inside a distributed section ends this process at once (exit code EXIT_BROKEN): the other ranks
  are then blocked in a collective that can never complete, so the group launcher (wanrt.jobs.group) kills
  the rest and starts the group again; the job, still leased to rank 0, goes back to the queue.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from wanrt.lora_request import request_key
from wanrt.model.sizes import sequence_length
from wanrt.runtime.attention import self_attention_qkv

log = logging.getLogger("wanrt.parallel")

EXIT_BROKEN = 75  # a rank left the group mid-collective (or failed in one): restart the whole group
WAN_A14B_HEADS = 40
MAX_GROUP = 8  # GPUs in one node


class GroupConfigError(ValueError):
    """The group cannot run this model (heads do not divide, backend cannot be split): refused at start-up."""


def valid_group_sizes(heads: int, limit: int = MAX_GROUP) -> list[int]:
    return [n for n in range(2, limit + 1) if heads % n == 0]


def check_group_size(heads: int, world: int) -> None:
    """Ulysses gives each rank heads/world heads (batch-1 steps use the whole group), so world must divide them."""
    if world < 1 or heads % world:
        raise GroupConfigError(
            f"a worker group of {world} ranks cannot split {heads} attention heads (Ulysses gives each rank "
            f"heads/ranks of them); valid group sizes for this model: "
            f"{', '.join(map(str, valid_group_sizes(heads))) or 'none'}")


# ------------------------------------------------------------------------------------------------ sharding
class SeqShard:
    """Which group the current forward splits its tokens over, and how. Read by the hooks and the attention
    processors; set by ParallelBackend around each forward (plain ints and a group, so torch.compile guards on
    them and keeps one graph per layout and shape bucket). degree 1 = not inside a parallel forward: every hook
    passes through, so the experts still run single-process."""

    def __init__(self):
        self.group = None
        self.degree, self.rank, self.seq_len = 1, 0, 0

    @property
    def local_len(self) -> int:
        return -(-self.seq_len // self.degree)

    @property
    def pad(self) -> int:
        return self.local_len * self.degree - self.seq_len

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous chunk of the padded sequence along `dim`."""
        if self.pad:
            shape = list(x.shape)
            shape[dim] = self.pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, self.rank * self.local_len, self.local_len).contiguous()

    # hooks (registered once per expert; pass-through at degree 1)
    def shard_timestep(self, module, args, kwargs):
        t = kwargs.get("timestep")
        if self.degree > 1 and t is not None and t.ndim == 2:  # per-token timesteps (Wan 2.2 TI2V layout)
            kwargs = {**kwargs, "timestep": self.split(t, 1)}
        return args, kwargs

    def shard_rope(self, module, args, output):
        if self.degree == 1:
            return output
        return tuple(self.split(freqs, 1) for freqs in output)  # (1, S, 1, D) cos and sin

    def shard_hidden(self, module, args):
        if self.degree == 1:
            return None
        return (self.split(args[0], 1), *args[1:])  # block 0: (hidden_states, context, temb, rotary_emb)

    def gather_output(self, module, args, output):
        if self.degree == 1:
            return output
        full = funcol.all_gather_single(output.contiguous(), 1, self.group)  # (B, S_pad, C): once per forward
        return full[:, : self.seq_len]


def _seq_to_heads(x: torch.Tensor, shard: SeqShard) -> torch.Tensor:
    """(K, B, L, H, d) local tokens, all heads -> (K, B, S_pad, H/N, d) all tokens, this rank's heads."""
    k, b, n_local, heads, d = x.shape
    n = shard.degree
    x = x.reshape(k, b, n_local, n, heads // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()  # chunk j -> rank j
    x = funcol.all_to_all_single(x, None, None, shard.group)  # chunk j: rank j's tokens of our heads
    return x.permute(1, 2, 0, 3, 4, 5).reshape(k, b, n * n_local, heads // n, d)


def _heads_to_seq(x: torch.Tensor, shard: SeqShard) -> torch.Tensor:
    """(B, S_pad, H/N, d) -> (B, L, H, d): the inverse all-to-all."""
    b, s, h, d = x.shape
    n = shard.degree
    x = x.reshape(b, n, s // n, h, d).permute(1, 0, 2, 3, 4).contiguous()  # chunk j: rank j's tokens
    x = funcol.all_to_all_single(x, None, None, shard.group)  # chunk j: our tokens of rank j's heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h, d)


class UlyssesAttnProcessor:
    """Self-attention over a sequence split across ranks; cross-attention (and degree 1) goes to the processor
    it replaced. QK RMSNorm runs across all heads, so it and RoPE run before the all-to-all, on local tokens."""

    def __init__(self, inner, shard: SeqShard):
        self.inner, self.shard = inner, shard
        self._attention_backend = getattr(inner, "_attention_backend", None)

    # Copied from diffusers 0.42.1 diffusers.models.transformers.transformer_wan.WanAttnProcessor.__call__
    # (self-attention path; the two all-to-alls and the padding cut are ours)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        shard = self.shard
        if shard.degree == 1 or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)

        # one all-to-all for q, k and v together
        query, key, value = _seq_to_heads(torch.stack([query, key, value]), shard).unbind(0)
        n = shard.seq_len  # padded tokens sit at the end: cut them off (= masked keys; their queries are unused)
        out = dispatch_attention_fn(query[:, :n], key[:, :n], value[:, :n], attn_mask=attention_mask, dropout_p=0.0,
                                    is_causal=False, backend=self._attention_backend, parallel_config=None)
        if shard.pad:
            b, _, h, d = out.shape
            out = torch.cat([out, out.new_zeros(b, shard.pad, h, d)], dim=1)
        hidden_states = _heads_to_seq(out, shard).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def expert_modules(backend) -> dict[str, torch.nn.Module]:
    """The expert modules a backend runs (through wrappers with `.inner`, compiled modules' `_orig_mod`)."""
    b = backend
    while not hasattr(b, "experts") and hasattr(b, "inner"):
        b = b.inner
    experts = getattr(b, "experts", None)
    if not isinstance(experts, dict) or not experts:
        raise GroupConfigError(f"the {getattr(backend, 'name', type(backend).__name__)} backend runs no torch "
                               "expert modules to split (TensorRT engines run whole): use eager or compiled")
    out = {}
    for name, module in experts.items():
        module = getattr(module, "_orig_mod", module)
        if not (hasattr(module, "rope") and hasattr(module, "blocks") and hasattr(module, "proj_out")):
            raise GroupConfigError(f"expert {name!r} is not a WanTransformer3DModel ({type(module).__name__})")
        out[name] = module
    return out


def install(module: torch.nn.Module, shard: SeqShard) -> None:
    """Hooks + Ulysses processors on one expert (once)."""
    if getattr(module, "_wanrt_seq_shard", None) is not None:
        raise RuntimeError("this expert is already split by another ParallelBackend")
    module._wanrt_seq_shard = shard
    module.register_forward_pre_hook(shard.shard_timestep, with_kwargs=True)
    module.rope.register_forward_hook(shard.shard_rope)
    module.blocks[0].register_forward_pre_hook(shard.shard_hidden)
    module.proj_out.register_forward_hook(shard.gather_output)
    for block in module.blocks:
        block.attn1.set_processor(UlyssesAttnProcessor(block.attn1.processor, shard))


# ------------------------------------------------------------------------------------------------ backend
class _Layout:
    def __init__(self, name: str, seq_group, degree: int, seq_rank: int, cfg_group=None, half: int = 0):
        self.name, self.seq_group, self.degree, self.seq_rank = name, seq_group, degree, seq_rank
        self.cfg_group, self.half = cfg_group, half


class ParallelBackend:
    """`inner`'s forwards over the default process group (every rank builds the same model and inner backend
    first). Rank 0 calls `denoise` (from the pipeline) and `close`; the other ranks call `follow()`, which
    returns when rank 0 closes. `cfg_parallel`: split even batches (cond + uncond) over the two halves of an even
    group."""

    def __init__(self, inner, device=None, cfg_parallel: bool = True, generation: int = 0):
        if not dist.is_initialized():
            raise RuntimeError("ParallelBackend needs torch.distributed initialised (wanrt.jobs.group does it)")
        self.inner = inner
        self.name = f"{getattr(inner, 'name', 'backend')}+parallel"
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        modules = expert_modules(inner)
        first = next(iter(modules.values()))
        self.heads = int(first.config.num_attention_heads)
        self.patch_size = tuple(first.config.patch_size)
        check_group_size(self.heads, self.world)
        if device is None:
            device = getattr(inner, "device", None) or next(first.parameters()).device
        self.device = torch.device(device)
        self.shard = SeqShard()
        for module in modules.values():
            install(module, self.shard)
        # Every rank creates every subgroup, in the same order (new_group is collective).
        world_group = dist.group.WORLD
        self._plain = _Layout(f"ulysses-{self.world}", world_group, self.world, self.rank)
        self._cfg = None
        if self.world % 2 == 0:
            half_size = self.world // 2
            halves = [dist.new_group(list(range(h * half_size, (h + 1) * half_size))) if half_size > 1 else None
                      for h in range(2)]
            pairs = [dist.new_group([i, i + half_size]) for i in range(half_size)]
            half, i = divmod(self.rank, half_size)
            self._cfg = _Layout(f"cfg-2 x ulysses-{half_size}", halves[half], half_size, i, pairs[i], half)
        self.cfg_parallel = cfg_parallel  # rank 0 may turn it off later (benchmarks, tests); it sends its choice
        self.loras = None  # this rank's LoraSlotGroup (set by wanrt.jobs.group): rank 0's sets are loaded here too
        self._settle_expert: str | None = None  # the expert rank 0 put in place before its LoRA buffers were written
        self.generation = generation
        self._lock = threading.RLock()  # the sampling thread and the keep-alive thread share the group
        self._last_command = time.monotonic()
        self._closed = False
        with self._fatal("start-up"):
            self.ranks = self._gather_rank_info()

    # ---------------------------------------------------------------- rank 0
    @torch.inference_mode()
    def denoise(self, expert: str, latent_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor):
        if self.rank != 0:
            raise RuntimeError("only rank 0 drives the group; the other ranks run follow()")
        with self._lock, self._fatal(f"denoise ({expert})"):
            self._last_command = time.monotonic()
            tensors = [latent_input.contiguous(), timestep.contiguous(), context.contiguous()]
            cfg = self.cfg_parallel and self._cfg is not None and latent_input.shape[0] % 2 == 0
            self._send({"cmd": "denoise", "expert": expert, "cfg": cfg,
                        "tensors": [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]})
            for t in tensors:
                dist.broadcast(t, src=0)
            return self._forward(expert, cfg, *tensors)

    def settle(self, expert: str) -> None:
        """Rank 0, before its LoRA buffers are written (WanI2VPipeline): `expert` in place on this rank (a swap
        tier's prefetch still copying would land over them); send_loras has the other ranks do the same."""
        self._settle_expert = expert
        if hasattr(self.inner, "settle"):
            self.inner.settle(expert)

    def release(self) -> None:
        """Rank 0, after a loop that ended early: its streamed blocks leave the device (the followers run no text or
        VAE phase, and settle before their LoRA writes)."""
        if hasattr(self.inner, "release"):
            self.inner.release()

    def send_loras(self, loras: list[dict] | None) -> None:
        """Rank 0, once its slots hold a request's LoRA set (LoraSlotGroup.on_apply): every rank loads the same
        set into its own slots before the next forward (each computes its share of every layer's heads)."""
        with self._lock, self._fatal("loras"):
            self._last_command = time.monotonic()
            self._send({"cmd": "loras", "loras": loras or [], "settle": self._settle_expert})
            self._settle_expert = None  # each write is preceded by its own settle

    def after_loop(self) -> None:
        """Rank 0, after the last step: every rank's inner backend may prefetch (the offloading wrapper does)."""
        with self._lock, self._fatal("after_loop"):
            self._last_command = time.monotonic()
            self._send({"cmd": "after_loop"})
            if hasattr(self.inner, "after_loop"):
                self.inner.after_loop()

    def close(self) -> None:
        """Rank 0: release the other ranks from follow()."""
        with self._lock:
            if self._closed or self.rank != 0:
                return
            self._closed = True
            with self._fatal("close"):
                self._send({"cmd": "stop"})

    def start_keepalive(self, interval_s: float = 60.0) -> threading.Thread:
        """Rank 0, between jobs: ping the waiting ranks so that their broadcast never reaches the group timeout."""

        def run():
            while not self._closed:
                time.sleep(min(1.0, interval_s / 4))
                if time.monotonic() - self._last_command < interval_s:
                    continue
                with self._lock:
                    if self._closed:
                        return
                    with self._fatal("keep-alive"):
                        self._send({"cmd": "ping"})
                    self._last_command = time.monotonic()

        t = threading.Thread(target=run, name="wanrt-group-keepalive", daemon=True)
        t.start()
        return t

    # ---------------------------------------------------------------- other ranks
    @torch.inference_mode()
    def follow(self) -> int:
        """Run rank 0's forwards until it closes the group; returns how many were run."""
        count = 0
        with self._fatal("follow"):
            while True:
                header = self._receive()
                if header["cmd"] == "stop":
                    return count
                if header["cmd"] == "after_loop" and hasattr(self.inner, "after_loop"):
                    self.inner.after_loop()
                if header["cmd"] == "loras":
                    self._load_loras(header["loras"], header.get("settle"))
                if header["cmd"] != "denoise":
                    continue  # ping, after_loop
                tensors = [torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                           for shape, dtype in header["tensors"]]
                for t in tensors:
                    dist.broadcast(t, src=0)
                self._forward(header["expert"], header["cfg"], *tensors)
                count += 1

    def _load_loras(self, loras: list[dict], settle: str | None = None) -> None:
        if self.loras is None:
            if loras:  # rank 0 has slots and this rank has none: the group would compute a mix
                raise RuntimeError(f"rank {self.rank} has no LoRA slots for rank 0's set")
            return
        key = request_key(loras)
        if self.loras.holds(key):
            return  # (a swap tier moved the buffers since: they are written again, as rank 0's are)
        if self.loras.library is not None:
            self.loras.library.rescan()  # a file rank 0 found since this rank's last look
        if settle is not None and hasattr(self.inner, "settle"):
            self.inner.settle(settle)  # as rank 0 did: no prefetch of this rank's lands over the written buffers
        self.loras.apply_request(None, loras)
        log.info("rank %d: loaded rank 0's LoRA set %s", self.rank, [d["name"] for d in loras] or "(none)")

    # ---------------------------------------------------------------- every rank
    def _forward(self, expert: str, cfg: bool, latent_input: torch.Tensor, timestep: torch.Tensor,
                 context: torch.Tensor):
        layout = self._cfg if cfg else self._plain  # rank 0 chose it: every rank must take the same
        if layout.cfg_group is not None:  # this half's rows: cond on the first half of the group, uncond on the other
            rows = latent_input.shape[0] // 2
            sl = slice(layout.half * rows, (layout.half + 1) * rows)
            latent_input, timestep, context = latent_input[sl], timestep[sl], context[sl]
        with self._sharding(layout, sequence_length(latent_input.shape, self.patch_size)):
            out = self.inner.denoise(expert, latent_input, timestep, context)
        if layout.cfg_group is not None:  # the CFG halves meet once per step
            out = funcol.all_gather_single(out.contiguous(), 0, layout.cfg_group)
        return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out

    @contextmanager
    def _sharding(self, layout: _Layout, seq_len: int):
        s = self.shard
        s.group, s.degree, s.rank, s.seq_len = layout.seq_group, layout.degree, layout.seq_rank, seq_len
        try:
            yield
        finally:
            s.group, s.degree, s.rank, s.seq_len = None, 1, 0, 0

    def _send(self, header: dict) -> None:
        dist.broadcast_object_list([header], src=0, device=self._object_device())

    def _receive(self) -> dict:
        box = [None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def _object_device(self):
        return self.device if dist.get_backend() == "nccl" else None

    def _gather_rank_info(self) -> list[dict]:
        info = [None] * self.world
        dist.all_gather_object(info, {"rank": self.rank, "pid": os.getpid(), "device": str(self.device)})
        return info

    @contextmanager
    def _fatal(self, what: str):
        try:
            yield
        except Exception:
            # The other ranks now wait in a collective this rank will never join: leave, and let the launcher
            # restart the group (rank 0's job stays leased to it and is re-queued).
            log.critical("worker group: %s failed on rank %d of %d; leaving the group", what, self.rank, self.world,
                         exc_info=True)
            for h in logging.getLogger().handlers:
                h.flush()
            sys.stderr.flush()
            os._exit(EXIT_BROKEN)

    def describe(self) -> dict:
        inner = self.inner.describe() if hasattr(self.inner, "describe") else {"backend": getattr(self.inner, "name", "?")}
        layouts = {"batch 1": self._plain.name,
                   "batch 2": (self._cfg if self.cfg_parallel and self._cfg else self._plain).name}
        return {**inner, "backend": f"{inner.get('backend', '?')}+parallel",
                "parallel": {"world": self.world, "heads": self.heads, "layouts": layouts,
                             "generation": self.generation, "ranks": self.ranks}}


# ------------------------------------------------------------------------------------------------ test models
def tiny_model_with_heads(heads: int = 4, head_dim: int = 8, seed: int = 0):
    """The built-in tiny model (model/tiny.py) with experts of `heads` heads, so that 4 (or 8) ranks can split
    them: same config otherwise, same seeds and the same perturbation as build_tiny_model."""
    from diffusers import WanTransformer3DModel

    from wanrt.model.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_model

    model = build_tiny_model(seed)
    config = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": heads, "attention_head_dim": head_dim}
    experts = []
    with torch.device("cpu"):
        for i in (1, 2):
            torch.manual_seed(seed * 1000 + i)
            experts.append(WanTransformer3DModel(**config))
    g = torch.Generator().manual_seed(seed * 1000 + 5)
    for module in experts:
        for p in module.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.transformer_high, model.transformer_low = experts
    model.name = f"tiny-heads{heads}-seed{seed}"
    return model.eval()


def tiny_heads_runtime(settings, heads: int = 4):
    """A runtime like factory.build_runtime's for `tiny_model_with_heads` (resident, no artifacts): a worker
    group factory for tests and benchmarks."""
    from wanrt.runtime.backends import make_backend
    from wanrt.runtime.pipeline import WanI2VPipeline

    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    model = tiny_model_with_heads(heads).to(device, dtype)
    options, backend = {}, settings.resolved_backend()
    if backend == "compiled":
        options = dict(fp8=settings.fp8, attn=settings.attn, compile=settings.compile, cudagraphs=settings.cudagraphs,
                       compile_scope=settings.compile_scope, autotune=settings.autotune)
    return WanI2VPipeline(model, make_backend(backend, model, device=device, **options), device=device,
                          dtype=dtype, vae_dtype=settings.vae_dtype)

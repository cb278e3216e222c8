"""LoRAs at run time: read the formats users have, keep a library of LoRA files, and serve any set of them per
request as low-rank side paths beside base weights that never change.

Reading (shared with `wanrt build`, which imports it from here; formats detected per key):
- diffusers / peft: `transformer.blocks.0.attn1.to_q.lora_A.weight` + `lora_B` (optional `.alpha`; `lora_B.bias`
  is a bias delta scaled like the pair, as PEFT scales lora_B's whole output; without `.alpha` keys, alpha comes
  from a diffusers-saved file's `lora_adapter_metadata` header: lora_alpha, alpha_pattern, use_rslora)
- ComfyUI / kohya: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` + `lora_up` + `.alpha`
- kohya underscored: `lora_unet_blocks_0_self_attn_q.lora_down.weight`; VideoX-Fun `lora_unet__blocks_0_...`;
  SimpleTuner `lycoris_blocks_0_attn1_to_q` (diffusers names)
- original Wan (DiffSynth): `blocks.0.self_attn.q.lora_A.weight` (also `.lora_A.default.weight`, `pipe.dit.`)
- full diffs: `.diff` (weight) and `.diff_b` (bias), as in Lightning / CausVid LoRAs; lightx2v's `blocks.N.diff_m`
  and Kijai's `blocks.N.modulation.diff` are deltas of a block's modulation table (diffusers `scale_shift_table`)
A layer's scale is alpha / rank (1 without alpha). Keys that match no layer are an error that names them (the
build's --allow-unmatched, the server's WANRT_LORA_ALLOW_UNMATCHED skip them with a warning), except keys that
cannot apply to a Wan 2.2 I2V expert: text-encoder keys (`lora_te*`, `text_encoders.`) and Wan 2.1 I2V image
keys (`k_img`, `v_img`, `norm_k_img`, `img_emb`, diffusers' `condition_embedder.image_embedder`), which are
skipped and logged. LoHa / LoKr / DoRA / LoCon-with-lora_mid files are recognised and refused by name.
diffusers' own converter scales the caller's tensors in place and does not report what it matched, so we read
the files ourselves.

Serving (issue 15): every targeted linear becomes `LoraLinear(base)`:
    y = base(x) + ((x A^T) * scale) B^T + bias_delta
with A (max_rank x in), B (out x max_rank), scale (max_rank, fp32) and bias_delta (out) preallocated buffers.
Several LoRAs stack along the rank: each takes its own rows, whose scale entries carry its strength * alpha / rank;
rows nobody uses are zero. A swap is `copy_` into those buffers, so compiled graphs (which read buffers by
address) stay valid and nothing is re-quantised. Affine norms become `LoraNorm(base)` (weight + delta) for the
1-D `.diff` keys of Lightning-style LoRAs. A full 2-D `.diff` on a linear is served as a pair with an identity
factor on its smaller side (rank min(out, in): the 4-step distill LoRAs' `head.head.diff` is rank 64 at A14B), as
diffusers loads it; above max_lora_rank, and for conv LoRAs (`patch_embedding`), only `wanrt build --lora`
(fusion) serves the file and the library says so. Modulation tables (`scale_shift_table`) are Parameters that
diffusers' forward reads directly, so there is no module to wrap: a set's table deltas are written into the
parameter in place (`copy_` of base + sum of strength * diff, the base kept on the host, so a clear gives its
bits back); like the buffers, its address never changes.

No LoRA loaded (the choice, with bench_lora's numbers): eager forwards skip the side path on a per-module Python
flag that is read only outside compiled regions (`torch.compiler.is_compiling()` short-circuits it, so dynamo never
reads or guards it): 0 % (tiny expert step -0.2 %, noise). Compiled graphs always run the side path, on zeros when
nothing is loaded, so there is one graph per shape bucket whatever the LoRA set. That costs its FLOPs: at A14B
(640x640x81) 0.25 / 0.98 / 1.97 % of a forward at max rank 16 / 64 / 128 (0.5 / 2.1 / 4.3 % of the linear FLOPs),
and measured alone on CPU the rank-64 side path is 1.9-2.7 % of its linear's GEMM, its FLOP share. Skipping it
in compiled graphs would need a second graph per bucket (a guard on the flag) or data-dependent control flow.

Slots live in the expert as non-persistent buffers, so they move with it (.to, an ExpertSwapper). A mover may
bring back an older copy (the swapper's host copy never saw a set written while the expert was on the device):
LoraSlots remembers the storage it wrote and rewrites everything when the buffers moved instead of skipping.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from wanrt.lora_request import request_key
from wanrt.model import keymaps

log = logging.getLogger("wanrt.lora")

WAN21_IMAGE_KEYS = ("k_img", "v_img", "norm_k_img", "add_k_proj", "add_v_proj", "norm_added_k", "img_emb",
                    "image_embedder")  # the last: diffusers' condition_embedder.image_embedder (= img_emb)
_WAN21_IMAGE = re.compile(r"(^|[._])(" + "|".join(WAN21_IMAGE_KEYS) + r")([._]|$)")
# Keys for a text encoder (kohya `lora_te*_`, ComfyUI `text_encoders.`, diffusers `text_encoder.`): a Wan LoRA
# trained with its UMT5 carries them; the expert has nothing they could apply to (ComfyUI loads them into the CLIP).
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|text_encoders?(_\d+)?\.)")
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "unet.", "pipe.dit.")
_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.(?P<param>weight|bias)"
    r"|(?P<alpha>alpha)|(?P<diff>diff|diff_b|diff_m))$")
# LyCORIS / PEFT adapters that are not a low-rank pair: recognised so that the refusal names them (ComfyUI's
# weight_adapter reads them; a side path cannot be one, and we do not fuse them either).
_ADAPTER = re.compile(r"\.(?P<kind>hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t[12]|dora_scale"
                      r"|lora_magnitude_vector(?:\.default)?(?:\.weight)?|lora_mid\.weight)$")
# (the kind's prefix, detect_format's name, the name in a refusal)
_ADAPTER_KINDS = (("hada", "loha", "LoHa"), ("lokr", "lokr", "LoKr"), ("lora_mid", "locon-mid", "LoCon (Tucker lora_mid)"),
                  ("dora", "dora", "DoRA"), ("lora_magnitude_vector", "dora", "DoRA"))


def _adapter_kind(key: str) -> tuple[str, str]:
    """(format, label) of an adapter key _ADAPTER matches."""
    kind = _ADAPTER.search(key).group("kind")
    return next((fmt, label) for prefix, fmt, label in _ADAPTER_KINDS if kind.startswith(prefix))


DEFAULT_MAX_RANK = 128
DEFAULT_TARGETS = r".*"  # every linear, affine norm and modulation table: whatever a LoRA file may touch
EXPERT_NAMES = ("high", "low")
# diffusers' modulation tables (Parameters): blocks.N.scale_shift_table (original blocks.N.modulation) and the
# head's scale_shift_table (original head.modulation)
TABLE = "scale_shift_table"
BUILD_UNMATCHED = "`wanrt build --allow-unmatched` skips them"
SERVE_UNMATCHED = "the server skips them with WANRT_LORA_ALLOW_UNMATCHED=1"


class LoraError(ValueError):
    pass


@dataclass
class LoraSpec:
    """One `--lora TARGET:PATH:STRENGTH`; target is high, low or both."""

    target: str
    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        parts = text.split(":")
        if len(parts) < 2 or parts[0] not in ("high", "low", "both"):
            raise LoraError(f"--lora {text!r}: expected high|low|both:PATH[:STRENGTH]")
        strength = 1.0
        path = ":".join(parts[1:])
        if len(parts) >= 3:
            try:
                strength = float(parts[-1])
                path = ":".join(parts[1:-1])
            except ValueError:
                pass
        return cls(parts[0], Path(path), strength)

    def applies_to(self, expert: str) -> bool:
        return self.target in ("both", expert)


@dataclass
class LoraLayer:
    module: str  # diffusers module name, e.g. blocks.0.attn1.to_q (or a modulation table's parameter name)
    down: torch.Tensor | None = None  # A: (r, in)
    up: torch.Tensor | None = None  # B: (out, r)
    alpha: float | None = None
    diff: torch.Tensor | None = None  # full weight delta
    diff_b: torch.Tensor | None = None  # bias delta

    @property
    def scale(self) -> float:
        if self.down is None or self.alpha is None:
            return 1.0
        return self.alpha / self.down.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- key mapping
def _is_layer(module) -> bool:
    """A module a LoRA key can name: it has weights. Norms without affine weights do not count: diffusers' norm2
    is the original norm3 (and back), and only the affine one of the two can carry a `.diff`, so leaving the
    weightless one out keeps the two naming schemes from claiming each other's names."""
    if hasattr(module, "weight_fp8"):  # runtime.fp8.Fp8Linear
        return True
    return getattr(module, "weight", None) is not None


def _is_table(name: str) -> bool:
    return name == TABLE or name.endswith("." + TABLE)


def layer_names(expert) -> list[str]:
    """The expert's layer names as a LoRA names them (wrappers count as their base, their insides do not), and its
    modulation tables (parameters, named like one)."""
    names, wrapped = [], set()
    expert = getattr(expert, "_orig_mod", expert)
    for name, module in expert.named_modules():
        if name.rpartition(".")[0] in wrapped:
            continue
        if isinstance(module, (LoraLinear, LoraNorm)):
            wrapped.add(name)
            names.append(name)
        elif name and _is_layer(module):
            names.append(name)
    return names + [n for n, _ in expert.named_parameters() if _is_table(n)]


def _original_name(name: str) -> str:
    if _is_table(name):  # a parameter: blocks.0.modulation, head.modulation
        return next(iter(keymaps.transformer_to_original({name: None})))
    return next(iter(keymaps.transformer_to_original({f"{name}.weight": None})))[: -len(".weight")]


def _name_table(names: Iterable[str]) -> dict[str, str]:
    """Every name a LoRA may use for a layer -> its diffusers module name."""
    table = {}
    names = list(names)
    for name in names:
        original = _original_name(name)
        table[original] = name
        table[original.replace(".", "_")] = name  # kohya lora_unet_ names
    for name in names:  # SimpleTuner's lycoris_ names: diffusers names underscored (original ones win a clash)
        table.setdefault(name.replace(".", "_"), name)
    table.update({name: name for name in names})  # a module's own name wins over another's original name
    return table


def _module_name_table(expert) -> dict[str, str]:
    if isinstance(expert, ExpertLayout):
        return expert.table
    if isinstance(expert, torch.nn.Module):
        return _name_table(layer_names(expert))
    return _name_table(expert)


def _strip(key: str) -> str:
    if key.startswith("lora_unet__"):  # VideoX-Fun. Copied from ComfyUI (2bffe2f) lora_convert.convert_lora_wan_fun
        key = "lora_unet_" + key[len("lora_unet__"):]
    for p in ("lora_unet_", "lycoris_"):
        if key.startswith(p):
            return key[len(p):]
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _skip_reason(key: str) -> str:
    """Why a skipped key was skipped (the log line and the library's error say so)."""
    if _TEXT_ENCODER.match(key):
        return "text-encoder"
    m = _SUFFIX.match(_strip(key))
    if _WAN21_IMAGE.search(m.group("module") if m else _strip(key)):
        return "Wan 2.1 image"
    return "unmatched"


def describe_skipped(keys: list[str], shown: int = 5) -> str:
    """'3 text-encoder keys, 2 unmatched keys: a, b, c, d, e ...' for a log line or an error."""
    kinds = ", ".join(f"{n} {r} keys" for r, n in Counter(map(_skip_reason, keys)).items())
    return f"{kinds}: {', '.join(keys[:shown])}" + (" ..." if len(keys) > shown else "")


def log_skipped(label: str, keys: list[str]) -> None:
    """The keys a LoRA file had that were left out, in one log line: a warning when some matched nothing (allowed
    by lora_allow_unmatched: the LoRA may not act as its author meant), information for keys of other models."""
    if keys:
        unmatched = any(_skip_reason(k) == "unmatched" for k in keys)
        log.log(logging.WARNING if unmatched else logging.INFO, "LoRA %s: skipped %s", label, describe_skipped(keys))


def _adapter_error(keys: list[str], name: str | None) -> LoraError:
    fmt = " + ".join(dict.fromkeys(_adapter_kind(key)[1] for key in keys))  # each label once, in order
    return LoraError(f"{name or 'this file'} is a {fmt} file ({', '.join(keys[:3])}"
                     f"{' ...' if len(keys) > 3 else ''}): LoHa/LoKr/DoRA and lora_mid adapters are not supported "
                     "(wanrt reads lora_A/lora_B or lora_down/lora_up pairs and .diff deltas); convert it to a "
                     "plain LoRA")


# Copied from peft 0.21 peft.utils.other.get_pattern_key: a pattern names a module by a dotted suffix.
def _pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str | None:
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return None


def adapter_metadata(metadata: dict[str, str] | None) -> dict | None:
    """The transformer's LoRA config from a safetensors header's `lora_adapter_metadata` (diffusers writes it,
    prefixed `transformer.` by a pipeline's save_lora_weights, bare by a model's save_lora_adapter)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise LoraError(f"lora_adapter_metadata in the file header is not JSON: {e}") from None
    if not isinstance(config, dict):
        return None
    if any(k.startswith("transformer.") for k in config):
        config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    return config


def _metadata_alpha(config: dict, module: str, rank: int) -> float | None:
    """alpha such that alpha / rank is PEFT's scaling for `module`: alpha_pattern, else lora_alpha; use_rslora
    scales by alpha / sqrt(r)."""
    patterns = config.get("alpha_pattern") or {}
    key = _pattern_key(patterns, module)
    alpha = patterns[key] if key is not None else config.get("lora_alpha")
    if alpha is None:
        return None
    return float(alpha) * (rank ** 0.5 if config.get("use_rslora") else 1.0)


def read_lora(sd: dict[str, torch.Tensor], expert, allow_unmatched: bool = False,
              metadata: dict[str, str] | None = None, name: str | None = None,
              unmatched_hint: str = BUILD_UNMATCHED) -> tuple[dict[str, LoraLayer], list[str]]:
    """Group a LoRA state dict by the expert's layers (`expert`: the module, an ExpertLayout, or layer names).
    Returns (layers, skipped keys). The caller's tensors are never modified (each layer holds an fp32 copy).
    `metadata`: the file's safetensors header (alpha for diffusers-saved files); `name`: the file, for errors."""
    table = _module_name_table(expert)
    layers: dict[str, LoraLayer] = {}
    unmatched, skipped, adapters, biases = [], [], [], {}
    for key, value in sd.items():
        if _TEXT_ENCODER.match(key):
            skipped.append(key)
            continue
        stripped = _strip(key)
        if _ADAPTER.search(stripped):
            adapters.append(key)
            continue
        m = _SUFFIX.match(stripped)
        if m is None:
            unmatched.append(key)
            continue
        module_key = m.group("module")
        if _WAN21_IMAGE.search(module_key):
            skipped.append(key)
            continue
        if m.group("diff") == "diff_m":  # lightx2v: the modulation delta of block N (or the head), named on it
            module_key += ".modulation"
        module = table.get(module_key) or table.get(module_key.replace(".", "_"))
        if module is None or (m.group("param") == "bias" and m.group("kind") in ("lora_A", "lora_down")):
            unmatched.append(key)
            continue
        layer = layers.setdefault(module, LoraLayer(module))
        # our own copy: the caller's tensors stay untouched (meta stand-ins, from a library scan, stay meta)
        value = value.detach().to("meta" if value.is_meta else "cpu", torch.float32)
        if m.group("param") == "bias":  # PEFT lora_bias: lora_B's bias, scaled with the pair (below)
            biases[module] = value
        elif m.group("kind") in ("lora_A", "lora_down"):
            layer.down = value
        elif m.group("kind") in ("lora_B", "lora_up"):
            layer.up = value
        elif m.group("alpha"):
            layer.alpha = float(value.reshape(-1)[0])
        elif m.group("diff") in ("diff", "diff_m"):
            layer.diff = value
        else:
            layer.diff_b = value
    if adapters:
        raise _adapter_error(adapters, name)
    if unmatched and not allow_unmatched:
        shown = ", ".join(unmatched[:20]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        raise LoraError(f"LoRA keys match no layer of the Wan 2.2 I2V expert: {shown} ({unmatched_hint})")
    for layer in layers.values():
        if (layer.down is None) != (layer.up is None):
            raise LoraError(f"LoRA layer {layer.module} has only one of lora_A/lora_down and lora_B/lora_up")
    config = adapter_metadata(metadata)
    if config is not None and not any(layer.alpha is not None for layer in layers.values()):
        for layer in layers.values():  # no .alpha keys: diffusers keeps alpha in the header
            if layer.down is not None:
                layer.alpha = _metadata_alpha(config, layer.module, layer.rank)
    for module, bias in biases.items():
        layer = layers[module]
        if layer.up is None:
            raise LoraError(f"LoRA layer {module} has lora_B.bias without lora_A/lora_B")
        # PEFT applies the scaling to lora_B's output, its bias included
        delta = bias * layer.scale
        layer.diff_b = delta if layer.diff_b is None else layer.diff_b + delta
    return layers, skipped + (unmatched if allow_unmatched else [])


def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    from wanrt.model.loading import read_state_dict

    return read_state_dict(Path(path), "cpu")


def lora_file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata ({} for other files)."""
    if Path(path).suffix != ".safetensors":
        return {}
    from wanrt.model.loading import safetensors_header

    return dict(safetensors_header(path).get("__metadata__") or {})


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (safetensors.torch.load drops it)."""
    n = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


def detect_format(keys: Iterable[str]) -> str:
    """peft | comfy | kohya | lycoris | wan, '+diff' when full diffs come along, 'diff' for diffs alone; loha,
    lokr, dora, locon-mid for the adapters we refuse."""
    kinds = set()
    for key in keys:
        stripped = _strip(key)
        if _ADAPTER.search(stripped):
            kinds.add(_adapter_kind(stripped)[0])
            continue
        m = _SUFFIX.match(stripped)
        if m is None or _TEXT_ENCODER.match(key):
            continue
        if m.group("diff"):
            kinds.add("diff")
        elif m.group("kind"):
            if key.startswith("lora_unet_"):
                kinds.add("kohya")
            elif key.startswith("lycoris_"):
                kinds.add("lycoris")
            elif m.group("kind") in ("lora_down", "lora_up"):
                kinds.add("comfy")
            elif key.startswith(("transformer.", "base_model.model.", "unet.")):
                kinds.add("peft")
            else:
                kinds.add("wan")
    main = sorted(kinds - {"diff"})
    if not main:
        return "diff" if kinds else "unknown"
    return "+".join(main + (["diff"] if "diff" in kinds else []))


# --------------------------------------------------------------------------------------------- expert layout
@dataclass(frozen=True)
class SlotInfo:
    kind: str  # "linear", "norm" or "table" (a modulation table: a parameter, written in place)
    in_features: int
    out_features: int
    has_bias: bool
    shape: tuple = ()  # a table's shape


def _slot_info(module) -> SlotInfo | None:
    """What a side path on this (unwrapped) module would be, or None when it cannot have one."""
    if isinstance(module, torch.nn.Linear) or hasattr(module, "weight_fp8"):  # nn.Linear or runtime.fp8.Fp8Linear
        return SlotInfo("linear", module.in_features, module.out_features, module.bias is not None)
    if _norm_kind(module) is not None:
        n = module.weight.shape[0]
        return SlotInfo("norm", n, n, getattr(module, "bias", None) is not None)
    return None


def _table_info(param: torch.Tensor) -> SlotInfo:
    return SlotInfo("table", param.numel(), param.numel(), False, tuple(param.shape))


def _norm_kind(module) -> str | None:
    """Norms whose forward LoraNorm reproduces exactly (same functional call, weight + delta)."""
    if getattr(module, "weight", None) is None or module.weight.ndim != 1:
        return None
    if type(module) is torch.nn.RMSNorm:
        return "rms"
    if type(module) is torch.nn.LayerNorm:
        return "layer"
    if type(module).__name__ == "FP32LayerNorm" and isinstance(module, torch.nn.LayerNorm):  # diffusers
        return "fp32layer"
    return None


class ExpertLayout:
    """An expert's layer names (for key mapping) and its side-path slots (name -> SlotInfo), without tensors."""

    def __init__(self, names: list[str], slots: dict[str, SlotInfo]):
        self.names, self.slots = list(names), dict(slots)
        self.table = _name_table(self.names)
        h = hashlib.sha256(repr(sorted((k, tuple(v.__dict__.values())) for k, v in self.slots.items())).encode())
        self.signature = h.hexdigest()[:16]

    @classmethod
    def of(cls, expert: torch.nn.Module, targets: str = DEFAULT_TARGETS) -> "ExpertLayout":
        """Slots: the wrappers already installed, else the modules `install_lora_slots(expert, targets)` would wrap."""
        expert = getattr(expert, "_orig_mod", expert)
        installed = {n: m.info for n, m in expert.named_modules() if isinstance(m, (LoraLinear, LoraNorm))}
        if installed:
            tables = {n: _table_info(expert.get_parameter(n)) for n in getattr(expert, "_lora_tables", ())}
            return cls(layer_names(expert), installed | tables)
        slots = {n: info for n, m in _wrappable(expert, targets) if (info := _slot_info(m)) is not None}
        return cls(layer_names(expert), slots | {n: _table_info(p) for n, p in _tables(expert, targets)})


def _wrappable(expert, targets: str) -> list[tuple[str, torch.nn.Module]]:
    pattern = re.compile(targets)
    return [(n, m) for n, m in expert.named_modules() if n and pattern.search(n) and _slot_info(m) is not None]


def _tables(expert, targets: str) -> list[tuple[str, torch.nn.Parameter]]:
    pattern = re.compile(targets)
    return [(n, p) for n, p in expert.named_parameters() if _is_table(n) and pattern.search(n)]


def fits_shape(shape, target) -> bool:
    """The same shape, or the same but for size-1 dims ((6, dim) for a (1, 6, dim) table): never a transpose or
    another layout of the same element count."""
    return tuple(shape) == tuple(target) or [d for d in shape if d != 1] == [d for d in target if d != 1]


def side_rank(layer: LoraLayer, info: SlotInfo | None) -> int:
    """Rows the layer takes in a side path: its pair's rank, plus min(out, in) for a full .diff on a linear (served
    as a pair with an identity factor on its smaller side)."""
    rank = layer.rank
    if info is not None and info.kind == "linear" and layer.diff is not None and layer.diff.ndim == 2:
        rank += min(layer.diff.shape)
    return rank


def runtime_problems(layers: dict[str, LoraLayer], layout: ExpertLayout, max_rank: int) -> list[str]:
    """Why these layers cannot be served as side paths on this expert ([] when they can): shapes, ranks, kinds."""
    problems = []
    for name, layer in layers.items():
        info = layout.slots.get(name)
        if info is None:
            conv = any(t is not None and t.ndim > 2 for t in (layer.down, layer.diff))
            problems.append(f"{name}: {'a conv LoRA' if conv else 'a LoRA on this layer'} cannot be served per "
                            "request (the serving path has side paths on linears, affine norms and modulation "
                            "tables only); `wanrt build --lora` fuses it")
            continue
        if info.kind == "linear":
            fits = True
            if layer.down is not None:
                a, b = layer.down, layer.up
                if a.ndim != 2 or b.ndim != 2 or a.shape[1] != info.in_features or b.shape[0] != info.out_features \
                        or a.shape[0] != b.shape[1]:
                    fits = False
                    problems.append(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                                    f"layer ({info.out_features} x {info.in_features})")
            if layer.diff is not None and tuple(layer.diff.shape) != (info.out_features, info.in_features):
                fits = False
                problems.append(f"{name}: .diff {tuple(layer.diff.shape)} does not fit the layer "
                                f"({info.out_features} x {info.in_features})")
            rank = side_rank(layer, info)
            if fits and rank > max_rank and layer.diff is not None:
                problems.append(f"{name}: a full-weight .diff on this linear ({info.out_features} x "
                                f"{info.in_features}) is served as a rank-{min(layer.diff.shape)} pair, which needs "
                                f"rank {rank} here, more than max_lora_rank {max_rank} (set WANRT_MAX_LORA_RANK to "
                                f"{rank} or more, or fuse it with `wanrt build --lora`)")
            elif fits and rank > max_rank:
                problems.append(f"{name}: rank {rank} exceeds max_lora_rank {max_rank}")
        else:
            what, shape = ("norm", (info.out_features,)) if info.kind == "norm" else ("modulation table", info.shape)
            if layer.down is not None:
                problems.append(f"{name}: a low-rank pair on a {what}")
            if layer.diff is not None and not (fits_shape(layer.diff.shape, shape) if info.kind == "table"
                                               else tuple(layer.diff.shape) == shape):
                problems.append(f"{name}: .diff {tuple(layer.diff.shape)} does not fit the {what} {shape}")
        if layer.diff_b is not None:
            if not info.has_bias:
                problems.append(f"{name}: .diff_b on a layer without bias")
            elif tuple(layer.diff_b.shape) != (info.out_features,):
                problems.append(f"{name}: .diff_b {tuple(layer.diff_b.shape)} does not fit ({info.out_features},)")
    return problems


# --------------------------------------------------------------------------------------------- side paths
def _not_compiling_and_off(module) -> bool:
    # Order matters: under dynamo is_compiling() is a constant True, so `active` is never read and never guarded.
    return not torch.compiler.is_compiling() and not module.active


# State dicts keep the expert's own key names (`to_q.weight`, not `to_q.base.weight`), so saving, loading and
# comparing experts work the same with slots installed (the side-path buffers are not persistent). Module-level
# functions, not closures: a wrapped expert still pickles.
def _strip_base_keys(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "base.")]:
        state_dict[prefix + k[len(prefix) + len("base."):]] = state_dict.pop(k)


def _add_base_keys(module, state_dict, prefix, *args) -> None:
    for k in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[prefix + "base." + k[len(prefix):]] = state_dict.pop(k)


def _hide_base_in_state_dict(wrapper: torch.nn.Module) -> None:
    wrapper.register_state_dict_post_hook(_strip_base_keys)
    wrapper.register_load_state_dict_pre_hook(_add_base_keys)


class LoraLinear(torch.nn.Module):
    """`base(x) + ((x A^T) * scale) B^T + bias_delta` around an nn.Linear or an Fp8Linear (whose FP8 weights and
    scales stay as they are). Buffers are non-persistent: state_dicts and artifacts never see them."""

    def __init__(self, base: torch.nn.Module, max_rank: int = DEFAULT_MAX_RANK):
        super().__init__()
        info = _slot_info(base)
        if info is None or info.kind != "linear":
            raise LoraError(f"LoraLinear wraps nn.Linear or Fp8Linear, not {type(base).__name__}")
        self.base, self.info, self.max_rank = base, info, max_rank
        self.in_features, self.out_features = info.in_features, info.out_features
        w = base.weight if hasattr(base, "weight") else base.weight_fp8
        dtype = getattr(base, "out_dtype", None) or w.dtype  # Fp8Linear computes in its out_dtype
        kw = dict(dtype=dtype, device=w.device)
        self.register_buffer("lora_A", torch.zeros(max_rank, info.in_features, **kw), persistent=False)
        self.register_buffer("lora_B", torch.zeros(info.out_features, max_rank, **kw), persistent=False)
        # fp32: strength * alpha / rank keeps its digits even when A and B are BF16
        self.register_buffer("lora_scale", torch.zeros(max_rank, dtype=torch.float32, device=w.device), persistent=False)
        self.register_buffer("lora_bias", torch.zeros(info.out_features, **kw) if info.has_bias else None,
                             persistent=False)
        self.active = False  # eager-only switch (see _not_compiling_and_off)
        _hide_base_in_state_dict(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if _not_compiling_and_off(self):
            return y
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        h = (h.float() * self.lora_scale).to(self.lora_B.dtype)
        return y + F.linear(h, self.lora_B, self.lora_bias).to(y.dtype)


class LoraNorm(torch.nn.Module):
    """A RMSNorm / LayerNorm / diffusers FP32LayerNorm with `weight + weight_delta` (and bias + bias_delta): the
    base's own functional call, so with zero deltas it is bit-identical to the base."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.kind = _norm_kind(base)
        if self.kind is None:
            raise LoraError(f"LoraNorm wraps RMSNorm, LayerNorm or FP32LayerNorm with a weight, not {type(base).__name__}")
        self.base, self.info = base, _slot_info(base)
        self.register_buffer("weight_delta", torch.zeros_like(base.weight.data), persistent=False)
        bias = getattr(base, "bias", None)
        self.register_buffer("bias_delta", None if bias is None else torch.zeros_like(bias.data), persistent=False)
        self.active = False
        _hide_base_in_state_dict(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _not_compiling_and_off(self):
            return self.base(x)
        b = self.base
        w = b.weight + self.weight_delta
        bias = None if self.bias_delta is None else b.bias + self.bias_delta
        if self.kind == "rms":
            return F.rms_norm(x, b.normalized_shape, w, b.eps)
        if self.kind == "fp32layer":
            return F.layer_norm(x.float(), b.normalized_shape, w.float(),
                                None if bias is None else bias.float(), b.eps).to(x.dtype)
        return F.layer_norm(x, b.normalized_shape, w, bias, b.eps)


# --------------------------------------------------------------------------------------------- library
@dataclass
class LoraEntry:
    """One file of the library: what it is and whether it can be served; `load()` reads its layers."""

    name: str
    path: Path
    size: int
    mtime_ns: int
    sha256: str = ""
    format: str = ""
    rank: int = 0  # largest side-path rank on one layer: its pair's, plus min(out, in) for a full .diff on a linear
    alphas: list[float] = field(default_factory=list)
    layers: dict[str, int] = field(default_factory=dict)  # expert -> layers touched
    skipped: list[str] = field(default_factory=list)  # text-encoder and Wan 2.1 image keys (and unmatched, if allowed)
    error: str | None = None
    _loader: Callable[[], dict[str, LoraLayer]] | None = field(default=None, repr=False, compare=False)

    @property
    def available(self) -> bool:
        return self.error is None

    @property
    def experts(self) -> list[str]:
        return [e for e, n in self.layers.items() if n]

    def load(self) -> dict[str, LoraLayer]:
        if self.error is not None:
            raise LoraError(f"LoRA {self.name!r} is unavailable: {self.error}")
        if self._loader is None:
            raise LoraError(f"LoRA {self.name!r} has no reader")
        return self._loader()

    def describe(self) -> dict:
        return {"name": self.name, "file": self.path.name, "size": self.size, "sha256": self.sha256,
                "format": self.format, "rank": self.rank, "alpha": sorted(set(self.alphas)) or None,
                "experts": self.experts, "layers": dict(self.layers), "skipped_keys": len(self.skipped),
                "skipped": self.skipped[:5], "available": self.available, "error": self.error}

    @classmethod
    def from_state_dict(cls, name: str, sd: dict[str, torch.Tensor], layout: ExpertLayout,
                        max_rank: int = DEFAULT_MAX_RANK, experts: Iterable[str] = EXPERT_NAMES,
                        metadata: dict[str, str] | None = None, allow_unmatched: bool = False) -> "LoraEntry":
        """An in-memory LoRA (benchmarks, tests): validated like a file; the sha256 is over its tensors."""
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].detach().float().cpu().numpy().tobytes())
        entry = cls(name, Path(f"<memory:{name}>"), 0, 0, h.hexdigest())
        _inspect(entry, sd, {e: layout for e in experts}, max_rank, metadata, allow_unmatched)
        layers = read_lora(sd, layout, allow_unmatched, metadata)[0] if entry.error is None else {}
        entry._loader = lambda: layers
        return entry


def _read_verified(path: Path) -> tuple[bytes, str]:
    with open(path, "rb") as fh:  # read-only: the library never writes a LoRA file
        data = fh.read()
    return data, hashlib.sha256(data).hexdigest()


def _inspect(entry: LoraEntry, sd: dict[str, torch.Tensor], layouts: dict[str, ExpertLayout], max_rank: int,
             metadata: dict[str, str] | None = None, allow_unmatched: bool = False) -> None:
    """Fill format, rank, alphas and per-expert layers of `entry`, or its error."""
    entry.format = detect_format(sd)
    try:
        problems, ranks, alphas = [], set(), []
        for expert, layout in layouts.items():
            layers, skipped = read_lora(sd, layout, allow_unmatched, metadata, entry.path.name, SERVE_UNMATCHED)
            entry.skipped = skipped
            problems += [p for p in runtime_problems(layers, layout, max_rank) if p not in problems]
            entry.layers[expert] = len(layers)
            ranks.update(side_rank(layer, layout.slots.get(n)) for n, layer in layers.items())
            alphas = [layer.alpha for layer in layers.values() if layer.alpha is not None]
        entry.rank, entry.alphas = max(ranks, default=0), alphas
        if problems:
            shown = "; ".join(problems[:5]) + (f" ... ({len(problems)} problems in all)" if len(problems) > 5 else "")
            raise LoraError(shown)
        if not any(entry.layers.values()):
            raise LoraError("touches no layer of the expert" + (f" (skipped {describe_skipped(entry.skipped)})"
                                                                 if entry.skipped else ""))
    except LoraError as e:
        entry.error = str(e)


class LoraLibrary:
    """Every `*.safetensors` file of `directory`, named by file stem, validated against the experts' layouts
    (`layouts`: expert name -> ExpertLayout, e.g. `{n: s.layout for n, s in group.slots.items()}`) at `max_rank`.
    A bad file (unreadable, unmatched keys, a shape or rank that does not fit) gets one warning line and is
    unavailable; the others keep serving. Skipped keys (text encoder, Wan 2.1 image; with `allow_unmatched`, any
    that match no layer) are named in the log. Files are only read. `rescan()` picks up added, removed and
    changed files (by mtime and size; the sha256 is recomputed for a changed file)."""

    def __init__(self, directory: str | Path, layouts: dict[str, ExpertLayout], max_rank: int = DEFAULT_MAX_RANK,
                 scan: bool = True, allow_unmatched: bool = False):
        self.directory = Path(directory)
        self.layouts, self.max_rank, self.allow_unmatched = dict(layouts), max_rank, allow_unmatched
        self.entries: dict[str, LoraEntry] = {}
        self._lock = threading.RLock()
        self._warned_missing = False
        if scan:
            self.rescan()

    def rescan(self) -> dict[str, list[str]]:
        """{'added': [...], 'changed': [...], 'removed': [...]} names since the last scan."""
        with self._lock:
            found = {}
            if self.directory.is_dir():
                for p in sorted(self.directory.glob("*.safetensors")):
                    if p.is_file() and not p.name.startswith("."):
                        found[p.stem] = p
            elif not self._warned_missing:
                self._warned_missing = True
                log.warning("LoRA directory %s does not exist: no LoRAs are served", self.directory)
            changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
            for name in sorted(set(self.entries) - set(found)):
                del self.entries[name]
                changes["removed"].append(name)
                log.info("LoRA %r removed (%s is gone)", name, self.directory / f"{name}.safetensors")
            for name, path in found.items():
                try:
                    st = path.stat()
                except OSError:
                    continue  # removed while scanning: the next scan drops it
                old = self.entries.get(name)
                if old is not None and (old.mtime_ns, old.size) == (st.st_mtime_ns, st.st_size):
                    continue
                self.entries[name] = self._scan_file(name, path, st)
                changes["changed" if old is not None else "added"].append(name)
            return changes

    def _scan_file(self, name: str, path: Path, st) -> LoraEntry:
        """Validate from the header alone (shapes on the meta device; only the scalar alphas are read) and hash
        the file in chunks: a scan costs one sequential read, whatever the LoRA's size."""
        from safetensors import safe_open

        entry = LoraEntry(name, path, st.st_size, st.st_mtime_ns)
        try:
            entry.sha256 = file_sha256(path)
            sd = {}
            with safe_open(str(path), framework="pt") as fh:  # read-only memory map
                metadata = fh.metadata() or {}
                for key in fh.keys():
                    sd[key] = fh.get_tensor(key) if key.endswith(".alpha") else \
                        torch.empty(fh.get_slice(key).get_shape(), device="meta")
        except Exception as e:  # any reader failure makes this one file unavailable, never the library
            entry.error = f"not a readable safetensors file: {type(e).__name__}: {e}"
        else:
            try:
                _inspect(entry, sd, self.layouts, self.max_rank, metadata, self.allow_unmatched)
            except Exception as e:  # a LoRA we do not understand: refused by name, never a crash
                entry.error = f"{type(e).__name__}: {e}"
        if entry.error is None:
            entry._loader = lambda e=entry: self._load(e)
            log.info("LoRA %r: %s, rank %d, layers %s, sha256 %s", name, entry.format, entry.rank, entry.layers,
                     entry.sha256[:12])
            log_skipped(repr(name), entry.skipped)
        else:
            log.warning("LoRA %r (%s) unavailable: %s", name, path, entry.error)
        return entry

    def _load(self, entry: LoraEntry) -> dict[str, LoraLayer]:
        from safetensors.torch import load as st_load

        data, sha = _read_verified(entry.path)
        if sha != entry.sha256:
            raise LoraError(f"LoRA {entry.name!r} changed on disk since it was scanned (sha256 {sha[:12]} != "
                            f"{entry.sha256[:12]}): rescan the library")
        layout = next(iter(self.layouts.values()))
        return read_lora(st_load(data), layout, self.allow_unmatched, _header_metadata(data), entry.path.name,
                         SERVE_UNMATCHED)[0]

    def get(self, name: str) -> LoraEntry:
        """The entry, re-validated first when its file changed (one stat); LoraError when unknown or unavailable."""
        with self._lock:
            entry = self.entries.get(name)
            if entry is not None:
                try:
                    st = entry.path.stat()
                except OSError:
                    self.rescan()
                else:
                    if (st.st_mtime_ns, st.st_size) != (entry.mtime_ns, entry.size):
                        self.rescan()
                entry = self.entries.get(name)
            if entry is None:
                raise LoraError(f"unknown LoRA {name!r} (library {self.directory}: {', '.join(sorted(self.entries))})")
            if not entry.available:
                raise LoraError(f"LoRA {name!r} is unavailable: {entry.error}")
            return entry

    def available(self) -> set[str]:
        with self._lock:
            return {n for n, e in self.entries.items() if e.available}

    def describe(self) -> list[dict]:
        with self._lock:
            return [self.entries[n].describe() for n in sorted(self.entries)]


# --------------------------------------------------------------------------------------------- slots
@dataclass
class PreparedLayer:
    A: torch.Tensor | None  # (r, in), the slot's dtype and device
    B: torch.Tensor | None  # (out, r)
    factor: float | torch.Tensor  # alpha / r (1 without alpha); per row (fp32, host) when a pair and a .diff share A, B
    diff: torch.Tensor | None  # norm weight or modulation table delta, fp32
    diff_b: torch.Tensor | None  # bias delta, fp32


def identity_pair(diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A == diff exactly: the full delta on one side, an identity on the smaller one (rank
    min(out, in)). Copied from diffusers 0.42.1 lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers,
    which loads `head.head.diff` as lora_A under an identity lora_B (out <= in there; the mirror image otherwise)."""
    out, inp = diff.shape
    if out <= inp:
        return diff, torch.eye(out, dtype=diff.dtype, device=diff.device)
    return torch.eye(inp, dtype=diff.dtype, device=diff.device), diff


class PreparedCache:
    """LoRA tensors already converted to a slot set's dtype and device, least recently used dropped past
    `max_bytes`: a swap to a LoRA used recently is device-to-device copies only. Shared by the two experts (same
    layout => one copy of a LoRA applied to both)."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[dict[str, PreparedLayer], int]] = OrderedDict()
        self.hits = self.misses = 0
        self.load_seconds = 0.0

    def get(self, entry: LoraEntry, slots: "LoraSlots") -> dict[str, PreparedLayer]:
        key = (entry.name, entry.sha256, slots.layout.signature, slots.dtype_signature, str(slots.device))
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        t0 = time.perf_counter()
        prepared, nbytes = {}, 0
        for name, layer in entry.load().items():
            module, table = slots.modules.get(name), slots.tables.get(name)
            if module is None and table is None:
                raise LoraError(f"LoRA {entry.name!r} touches {name}, which has no slot on the {slots.expert} expert")
            a = b = None
            factor, diff = layer.scale, layer.diff
            if isinstance(module, LoraLinear):
                pairs = [(layer.down, layer.up, layer.scale)] if layer.down is not None else []
                if diff is not None:  # a full delta on a linear: rows of its own, scale 1
                    pairs.append((*identity_pair(diff), 1.0))
                    diff = None
                if pairs:
                    a = torch.cat([p[0] for p in pairs]).to(slots.device, module.lora_A.dtype)
                    b = torch.cat([p[1] for p in pairs], dim=1).to(slots.device, module.lora_B.dtype)
                    factor = pairs[0][2] if len(pairs) == 1 else \
                        torch.cat([torch.full((p[0].shape[0],), float(p[2])) for p in pairs])
                    nbytes += a.nbytes + b.nbytes
            elif table is not None and diff is not None:
                diff = diff.reshape(table.base.shape)  # (6, dim) for (1, 6, dim): runtime_problems allowed only that
            diff = None if diff is None else diff.to(slots.device)
            diff_b = None if layer.diff_b is None else layer.diff_b.to(slots.device)
            prepared[name] = PreparedLayer(a, b, factor, diff, diff_b)
        self._items[key] = (prepared, nbytes)
        self.misses += 1
        self.load_seconds += time.perf_counter() - t0
        while len(self._items) > 1 and sum(n for _, n in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)
        return prepared

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self._items.values())


@dataclass
class SwapStats:
    swaps: int = 0  # a new set of LoRA rows copied in
    rescales: int = 0  # the same LoRAs at other strengths: only scales and deltas rewritten
    skips: int = 0  # the loaded set again: nothing copied
    clears: int = 0  # back to no LoRA
    seconds: float = 0.0  # in swaps, rescales and clears (synchronised on CUDA)
    last_ms: float = 0.0


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    if not dsts:
        return
    try:
        torch._foreach_copy_(dsts, srcs)  # one launch per chunk of tensors, not one per tensor
    except (RuntimeError, TypeError):  # mixed devices (an expert on the host): tensor by tensor
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s)


def _zero_all(tensors: list[torch.Tensor]) -> None:
    if tensors:
        try:
            torch._foreach_zero_(tensors)
        except (RuntimeError, TypeError):
            for t in tensors:
                t.zero_()


class _Table:
    """A modulation table (`blocks.N.scale_shift_table`, the head's `scale_shift_table`) that LoRAs may change.
    diffusers' forward reads the Parameter itself, so there is no module to wrap: a set's deltas are written into
    it in place (its address never changes: compiled graphs and CUDA graphs keep reading it), and its base stays
    here on the host (6 x dim per block: 4.9 MB per A14B expert in fp32), so a clear gives its bits back."""

    def __init__(self, owner: torch.nn.Module, attr: str):
        self.owner, self.attr = owner, attr
        param = getattr(owner, attr)
        self.base = param.detach().to("meta" if param.is_meta else "cpu", copy=True)

    @property
    def param(self) -> torch.nn.Parameter:  # looked up each time: a mover may replace it (it keeps .data, usually)
        return getattr(self.owner, self.attr)


class LoraSlots:
    """The side-path buffers of one expert and what is loaded in them. `apply(request_loras)` loads a request's
    set, a list of (LoraEntry, strength, expert in high|low|both); entries for the other expert are ignored here,
    [] clears. Every row beyond the loaded ones is zero, so the buffers after loading a set are the same bytes
    whatever was loaded before (order independence is exact). The loaded set's key skips a reload of the same
    set, unless the buffers were moved since (an ExpertSwapper eviction, `.to()`): their storage is checked.
    Modulation tables (`tables`) hold base + the set's deltas in place, the base once nothing is loaded."""

    def __init__(self, expert: str, modules: dict[str, torch.nn.Module], max_rank: int,
                 layout: ExpertLayout, cache: PreparedCache | None = None, tables: dict[str, _Table] | None = None):
        self.expert, self.modules, self.max_rank, self.layout = expert, modules, max_rank, layout
        self.tables = dict(tables or {})
        self._tables_written = False  # a table ever held a delta: a moved expert may bring an older one back
        self.cache = cache if cache is not None else PreparedCache()
        self.stats = SwapStats()
        self.linears = {n: m for n, m in modules.items() if isinstance(m, LoraLinear)}
        self.norms = {n: m for n, m in modules.items() if isinstance(m, LoraNorm)}
        self._rows = dict.fromkeys(self.linears, 0)  # rows in use per linear (the rest are zero)
        self._dirty: set[str] = set()  # slots with non-zero bias / norm deltas
        self._key: tuple | None = ()  # the loaded set: () none, None unknown
        self._anchor: torch.Tensor | None = None
        self._dtypes: str | None = None

    # The first buffer's storage stands for the expert's: movers (ExpertSwapper, .to) replace them all together.
    # Holding it keeps the address from being reused, so a moved expert never looks unmoved.
    def _first_buffer(self) -> torch.Tensor | None:
        for m in self.modules.values():
            return m.lora_scale if isinstance(m, LoraLinear) else m.weight_delta
        return None

    def _unmoved(self) -> bool:
        t = self._first_buffer()
        return t is None or (self._anchor is not None and t.device == self._anchor.device
                             and t.data_ptr() == self._anchor.data_ptr())

    @property
    def device(self) -> torch.device:
        t = self._first_buffer()
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype_signature(self) -> str:
        if self._dtypes is None:  # the buffers' dtypes are fixed at install (a later .to(dtype) is not supported)
            self._dtypes = ",".join(sorted({str(b.dtype) for m in self.modules.values() for b in m.buffers(recurse=False)}))
        return self._dtypes

    @property
    def loaded(self) -> tuple | None:
        return self._key

    def _mine(self, request_loras) -> list[tuple[LoraEntry, float]]:
        out = []
        for entry, strength, expert in request_loras:
            if expert not in ("both", "high", "low"):
                raise LoraError(f"expert must be high, low or both, not {expert!r}")
            if expert in ("both", self.expert):
                if entry.layers and not entry.layers.get(self.expert):
                    raise LoraError(f"LoRA {entry.name!r} touches no layer of the {self.expert} expert")
                out.append((entry, float(strength)))
        return out

    def check(self, request_loras) -> list[tuple[dict[str, PreparedLayer], float]]:
        """The request's LoRAs for this expert, prepared; LoraError when they do not fit (nothing written)."""
        prepared = [(self.cache.get(e, self), s) for e, s in self._mine(request_loras)]
        for name in self.linears:
            total = sum(p[name].A.shape[0] for p, _ in prepared if name in p and p[name].A is not None)
            if total > self.max_rank:
                raise LoraError(f"the LoRAs of this request need rank {total} on {self.expert}:{name}, more than "
                                f"max_lora_rank {self.max_rank}")
        return prepared

    @torch.no_grad()
    def apply(self, request_loras) -> str:
        """'skip' | 'rescale' | 'swap' | 'clear'. LoraError (buffers untouched) when the set does not fit."""
        key = tuple((e.name, e.sha256, s) for e, s in self._mine(request_loras))
        unmoved = self._unmoved()
        if key == self._key and unmoved:
            self.stats.skips += 1
            return "skip"
        t0 = time.perf_counter()
        prepared = self.check(request_loras)
        # Same LoRAs in the same order, buffers where we wrote them: same rows, only scales and deltas change.
        rescale = bool(key) and unmoved and self._key is not None and [k[:2] for k in key] == [k[:2] for k in self._key]
        dsts, srcs, zeros, rows, dirty = [], [], [], {}, set()
        if not unmoved:  # moved buffers may hold any older set (a stale host copy): rewrite every row
            zeros = [b for m in self.modules.values() for n, b in m.named_buffers(recurse=False) if n != "lora_scale"]
        scales = torch.zeros(len(self.linears), self.max_rank, dtype=torch.float32)
        for i, (name, module) in enumerate(self.linears.items()):
            off = 0
            for p, s in prepared:
                layer = p.get(name)
                if layer is None or layer.A is None:
                    continue
                r = layer.A.shape[0]
                scales[i, off:off + r] = s * layer.factor
                if not rescale:
                    dsts += [module.lora_A[off:off + r], module.lora_B[:, off:off + r]]
                    srcs += [layer.A, layer.B]
                off += r
            if unmoved and not rescale and self._rows[name] > off:  # rows the last set used and this one does not
                zeros += [module.lora_A[off:self._rows[name]], module.lora_B[:, off:self._rows[name]]]
            rows[name] = off
        for name, module in self.modules.items():  # bias and norm deltas: sum of strength * delta, in fp32
            targets = [("lora_bias", "diff_b")] if isinstance(module, LoraLinear) else \
                [("weight_delta", "diff"), ("bias_delta", "diff_b")]
            for buf_name, attr in targets:
                buf = getattr(module, buf_name)
                parts = [(s, getattr(p[name], attr)) for p, s in prepared
                         if name in p and getattr(p[name], attr) is not None]
                if buf is None:
                    continue
                if parts:
                    dsts.append(buf)
                    srcs.append(sum(s * d.to(buf.device, torch.float32) for s, d in parts).to(buf.dtype))
                    dirty.add(name)
                elif unmoved and name in self._dirty:
                    zeros.append(buf)
        for name, table in self.tables.items():  # modulation tables: base + sum of strength * delta, in place
            param = table.param
            parts = [(s, p[name].diff) for p, s in prepared if name in p and p[name].diff is not None]
            if parts:
                dsts.append(param.data)
                srcs.append((table.base.to(param.device, torch.float32)
                             + sum(s * d.to(param.device, torch.float32) for s, d in parts)).to(param.dtype))
                dirty.add(name)
                self._tables_written = True
            elif name in self._dirty or (self._tables_written and not unmoved):
                dsts.append(param.data)
                srcs.append(table.base.to(param.device))  # the base's own bits
        dsts += [m.lora_scale for m in self.linears.values()]
        srcs += list(scales.to(self.device).unbind(0))  # one host-to-device copy for every scale vector
        _zero_all(zeros)
        _copy_all(dsts, srcs)
        for name, module in self.linears.items():
            module.active = rows[name] > 0 or name in dirty
        for name, module in self.norms.items():
            module.active = name in dirty
        self._rows, self._dirty, self._key = rows, dirty, key
        first = self._first_buffer()
        self._anchor = None if first is None else first.data
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest seconds: the copies are asynchronous
        dt = time.perf_counter() - t0
        self.stats.seconds += dt
        self.stats.last_ms = dt * 1e3
        if not key:
            self.stats.clears += 1
            return "clear"
        if rescale:
            self.stats.rescales += 1
            return "rescale"
        self.stats.swaps += 1
        return "swap"

    def clear(self) -> str:
        return self.apply([])

    def buffer_bytes(self) -> int:
        return sum(b.nbytes for m in self.modules.values() for b in m.buffers(recurse=False))

    def describe(self) -> dict:
        s = self.stats
        return {"expert": self.expert, "max_rank": self.max_rank, "linears": len(self.linears),
                "norms": len(self.norms), "tables": len(self.tables), "buffer_bytes": self.buffer_bytes(),
                "loaded": [{"name": n, "sha256": h, "strength": st} for n, h, st in (self._key or ())],
                "swaps": s.swaps, "rescales": s.rescales, "skips": s.skips, "clears": s.clears,
                "swap_seconds": round(s.seconds, 6), "last_swap_ms": round(s.last_ms, 3)}


def install_lora_slots(expert: torch.nn.Module, max_rank: int = DEFAULT_MAX_RANK, targets: str = DEFAULT_TARGETS,
                       name: str = "high", cache: PreparedCache | None = None) -> LoraSlots:
    """Wrap every linear (nn.Linear or Fp8Linear) and affine norm of `expert` whose name matches `targets` in
    place, with zeroed buffers where the layer is, and take the base of each matching modulation table. Call it
    after the FP8 swap, before the ExpertSwapper is built and before the first compiled forward (a later change of
    modules would recompile). A torch.compile'd module is unwrapped (its `_orig_mod` is what runs)."""
    if max_rank < 1:
        raise LoraError("max_lora_rank must be at least 1 (0: install no slots)")
    expert = getattr(expert, "_orig_mod", expert)
    if any(isinstance(m, (LoraLinear, LoraNorm)) for m in expert.modules()) or getattr(expert, "_lora_tables", ()):
        raise LoraError(f"LoRA slots are already installed on the {name} expert")
    modules = {}
    for module_name, module in _wrappable(expert, targets):
        parent_name, _, child = module_name.rpartition(".")
        parent = expert.get_submodule(parent_name) if parent_name else expert
        info = _slot_info(module)
        wrapper = LoraLinear(module, max_rank) if info.kind == "linear" else LoraNorm(module)
        setattr(parent, child, wrapper)
        modules[module_name] = wrapper
    tables = {}
    for table_name, _ in _tables(expert, targets):
        owner, _, attr = table_name.rpartition(".")
        tables[table_name] = _Table(expert.get_submodule(owner) if owner else expert, attr)
    expert._lora_tables = tuple(tables)  # ExpertLayout.of finds them (a parameter has no wrapper to look for)
    layout = ExpertLayout(layer_names(expert), {n: m.info for n, m in modules.items()}
                          | {n: _table_info(t.param) for n, t in tables.items()})
    return LoraSlots(name, modules, max_rank, layout, cache, tables)


class LoraSlotGroup:
    """Both experts' slots, one prepared-tensor cache, and the library they serve (`library`, may be None).
    `apply_request(library, parsed)` takes a request's `loras` as wanrt.lora_request.parse_loras returns them;
    `loaded_key` is what pick_next compares. `using(loras)` is the way for jobs that may run concurrently on
    the same experts (a worker's concurrency slots): jobs of one set share the loaded buffers, a job of another
    set waits until they are done, and newcomers of the loaded set queue behind a waiting switch."""

    def __init__(self, slots: dict[str, LoraSlots], library: LoraLibrary | None = None):
        self.slots = dict(slots)
        self.library = library
        self.loaded_key: str | None = ""  # request_key of the loaded set; None after a failed apply
        self._cond = threading.Condition()
        self._users = 0  # jobs running on the loaded set
        self._switching = 0  # jobs waiting to load another set
        # after each successful apply_request(loras): a worker group's rank 0 sends the set to the other ranks
        self.on_apply: Callable[[list[dict] | None], None] | None = None

    @classmethod
    def install(cls, experts: dict[str, torch.nn.Module], max_rank: int = DEFAULT_MAX_RANK,
                targets: str = DEFAULT_TARGETS, cache_bytes: int = 2 << 30,
                lora_dir: str | Path | None = None, allow_unmatched: bool = False) -> "LoraSlotGroup":
        """Slots on every expert (see install_lora_slots) and, with `lora_dir`, the library of that directory.
        allow_unmatched: the library skips keys that match no layer (the lora_allow_unmatched setting)."""
        cache = PreparedCache(cache_bytes)
        group = cls({n: install_lora_slots(e, max_rank, targets, n, cache) for n, e in experts.items()})
        if lora_dir is not None:
            group.library = LoraLibrary(lora_dir, group.layouts, max_rank, allow_unmatched=allow_unmatched)
        return group

    @property
    def layouts(self) -> dict[str, ExpertLayout]:
        return {n: s.layout for n, s in self.slots.items()}

    def apply(self, request_loras) -> dict[str, str]:
        """Each expert's action. LoraError when the set does not fit either expert: nothing is written then.
        On any error the loaded key is forgotten, so the next apply rewrites whatever it is (a write that failed
        midway left some buffers of the new set beside the old: a later request of the old set must not skip)."""
        try:
            for s in self.slots.values():  # every expert checked before any is written
                s.check(request_loras)
            return {n: s.apply(request_loras) for n, s in self.slots.items()}
        except BaseException:
            self.loaded_key = None
            for s in self.slots.values():  # and taken as moved: the next apply zeroes every buffer and table
                s._key = s._anchor = None
            raise

    def holds(self, key: str) -> bool:
        """The set of request_key `key` is in the buffers as they are now (none moved since it was written)."""
        return self.loaded_key == key and all(s._unmoved() for s in self.slots.values())

    def apply_request(self, library: LoraLibrary | None, loras: list[dict] | None) -> dict[str, str]:
        library = library if library is not None else self.library
        if loras and library is None:
            raise LoraError("this runtime has no LoRA library (set a LoRA directory)")
        resolved = [(library.get(d["name"]), d.get("strength", 1.0), d.get("expert", "both")) for d in loras or []]
        actions = self.apply(resolved)
        self.loaded_key = request_key(loras)
        if self.on_apply is not None:
            self.on_apply(loras)
        return actions

    @contextlib.contextmanager
    def using(self, loras: list[dict] | None, should_cancel: Callable[[], bool] | None = None,
              before_apply: Callable[[], None] | None = None, poll_s: float = 0.05):
        """Hold the request's set loaded for the `with` body (the denoising loop). `before_apply` runs right
        before buffers are written (with an ExpertSwapper: `swapper.ensure(first expert)`, so a prefetch still
        copying cannot land over them). Raises sampler.Cancelled if `should_cancel()` while waiting."""
        from wanrt.runtime.sampler import Cancelled

        key = request_key(loras)
        with self._cond:
            counted = False  # this job waits to switch sets (newcomers of the loaded set queue behind it)
            try:
                while True:
                    others = self._switching - counted  # other jobs waiting to switch sets: they go first
                    if self._users == 0 and (counted or others == 0):
                        break
                    if self._users and self.loaded_key == key and others == 0:
                        break
                    if self.loaded_key != key and not counted:
                        counted = True
                        self._switching += 1
                    if should_cancel is not None and should_cancel():
                        raise Cancelled()
                    self._cond.wait(poll_s)
                if not self._users:  # nobody runs on the buffers: load (a skip when loaded and unmoved)
                    if before_apply is not None:
                        before_apply()
                    self.apply_request(None, loras)
            finally:
                if counted:
                    self._switching -= 1
                    self._cond.notify_all()
            self._users += 1
        try:
            yield self
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def describe(self) -> dict:
        first = next(iter(self.slots.values()), None)
        cache = first.cache if first is not None else None
        return {"loaded_key": self.loaded_key, "experts": {n: s.describe() for n, s in self.slots.items()},
                "cache": None if cache is None else {"bytes": cache.nbytes, "hits": cache.hits, "misses": cache.misses,
                                                     "load_seconds": round(cache.load_seconds, 6)},
                "library": None if self.library is None else self.library.describe()}

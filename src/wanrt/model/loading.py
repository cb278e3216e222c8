"""Load (and save) WAN 2.2 I2V models in the layouts users have.

- `tiny`: the built-in random model (model/tiny.py).
- `random-full`: full-size random weights built straight on the target device (GPU benchmarks).
- a diffusers directory (Wan-AI/Wan2.2-I2V-A14B-Diffusers): transformer/, transformer_2/, vae/,
  text_encoder/, tokenizer/, scheduler/, model_index.json.
- a directory of single files, ComfyUI style (wan2.2_i2v_high_noise_14B_*.safetensors,
  ..._low_noise_14B_*, wan_2.1_vae.safetensors, umt5_xxl_*.safetensors, fp16 or fp8_scaled) or the
  original Wan2.2 repo (high_noise_model/, low_noise_model/, Wan2.1_VAE.pth,
  models_t5_umt5-xxl-enc-bf16.pth), plus a tokenizer/ (or google/umt5-xxl/) directory.

Each expert (and the text encoder) is built on the meta device, then read onto its device one tensor at a time
and converted there: host RAM never holds both experts, and the device never holds a file beside its converted
copy (an fp16 or fp8 expert loaded as bf16).

Two options serve the small-card memory tiers (runtime/memory.py):
- `keep_fp8`: FP8 checkpoints (ComfyUI's fp8_scaled) stay FP8: each linear keeps its e4m3 weight and gets a
  `weight_scale` buffer (the runtime turns them into Fp8Linear layers), so an expert is 14 GB in RAM, not 28.6.
- `mmap`: the experts' safetensors files are memory-mapped and their tensors are views of the mapping (file pages
  the OS reads on first touch and may drop again), not copies in RAM. Tensors the loader must convert (another
  dtype, the fp32 modules) are copied; an FP8 or BF16 file in its own precision is not.
- `defer_cast` (with `mmap`): the blocks' matrices stay views in the file's own precision (FP32 or BF16), for
  the runtime's FP8 swap to read one layer at a time; `cast_deferred` casts what it leaves. The rest is cast as
  usual. The host then never holds an expert in the load dtype.
"""

from __future__ import annotations

import json
import mmap as _mmap
import struct
from pathlib import Path

import torch

from wanrt.model import keymaps
from wanrt.model.components import I2V_BOUNDARY_RATIO, UNIPC_SCHEDULER_CONFIG, WanI2VModel, cast_module

# Wan2.2 I2V A14B expert (both experts share it); verified against Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py
WAN22_I2V_A14B_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
UMT5_XXL_CONFIG = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
)
ARCH_FILE = "wanrt_arch.json"  # optional: architecture of non-standard (e.g. tiny) single-file models


class ModelLoadError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- entry point
def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
               keep_fp8: bool = False, mmap: bool = False, defer_cast: bool = False) -> WanI2VModel:
    """keep_fp8, mmap, defer_cast: see the module docstring (single files and diffusers directories; ignored for
    tiny and random-full, which have no files)."""
    if spec == "tiny":
        from wanrt.model.tiny import build_tiny_model

        return build_tiny_model().to(device, dtype).eval()
    if spec == "random-full":
        return build_random_full(device, dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (use 'tiny', 'random-full' or a directory)")
    if (path / "transformer").is_dir() and (path / "transformer_2").is_dir():
        return load_diffusers_dir(path, device, dtype, mmap=mmap, defer_cast=defer_cast)
    if path.is_dir():
        return load_single_files(path, device, dtype, keep_fp8=keep_fp8, mmap=mmap, defer_cast=defer_cast)
    raise ModelLoadError(f"{path} is neither a diffusers directory nor a directory of single files")


def expert_files(spec: str) -> list[Path]:
    """The experts' safetensors files of a model spec ([] for tiny, random-full or .pth checkpoints)."""
    path = Path(spec).expanduser()
    if spec in ("tiny", "random-full") or not path.is_dir():
        return []
    if (path / "transformer").is_dir() and (path / "transformer_2").is_dir():
        return sorted((path / "transformer").glob("*.safetensors")) + sorted((path / "transformer_2").glob("*.safetensors"))
    try:
        files = find_single_files(path)
    except ModelLoadError:
        return []
    out = []
    for name in ("high", "low"):
        f = files[name]
        out += sorted(f.glob("*.safetensors")) if f.is_dir() else ([f] if f.suffix == ".safetensors" else [])
    return out


def checkpoint_info(spec: str) -> dict:
    """What the memory planner needs to know about a checkpoint before loading it (headers only): whether both
    experts are safetensors files (they can be memory-mapped) and whether their linears are stored in FP8."""
    files = expert_files(spec)
    fp8, matrices = False, set()
    for f in files:
        header = safetensors_header(f)
        fp8 = fp8 or any(isinstance(v, dict) and v.get("dtype") == "F8_E4M3" for v in header.values())
        matrices |= {v.get("dtype") for k, v in header.items()
                     if isinstance(v, dict) and len(v.get("shape", ())) == 2 and "blocks." in k}
    # weights_dtype: the one torch dtype of the blocks' matrices (what the FP8 swap quantises; diffusers keeps the
    # time embedder's in fp32), FP8 aside; None: mixed, or no files
    stored = {_ST_DTYPES.get(d) for d in matrices - {"F8_E4M3"}}
    return {"mmap": bool(files), "fp8": fp8, "files": [str(f) for f in files],
            "weights_dtype": stored.pop() if len(stored) == 1 else None}


# --------------------------------------------------------------------------------------------- diffusers
def load_diffusers_dir(path: Path, device="cpu", dtype=torch.float32, mmap: bool = False,
                       defer_cast: bool = False) -> WanI2VModel:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    path = Path(path)
    kw = {"device_map": str(device)} if str(device).startswith("cuda") else {}
    index = _read_json(path / "model_index.json")
    sched = _read_json(path / "scheduler" / "scheduler_config.json") or dict(UNIPC_SCHEDULER_CONFIG)
    model = WanI2VModel(
        transformer_high=WanTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=dtype, **kw),
        transformer_low=WanTransformer3DModel.from_pretrained(path / "transformer_2", torch_dtype=dtype, **kw),
        vae=AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32, **kw),
        text_encoder=UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        scheduler_config=sched,
        boundary_ratio=float(index.get("boundary_ratio") or I2V_BOUNDARY_RATIO),
        name=path.name,
    ) if not mmap else None
    if mmap:  # experts as views of their mapped shards (diffusers keys already), the rest as usual
        from wanrt.model.components import WanI2VModel as Model

        def expert(sub):
            return _assign(WanTransformer3DModel, _diffusers_config(path / sub), read_state_dict(path / sub, mmap=True),
                           "cpu", dtype, f"expert {path / sub}", defer_cast=defer_cast)

        model = Model(
            transformer_high=expert("transformer"), transformer_low=expert("transformer_2"),
            vae=AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32),
            text_encoder=UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype),
            tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"), scheduler_config=sched,
            boundary_ratio=float(index.get("boundary_ratio") or I2V_BOUNDARY_RATIO), name=path.name)
    return model.to(device, dtype, skip=deferred_matrix if mmap and defer_cast else None).eval()


def _diffusers_config(path: Path) -> dict:
    return {k: v for k, v in _read_json(path / "config.json").items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------- single files
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (name -> dtype, shape, data_offsets; "__metadata__")."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


_MAPPED: list[tuple[int, int]] = []  # address ranges of the maps made here (is_mapped)


def is_mapped(t: torch.Tensor) -> bool:
    """Whether a tensor's data lies in a file mapping made by mmap_safetensors (not a copy in RAM)."""
    p = t.data_ptr()
    return any(start <= p < end for start, end in _MAPPED)


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file as views of a private (copy-on-write) memory map of it: nothing is read
    until a tensor is touched, and the pages stay the OS's to drop. Each tensor keeps the mapping alive."""
    path = Path(path)
    header = safetensors_header(path)
    with open(path, "rb") as fh:
        mapping = _mmap.mmap(fh.fileno(), 0, access=_mmap.ACCESS_COPY)  # writable (torch wants that), never written
    base = 8 + struct.unpack("<Q", mapping[:8])[0]
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    _MAPPED.append((whole.data_ptr(), whole.data_ptr() + len(mapping)))
    del whole
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // torch.tensor([], dtype=dtype).element_size()
        if count == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        out[name] = torch.frombuffer(mapping, dtype=dtype, count=count, offset=base + start).view(info["shape"])
    return out


def meta_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file on the meta device (shapes and dtypes from the header; nothing read)."""
    return {name: torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]], device="meta")
            for name, info in safetensors_header(path).items() if name != "__metadata__"}


def read_state_dict(path: Path, device="cpu", mmap: bool = False) -> dict[str, torch.Tensor]:
    """A .safetensors file, a directory of .safetensors shards, or a .pth/.pt file, read onto `device`
    (mmap: safetensors as views of their memory-mapped files, on the host; device "meta": shapes and dtypes
    only, from the headers, which is how the memory planner measures a checkpoint before loading it)."""
    from safetensors.torch import load_file

    path = Path(path)
    if str(device) == "meta":
        if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            return {k: v.to("meta") for k, v in sd.items()}
        shards = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        return {k: v for shard in shards for k, v in meta_safetensors(shard).items()}
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise ModelLoadError(f"no .safetensors shards in {path}")
        sd = {}
        for shard in shards:
            sd.update(mmap_safetensors(shard) if mmap else load_file(str(shard), device=str(device)))
        return sd
    if path.suffix == ".safetensors":
        return mmap_safetensors(path) if mmap else load_file(str(path), device=str(device))
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = torch.load(str(path), map_location=device, weights_only=True, mmap=True)
        return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    raise ModelLoadError(f"unsupported checkpoint file {path}")


def _find(root: Path, patterns: list[str], what: str) -> Path:
    for pattern in patterns:
        hits = sorted(p for p in root.glob(pattern) if not p.name.startswith("."))
        if hits:
            return hits[0]
    raise ModelLoadError(f"no {what} in {root} (looked for {', '.join(patterns)})")


def find_single_files(root: Path) -> dict[str, Path]:
    root = Path(root)
    return {
        "high": _find(root, ["high_noise_model", "*high_noise*.safetensors", "*high_noise*.pth"], "high-noise expert"),
        "low": _find(root, ["low_noise_model", "*low_noise*.safetensors", "*low_noise*.pth"], "low-noise expert"),
        "vae": _find(root, ["*[Vv][Aa][Ee]*.safetensors", "*[Vv][Aa][Ee]*.pth"], "VAE"),
        "text_encoder": _find(root, ["*umt5*.safetensors", "*umt5*.pth", "*t5*.safetensors", "*t5*.pth"], "UMT5 text encoder"),
        "tokenizer": _find(root, ["tokenizer", "google/umt5-xxl", "umt5-xxl"], "tokenizer directory"),
    }


def split_fp8_scales(sd: dict[str, torch.Tensor], dtype) -> tuple[dict, dict]:
    """ComfyUI fp8_scaled keys -> (state dict with the 2-D e4m3 weights kept, {weight key: scale}); other FP8
    tensors (none in Wan files) are dequantized, the markers dropped."""
    out, scales = {}, {}
    for key, value in sd.items():
        if keymaps.is_fp8_marker(key):
            continue
        scale = sd.get(keymaps.scale_key(key))
        if value.dtype == torch.float8_e4m3fn and value.ndim == 2:
            scales[key] = scale if scale is not None else torch.ones((), dtype=torch.float32)
        elif value.dtype in keymaps.FP8_DTYPES:
            value = (value.to(torch.float32) * (scale.float() if scale is not None else 1.0)).to(dtype)
        out[key] = value
    return out, scales


def load_expert(path: Path, device="cpu", dtype=torch.float32, config: dict | None = None, keep_fp8: bool = False,
                mmap: bool = False, defer_cast: bool = False):
    """One expert from an original-Wan / ComfyUI checkpoint (fp16, bf16 or fp8_scaled). keep_fp8: FP8 linears
    stay e4m3 with a `weight_scale` buffer; mmap: tensors are views of the mapped file (module docstring)."""
    from diffusers import WanTransformer3DModel

    # Not mapped: built from the headers, then read onto `device` one tensor at a time (_stream_in).
    stream = not mmap and str(device) != "meta"
    raw = header = read_state_dict(path, "cpu" if mmap else "meta", mmap=mmap)
    if keep_fp8:
        raw, scales = split_fp8_scales(raw, dtype)
        # the converter only renames keys: a dict of scales under their weights' names comes out renamed alike
        scales = {k + "_scale": v for k, v in keymaps.transformer_to_diffusers(scales).items()} if scales else {}
    elif defer_cast and mmap and not any(v.dtype in keymaps.FP8_DTYPES for v in raw.values()):
        scales = {}  # no FP8 to dequantize: the casts are _assign's, which leaves the blocks' weights as mapped
    else:
        raw, scales = keymaps.dequantize_comfy_fp8(raw, dtype), {}
    sd = keymaps.transformer_to_diffusers(raw)
    if config is None:
        head_dim = 128
        orig_cfg = _read_json(Path(path) / "config.json") if Path(path).is_dir() else {}
        if orig_cfg.get("dim") and orig_cfg.get("num_heads"):
            head_dim = orig_cfg["dim"] // orig_cfg["num_heads"]
        config = keymaps.infer_transformer_config(sd, head_dim=head_dim)
    model = _assign(WanTransformer3DModel, config, sd, "meta" if stream else device, dtype, f"expert {path}", scales,
                    defer_cast=defer_cast and mmap)
    if stream:
        names, read = _source_names(header, keymaps.transformer_to_diffusers), _reader(path)

        def tensor(key):  # the conversion above, applied to this key's part of the file alone
            if key.endswith(".weight_scale") and key not in names:  # a kept FP8 linear's scale: its weight stays meta
                name = names[key.removesuffix("_scale")]
                return split_fp8_scales(_part(read, header, name, device, weight=False), dtype)[1][name]
            part = _part(read, header, names[key], device)
            return (split_fp8_scales(part, dtype)[0] if keep_fp8 else keymaps.dequantize_comfy_fp8(part, dtype))[names[key]]

        _stream_in(model, device, tensor)
    return model


def load_vae(path: Path, device="cpu", config: dict | None = None):
    from diffusers import AutoencoderKLWan

    sd = keymaps.vae_to_diffusers(keymaps.dequantize_comfy_fp8(read_state_dict(path, device), torch.float32))
    return _assign(AutoencoderKLWan, config or {}, sd, device, torch.float32, f"VAE {path}")


def load_umt5(path: Path, device="cpu", dtype=torch.float32):
    from transformers import UMT5Config, UMT5EncoderModel

    header = read_state_dict(path, "meta")  # built from the headers, then read one tensor at a time (_stream_in)
    sd = keymaps.umt5_to_hf(keymaps.dequantize_comfy_fp8(header, dtype))
    config = UMT5Config(**keymaps.infer_umt5_config(sd))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _load_strict(model, sd, f"text encoder {path}")
    # Both keys hold the one table (umt5_to_hf): make them one parameter, or a dtype cast copies it twice (2 GB).
    model.encoder.embed_tokens.weight = model.shared.weight
    cast_module(model, None, dtype)
    if str(device) != "meta":
        names, read = _source_names(header, keymaps.umt5_to_hf), _reader(path)
        _stream_in(model, device,
                   lambda key: keymaps.dequantize_comfy_fp8(_part(read, header, names[key], device), dtype)[names[key]])
        model.encoder.embed_tokens.weight = model.shared.weight  # _stream_in replaced `shared`: tie again
    return model


def load_single_files(root: Path, device="cpu", dtype=torch.float32, keep_fp8: bool = False,
                      mmap: bool = False, defer_cast: bool = False) -> WanI2VModel:
    from transformers import AutoTokenizer

    files = find_single_files(root)
    arch = _read_json(Path(root) / ARCH_FILE)
    expert_device = "cpu" if mmap else device
    model = WanI2VModel(
        transformer_high=load_expert(files["high"], expert_device, dtype, arch.get("transformer"), keep_fp8, mmap,
                                     defer_cast),
        transformer_low=load_expert(files["low"], expert_device, dtype, arch.get("transformer"), keep_fp8, mmap,
                                    defer_cast),
        vae=load_vae(files["vae"], device, arch.get("vae")),
        text_encoder=load_umt5(files["text_encoder"], device, dtype),
        tokenizer=AutoTokenizer.from_pretrained(files["tokenizer"]),
        scheduler_config=arch.get("scheduler") or dict(UNIPC_SCHEDULER_CONFIG),
        boundary_ratio=float(arch.get("boundary_ratio", I2V_BOUNDARY_RATIO)),
        name=Path(root).name,
    )
    return model.eval()


def save_single_files(model: WanI2VModel, root: Path, layout: str = "comfyui") -> dict[str, Path]:
    """Write the model as ComfyUI split files or in the original Wan2.2 repo layout (real key names)."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def cpu(sd):
        return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}

    vae_sd = cpu(keymaps.vae_to_original(model.vae.state_dict()))
    t5_sd = cpu({k: v for k, v in model.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"})
    if layout == "comfyui":
        paths = {
            "high": root / "wan2.2_i2v_high_noise_14B_fp16.safetensors",
            "low": root / "wan2.2_i2v_low_noise_14B_fp16.safetensors",
            "vae": root / "wan_2.1_vae.safetensors",
            "text_encoder": root / "umt5_xxl_fp16.safetensors",
            "tokenizer": root / "tokenizer",
        }
        for name, expert in (("high", model.transformer_high), ("low", model.transformer_low)):
            save_file(cpu(keymaps.transformer_to_original(expert.state_dict(), prefix=keymaps.COMFY_PREFIX)), str(paths[name]))
        save_file(vae_sd, str(paths["vae"]))
        save_file(t5_sd, str(paths["text_encoder"]))
    elif layout == "wan":
        paths = {
            "high": root / "high_noise_model",
            "low": root / "low_noise_model",
            "vae": root / "Wan2.1_VAE.pth",
            "text_encoder": root / "models_t5_umt5-xxl-enc-bf16.pth",
            "tokenizer": root / "google" / "umt5-xxl",
        }
        for name, expert in (("high", model.transformer_high), ("low", model.transformer_low)):
            paths[name].mkdir(exist_ok=True)
            save_file(cpu(keymaps.transformer_to_original(expert.state_dict())),
                      str(paths[name] / "diffusion_pytorch_model.safetensors"))
            cfg = expert.config
            (paths[name] / "config.json").write_text(json.dumps({
                "_class_name": "WanModel", "model_type": "i2v", "dim": cfg.num_attention_heads * cfg.attention_head_dim,
                "num_heads": cfg.num_attention_heads, "num_layers": cfg.num_layers, "ffn_dim": cfg.ffn_dim,
                "in_dim": cfg.in_channels, "out_dim": cfg.out_channels, "text_len": 512, "freq_dim": cfg.freq_dim,
            }, indent=2))
        torch.save(vae_sd, paths["vae"])
        torch.save(cpu(keymaps.umt5_to_original(t5_sd)), paths["text_encoder"])
    else:
        raise ValueError(f"unknown layout {layout!r} (comfyui or wan)")
    model.tokenizer.save_pretrained(paths["tokenizer"])
    arch = {
        "transformer": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in model.transformer_high.config.items() if not k.startswith("_")},
        "vae": {k: v for k, v in model.vae.config.items() if not k.startswith("_")},
        "scheduler": model.scheduler_config,
        "boundary_ratio": model.boundary_ratio,
    }
    (root / ARCH_FILE).write_text(json.dumps(arch, indent=2))
    return paths


# --------------------------------------------------------------------------------------------- random full size
def build_random_full(device="cuda", dtype=torch.bfloat16, with_text_encoder: bool = True,
                      num_layers: int | None = None) -> WanI2VModel:
    """Full-size A14B with random weights, allocated directly on `device` ("meta" to inspect shapes only).

    Speed does not depend on weight values, so GPU benchmarks use this when no weights can be downloaded.
    Parameters are created on meta and materialised one by one on the device, each straight in the dtype it
    keeps (`dtype`, fp32 for diffusers' `_keep_in_fp32_modules`; never an fp32 copy of a 14B expert);
    buffers (RoPE tables) are computed for real; weights get 0.5/sqrt(fan_in) so 40 random residual layers
    stay finite in bf16. The text encoder's two embedding tables are tied (one 1 B tensor, not two).
    num_layers: fewer transformer blocks at the real widths (tests). with_text_encoder=False: a 1-layer
    UMT5 at the real width over the tiny tokenizer's vocabulary (the random prompts use it anyway)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from wanrt.model.tiny import build_tiny_tokenizer

    gen = torch.Generator(device="cpu").manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    t5 = UMT5_XXL_CONFIG if with_text_encoder else {**UMT5_XXL_CONFIG, "num_layers": 1, "vocab_size": len(tokenizer)}
    expert_config = {**WAN22_I2V_A14B_TRANSFORMER_CONFIG, **({"num_layers": num_layers} if num_layers else {})}
    with init_empty_weights(include_buffers=False):
        experts = [WanTransformer3DModel(**expert_config) for _ in range(2)]
        text_encoder = UMT5EncoderModel(UMT5Config(**t5))
        vae = AutoencoderKLWan()
    # Built on meta, the embedding and `shared` are two parameters (6.7 B, not 5.7 B): tie them first so the
    # 1 B table is materialised once.
    text_encoder.encoder.embed_tokens.weight = text_encoder.shared.weight
    for module, module_dtype in ((experts[0], dtype), (experts[1], dtype), (text_encoder, dtype), (vae, torch.float32)):
        if str(device) != "meta":
            _materialise_random(module, device, module_dtype, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
            if module is text_encoder:  # set_module_tensor_to_device replaced `shared`: tie again
                text_encoder.encoder.embed_tokens.weight = text_encoder.shared.weight
            cast_module(module, device, module_dtype)  # buffers; parameters are already where they belong
    model = WanI2VModel(
        transformer_high=experts[0], transformer_low=experts[1], vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, scheduler_config=dict(UNIPC_SCHEDULER_CONFIG), name="random-full",
    )
    return model.eval()


RANDOM_CHUNK = 1 << 26  # values drawn per call when drawing on the GPU (128 MiB in bf16)


def _materialise_random(module: torch.nn.Module, device, dtype, seed: int) -> None:
    """Random values for a meta-built module's parameters, each made in its final dtype and adopted on `device`.

    Where a CUDA GPU is present the values are drawn on it (a CUDA generator seeded with `seed`, RANDOM_CHUNK values
    a call) and, for a model built on the host (memory=offload loads random-full there), copied to the host chunk
    by chunk: the CPU generator draws ~170 M values/s, minutes for 34 B parameters. The draws do not depend on
    `device`, so random-full holds the same values on the host as on the GPU for a seed. Without CUDA the CPU
    generator draws each parameter whole.
    accelerate's set_module_tensor_to_device casts `value` to the placeholder's dtype (fp32 on meta) unless
    `dtype` is passed: without it every parameter lands in fp32 (57 GB per expert) until a later cast."""
    from accelerate.utils import set_module_tensor_to_device

    device = torch.device(device)
    draw_on = device if device.type == "cuda" else torch.device("cuda") if torch.cuda.is_available() else device
    g = torch.Generator(device=draw_on).manual_seed(seed)
    keep_fp32 = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, p in list(module.named_parameters()):
        target = torch.float32 if any(part in keep_fp32 for part in name.split(".")) else dtype
        if p.ndim >= 2 and not name.endswith("scale_shift_table"):
            fan_in = p[0].numel() if p.ndim > 1 else p.shape[0]
            value = _randn(p.shape, target, 0.5 / fan_in ** 0.5, g, device, draw_on)
        elif name.endswith("scale_shift_table"):
            value = _randn(p.shape, target, p.shape[-1] ** -0.5, g, device, draw_on)
        elif "norm" in name or name.endswith("gamma"):
            value = torch.ones(p.shape, device=device, dtype=target)
        else:
            value = torch.zeros(p.shape, device=device, dtype=target)
        set_module_tensor_to_device(module, name, device, value=value, dtype=target, clear_cache=False)


def _randn(shape, dtype, scale: float, g: torch.Generator, device: torch.device, draw_on: torch.device):
    """N(0, scale^2) in `dtype` on `device`, drawn on `draw_on` with `g` (on the GPU: in RANDOM_CHUNK pieces, each
    copied into place, so no more than one chunk is ever in flight beside the result)."""
    if draw_on.type != "cuda":
        return torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(scale)
    out = torch.empty(shape, device=device, dtype=dtype)
    flat = out.view(-1)
    for i in range(0, flat.numel(), RANDOM_CHUNK):
        n = min(RANDOM_CHUNK, flat.numel() - i)
        flat[i:i + n].copy_(torch.randn(n, generator=g, device=draw_on, dtype=dtype).mul_(scale))
    return out


# --------------------------------------------------------------------------------------------- streaming reads
def _reader(path: Path):
    """key -> that tensor of a checkpoint, read alone onto the host (safetensors: safe_open; .pth: a memory-mapped
    torch.load, whose tensors stay file pages until read)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return read_state_dict(path, "cpu").__getitem__
    files = {}
    for shard in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        f = safe_open(str(shard), framework="pt", device="cpu")
        files.update(dict.fromkeys(f.keys(), f))
    return lambda key: files[key].get_tensor(key)


def _source_names(header: dict[str, torch.Tensor], convert) -> dict[str, str]:
    """Model key -> file key, through a key converter that only renames (it hands the same tensors on). ComfyUI's
    FP8 markers are left out, as dequantize_comfy_fp8 leaves them out before the key maps run."""
    header = {k: v for k, v in header.items() if not keymaps.is_fp8_marker(k)}
    file_key = {id(v): k for k, v in header.items()}
    return {k: file_key[id(v)] for k, v in convert(header).items()}


def _part(read, header: dict, name: str, device, weight: bool = True) -> dict[str, torch.Tensor]:
    """The file's tensor `name` and its ComfyUI `scale_weight` (if it has one) on `device`: what the FP8
    converters need to convert that tensor. weight=False: the weight's meta stand-in (only its scale is wanted)."""
    part = {name: read(name).to(device) if weight else header[name]}
    scale = keymaps.scale_key(name)
    if scale in header:
        part[scale] = read(scale).to(device)
    return part


def _stream_in(model: torch.nn.Module, device, tensor) -> None:
    """Materialise a model built on meta one tensor at a time: tensor(key) reads that key's source onto `device`
    and converts it there; it is adopted in the dtype the meta model holds, and its source is gone before the next
    is read. The device holds the model plus one tensor in flight, never a whole file beside its converted copy
    (an fp16 or fp8 expert loaded as bf16 was two experts on the GPU). Buffers built for real (RoPE) just move."""
    from accelerate.utils import set_module_tensor_to_device

    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            set_module_tensor_to_device(model, key, device, value=tensor(key).to(device, t.dtype), clear_cache=False)
        else:
            t.data = t.data.to(device)


# --------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_strict(model: torch.nn.Module, sd: dict, what: str) -> None:
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{what}: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    for k, v in model.state_dict().items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelLoadError(f"{what}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)


def deferred_matrix(name: str, tensor: torch.Tensor) -> bool:
    """The tensors `defer_cast` leaves in the file's precision: the blocks' linear weights (what the FP8 swap
    quantises)."""
    return tensor.dim() == 2 and name.startswith("blocks.") and name.endswith(".weight")


def cast_deferred(expert: torch.nn.Module, dtype: torch.dtype) -> None:
    """After the FP8 swap read an expert loaded with `defer_cast`: any deferred weight it left (not quantised)
    takes `dtype`, as a whole cast would have given it."""
    cast_module(expert, None, dtype, skip=lambda name, t: not deferred_matrix(name, t) or t.dtype in keymaps.FP8_DTYPES)


def _assign(cls, config: dict, sd: dict, device, dtype, what: str, fp8_scales: dict | None = None,
            defer_cast: bool = False):
    """Build on meta (parameters only; buffers such as RoPE tables are real), then adopt the tensors.
    fp8_scales: {"<linear>.weight_scale": scale}: those linears keep their e4m3 weights (and the scale as a
    buffer); everything else takes `dtype` as cast_module gives it, except the blocks' matrices under defer_cast."""
    from accelerate import init_empty_weights

    config = {k: (tuple(v) if k == "patch_size" and v is not None else v) for k, v in config.items()}
    with init_empty_weights(include_buffers=False):
        model = cls(**config)
    for key, scale in (fp8_scales or {}).items():
        model.get_submodule(key.rsplit(".", 1)[0]).register_buffer("weight_scale", torch.empty(scale.shape, device="meta"))
    _load_strict(model, {**sd, **(fp8_scales or {})}, what)
    if str(device) == "meta":  # measuring: parameters stay meta, real buffers (RoPE) stay where they are
        device = None
    if not fp8_scales:
        return cast_module(model, device, dtype, skip=deferred_matrix if defer_cast else None)
    keep = {id(t) for k in fp8_scales for t in (model.get_submodule(k.rsplit(".", 1)[0]).weight,
                                                 model.get_submodule(k.rsplit(".", 1)[0]).weight_scale)}
    held = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in keep:
            held[id(t)] = t.data
            t.data = torch.empty(0, device=t.device)  # out of cast_module's way
    cast_module(model, device, dtype)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in held:
            t.data = held[id(t)].to(device)
    return model

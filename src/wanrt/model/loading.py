"""Load (and save) WAN 2.2 I2V models in the layouts users have.

- `tiny`: the built-in random model (model/tiny.py).
- `random-full`: full-size random weights built straight on the target device (GPU benchmarks).
- a diffusers directory (Wan-AI/Wan2.2-I2V-A14B-Diffusers): transformer/, transformer_2/, vae/,
  text_encoder/, tokenizer/, scheduler/, model_index.json.
- a directory of single files, ComfyUI style (wan2.2_i2v_high_noise_14B_*.safetensors,
  ..._low_noise_14B_*, wan_2.1_vae.safetensors, umt5_xxl_*.safetensors, fp16 or fp8_scaled) or the
  original Wan2.2 repo (high_noise_model/, low_noise_model/, Wan2.1_VAE.pth,
  models_t5_umt5-xxl-enc-bf16.pth), plus a tokenizer/ (or google/umt5-xxl/) directory.

Each expert is read straight onto its device and built on the meta device, so host RAM never holds both.
"""

from __future__ import annotations

import json
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
def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanI2VModel:
    if spec == "tiny":
        from wanrt.model.tiny import build_tiny_model

        return build_tiny_model().to(device, dtype).eval()
    if spec == "random-full":
        return build_random_full(device, dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (use 'tiny', 'random-full' or a directory)")
    if (path / "transformer").is_dir() and (path / "transformer_2").is_dir():
        return load_diffusers_dir(path, device, dtype)
    if path.is_dir():
        return load_single_files(path, device, dtype)
    raise ModelLoadError(f"{path} is neither a diffusers directory nor a directory of single files")


# --------------------------------------------------------------------------------------------- diffusers
def load_diffusers_dir(path: Path, device="cpu", dtype=torch.float32) -> WanI2VModel:
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
    )
    return model.to(device, dtype).eval()


def save_diffusers_dir(model: WanI2VModel, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.transformer_high.save_pretrained(path / "transformer")
    model.transformer_low.save_pretrained(path / "transformer_2")
    model.vae.save_pretrained(path / "vae")
    model.text_encoder.save_pretrained(path / "text_encoder")
    model.tokenizer.save_pretrained(path / "tokenizer")
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    index = {
        "_class_name": "WanImageToVideoPipeline",
        "boundary_ratio": model.boundary_ratio,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "UniPCMultistepScheduler")],
        "image_encoder": [None, None],
        "image_processor": [None, None],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


# --------------------------------------------------------------------------------------------- single files
def read_state_dict(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """A .safetensors file, a directory of .safetensors shards, or a .pth/.pt file, read onto `device`."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise ModelLoadError(f"no .safetensors shards in {path}")
        sd = {}
        for shard in shards:
            sd.update(load_file(str(shard), device=str(device)))
        return sd
    if path.suffix == ".safetensors":
        return load_file(str(path), device=str(device))
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


def load_expert(path: Path, device="cpu", dtype=torch.float32, config: dict | None = None):
    """One expert from an original-Wan / ComfyUI checkpoint (fp16, bf16 or fp8_scaled)."""
    from diffusers import WanTransformer3DModel

    sd = keymaps.transformer_to_diffusers(keymaps.dequantize_comfy_fp8(read_state_dict(path, device), dtype))
    if config is None:
        head_dim = 128
        orig_cfg = _read_json(Path(path) / "config.json") if Path(path).is_dir() else {}
        if orig_cfg.get("dim") and orig_cfg.get("num_heads"):
            head_dim = orig_cfg["dim"] // orig_cfg["num_heads"]
        config = keymaps.infer_transformer_config(sd, head_dim=head_dim)
    return _assign(WanTransformer3DModel, config, sd, device, dtype, f"expert {path}")


def load_vae(path: Path, device="cpu", config: dict | None = None):
    from diffusers import AutoencoderKLWan

    sd = keymaps.vae_to_diffusers(keymaps.dequantize_comfy_fp8(read_state_dict(path, device), torch.float32))
    return _assign(AutoencoderKLWan, config or {}, sd, device, torch.float32, f"VAE {path}")


def load_umt5(path: Path, device="cpu", dtype=torch.float32):
    from transformers import UMT5Config, UMT5EncoderModel

    sd = keymaps.umt5_to_hf(keymaps.dequantize_comfy_fp8(read_state_dict(path, device), dtype))
    config = UMT5Config(**keymaps.infer_umt5_config(sd))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _load_strict(model, sd, f"text encoder {path}")
    return cast_module(model, device, dtype)


def load_single_files(root: Path, device="cpu", dtype=torch.float32) -> WanI2VModel:
    from transformers import AutoTokenizer

    files = find_single_files(root)
    arch = _read_json(Path(root) / ARCH_FILE)
    model = WanI2VModel(
        transformer_high=load_expert(files["high"], device, dtype, arch.get("transformer")),
        transformer_low=load_expert(files["low"], device, dtype, arch.get("transformer")),
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


def _materialise_random(module: torch.nn.Module, device, dtype, seed: int) -> None:
    """Random values for a meta-built module's parameters, each made on `device` in its final dtype.

    accelerate's set_module_tensor_to_device casts `value` to the placeholder's dtype (fp32 on meta) unless
    `dtype` is passed: without it every parameter lands in fp32 (57 GB per expert) until a later cast."""
    from accelerate.utils import set_module_tensor_to_device

    keep_fp32 = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(module.named_parameters()):
        target = torch.float32 if any(part in keep_fp32 for part in name.split(".")) else dtype
        if p.ndim >= 2 and not name.endswith("scale_shift_table"):
            fan_in = p[0].numel() if p.ndim > 1 else p.shape[0]
            value = torch.randn(p.shape, generator=g, device=device, dtype=target).mul_(0.5 / fan_in ** 0.5)
        elif name.endswith("scale_shift_table"):
            value = torch.randn(p.shape, generator=g, device=device, dtype=target).mul_(p.shape[-1] ** -0.5)
        elif "norm" in name or name.endswith("gamma"):
            value = torch.ones(p.shape, device=device, dtype=target)
        else:
            value = torch.zeros(p.shape, device=device, dtype=target)
        set_module_tensor_to_device(module, name, device, value=value, dtype=target, clear_cache=False)


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


def _assign(cls, config: dict, sd: dict, device, dtype, what: str):
    """Build on meta (parameters only; buffers such as RoPE tables are real), then adopt the tensors."""
    from accelerate import init_empty_weights

    config = {k: (tuple(v) if k == "patch_size" and v is not None else v) for k, v in config.items()}
    with init_empty_weights(include_buffers=False):
        model = cls(**config)
    _load_strict(model, sd, what)
    return cast_module(model, device, dtype)

"""Every loader round-trips the tiny model written with the real key names: identical outputs."""

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wanrt.model import keymaps, sizes
from wanrt.model.loading import (
    WAN22_I2V_A14B_TRANSFORMER_CONFIG,
    ModelLoadError,
    build_random_full,
    load_expert,
    load_model,
    save_single_files,
)
from wanrt.params import GenerateParams
from wanrt.runtime.pipeline import WanI2VPipeline

from model_files import save_diffusers_dir

P = GenerateParams(prompt="a woman turning her head", width=64, height=64, frames=9, steps=3, seed=3)


@pytest.fixture(scope="module")
def reference_latents(tiny_model):
    from conftest import make_image

    return WanI2VPipeline(tiny_model).generate(P, make_image(), None).latents


def run(model):
    from conftest import make_image

    return WanI2VPipeline(model).generate(P, make_image(), None).latents


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_diffusers_dir_roundtrip(tiny_model, reference_latents, tmp_path):
    save_diffusers_dir(tiny_model, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}
    loaded = load_model(str(tmp_path / "m"))
    assert_same_weights(loaded.transformer_high, tiny_model.transformer_high)
    assert_same_weights(loaded.transformer_low, tiny_model.transformer_low)
    assert torch.equal(run(loaded), reference_latents)


@pytest.mark.parametrize("layout", ["comfyui", "wan"])
def test_single_file_roundtrip(tiny_model, reference_latents, tmp_path, layout):
    paths = save_single_files(tiny_model, tmp_path / layout, layout=layout)
    if layout == "comfyui":
        from safetensors.torch import load_file

        keys = load_file(str(paths["high"])).keys()
        assert "model.diffusion_model.blocks.0.self_attn.q.weight" in keys
        assert "model.diffusion_model.head.modulation" in keys
        assert "encoder.block.0.layer.0.SelfAttention.q.weight" in load_file(str(paths["text_encoder"]))
        assert "decoder.upsamples.4.shortcut.weight" in load_file(str(paths["vae"]))
    else:
        t5 = torch.load(paths["text_encoder"], weights_only=True)
        assert "blocks.0.ffn.gate.0.weight" in t5 and "token_embedding.weight" in t5
        assert json.loads((paths["high"] / "config.json").read_text())["num_heads"] == 2
    loaded = load_model(str(tmp_path / layout))
    for part in ("transformer_high", "transformer_low", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, part), getattr(tiny_model, part))
    assert torch.equal(run(loaded), reference_latents)


def test_fp8_scaled_comfy_expert_is_dequantized(tiny_model, tmp_path):
    from safetensors.torch import save_file

    sd = keymaps.transformer_to_original(tiny_model.transformer_high.state_dict(), prefix=keymaps.COMFY_PREFIX)
    fp8, expected = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            fp8[k], fp8[k[:-len("weight")] + "scale_weight"] = q, scale.reshape(1)
            expected[k] = q.to(torch.float32) * scale
        else:
            fp8[k] = expected[k] = v
    fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file({k: v.contiguous() for k, v in fp8.items()}, str(tmp_path / "high_fp8_scaled.safetensors"))
    cfg = dict(tiny_model.transformer_high.config)
    expert = load_expert(tmp_path / "high_fp8_scaled.safetensors",
                         config={k: v for k, v in cfg.items() if not k.startswith("_")})
    got = keymaps.transformer_to_original(expert.state_dict(), prefix=keymaps.COMFY_PREFIX)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    w, q = tiny_model.transformer_high.state_dict()["blocks.0.attn1.to_q.weight"], expert.state_dict()["blocks.0.attn1.to_q.weight"]
    assert 0 < (w - q).abs().max() < 0.1 * w.abs().max()  # really quantized, and close


def test_wrong_keys_are_refused_by_name(tiny_model, tmp_path):
    from safetensors.torch import save_file

    sd = keymaps.transformer_to_original(tiny_model.transformer_high.state_dict())
    sd.pop("blocks.1.ffn.2.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "broken.safetensors"))
    cfg = {k: v for k, v in tiny_model.transformer_high.config.items() if not k.startswith("_")}
    with pytest.raises(ModelLoadError, match="ffn.net.2.weight"):
        load_expert(tmp_path / "broken.safetensors", config=cfg)


def test_missing_parts_are_named(tmp_path):
    (tmp_path / "wan2.2_i2v_high_noise_14B_fp16.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="low-noise expert"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_random_full_has_the_a14b_shape_on_meta():
    m = build_random_full("meta", torch.bfloat16, with_text_encoder=False)
    cfg = m.transformer_high.config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim, cfg.in_channels) == (40, 5120, 13824, 36)
    n = sum(p.numel() for p in m.transformer_high.parameters())
    assert 14.0e9 < n < 14.5e9, n  # "A14B": two ~14B experts
    assert m.transformer_high.patch_embedding.weight.device.type == "meta"
    sd = {k: v for k, v in m.transformer_high.state_dict().items()}
    assert keymaps.infer_transformer_config(sd)["num_attention_heads"] == 40
    assert {k: v for k, v in keymaps.infer_transformer_config(sd).items()} == {
        k: v for k, v in WAN22_I2V_A14B_TRANSFORMER_CONFIG.items() if k != "rope_max_seq_len"}
    assert n == sizes.expert_params().total  # the size model the memory planner uses
    full = build_random_full("meta", torch.bfloat16)
    te = full.text_encoder
    assert te.shared.weight is te.encoder.embed_tokens.weight  # tied: 5.68 B, not 6.73 B
    assert sum(p.numel() for p in te.parameters()) == sizes.umt5_params(tied=True) == 5_680_910_336


def test_random_full_materialises_each_parameter_in_its_final_dtype(monkeypatch):
    """One block at the real widths (5120 / 13824): every parameter is made in bf16 (fp32 only where diffusers
    keeps it), never in fp32 first, and the bytes are what the size model says."""
    import wanrt.model.loading as loading
    from wanrt.runtime.memory import module_bytes

    seen = []  # dtypes as _materialise_random leaves them, before the final cast_module
    real_cast = loading.cast_module

    def spy(module, device=None, dtype=None):
        seen.append({p.dtype for p in module.parameters()})
        return real_cast(module, device, dtype)

    monkeypatch.setattr(loading, "cast_module", spy)
    m = build_random_full("cpu", torch.bfloat16, with_text_encoder=False, num_layers=1)
    assert seen[0] == seen[1] == seen[2] == {torch.bfloat16, torch.float32}  # experts, text encoder (its `wo`)
    assert seen[3] == {torch.float32}  # the VAE
    config = {**WAN22_I2V_A14B_TRANSFORMER_CONFIG, "num_layers": 1}
    keep = set(m.transformer_high._keep_in_fp32_modules)
    for expert in m.experts.values():
        for name, p in expert.named_parameters():
            wanted = torch.float32 if keep & set(name.split(".")) else torch.bfloat16
            assert p.dtype == wanted, name
        assert module_bytes(expert) == sizes.expert_params(config).bytes(2) == 1_225_268_352
    assert m.transformer_high.blocks[0].ffn.net[0].proj.weight.shape == (13824, 5120)
    te = m.text_encoder
    assert te.shared.weight is te.encoder.embed_tokens.weight
    assert module_bytes(te) == sizes.umt5_bytes(dict(num_layers=1, vocab_size=te.config.vocab_size), 2)
    w = m.transformer_high.blocks[0].attn1.to_q.weight.float()
    assert torch.isfinite(w).all() and 0.3 < w.std().item() * 5120**0.5 / 0.5 < 3  # 0.5/sqrt(fan_in)


@pytest.mark.gpu
def test_random_full_on_cuda_never_holds_an_fp32_copy():
    from wanrt.runtime.memory import module_bytes

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    m = build_random_full("cuda", torch.bfloat16, with_text_encoder=False, num_layers=2)
    total = sum(module_bytes(part) for part in (m.transformer_high, m.transformer_low, m.text_encoder, m.vae))
    assert torch.cuda.max_memory_allocated() - base < 1.1 * total  # fp32 first would be ~2x


# ----------------------------------------------------------------------------------------------- load memory
class LiveStorages(TorchDispatchMode):
    """Peak bytes of the tensor storages made inside the `with` (by torch ops, or handed to torch by a reader:
    safetensors `set_`s a tensor onto a storage it made), each counted from its making until its memory is freed
    (a storage adopted by a parameter stays counted). Storages made before the `with` never count."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    @staticmethod
    def storages(tree) -> list:
        return [t.untyped_storage() for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type != "meta"]

    def _drop(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {s.data_ptr() for s in self.storages((args, kwargs))}  # before: `set_` gives its input a new storage
        out = func(*args, **(kwargs or {}))
        for s in self.storages(out):
            key = s.data_ptr()
            if key and key not in inputs and key not in self.live:
                self.live[key] = s.nbytes()
                self.now += s.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(s, self._drop, key)  # the storage's own object: it lives as long as its memory
        return out


def _expert_file(tmp_path, kind: str):
    """A 6-block tiny expert written with ComfyUI's key names, as an fp16 file or as fp8_scaled (e4m3 linears
    with a scale_weight each); the expert too (more blocks than tiny: one tensor is a small part of it)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from wanrt.model.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    cfg = {**TINY_TRANSFORMER_CONFIG, "num_layers": 6}
    expert = WanTransformer3DModel(**cfg)
    sd = keymaps.transformer_to_original(expert.state_dict(), prefix=keymaps.COMFY_PREFIX)
    out = {}
    for k, v in sd.items():
        if kind == "fp8" and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            out[k], out[k[: -len("weight")] + "scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale.reshape(1)
        else:
            out[k] = v.half() if kind == "fp16" else v
    if kind == "fp8":
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / f"wan2.2_i2v_high_noise_14B_{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path, {k: (tuple(v) if k == "patch_size" else v) for k, v in cfg.items()}, out


@pytest.mark.parametrize("kind,keep_fp8", [("fp16", False), ("fp8", False), ("fp8", True)])
def test_single_file_expert_loads_one_tensor_at_a_time(tmp_path, kind, keep_fp8):
    """The resident path reads an expert onto the device and converts it to bf16: the device never holds the
    file beside its converted copy (an fp16 file loaded as bf16 was file + copy, two experts on an 80 GB card),
    only the model plus one tensor in flight (for an fp8 weight: its e4m3 source and fp32 dequantization)."""
    from wanrt.runtime.memory import module_bytes

    path, cfg, stored = _expert_file(tmp_path, kind)
    with LiveStorages() as live:
        expert = load_expert(path, "cpu", torch.bfloat16, config=cfg, keep_fp8=keep_fp8)
    model = module_bytes(expert)
    one = max(v.numel() for v in stored.values()) * (1 + 4 + 4)  # the largest tensor: source, 2 fp32 temporaries
    assert live.peak <= model + one, (live.peak, model, one)
    assert live.now == model  # nothing else is left behind
    # and the values are the file's, converted as before (dequantized: through bf16, fp32-kept modules too)
    got = keymaps.transformer_to_original(expert.state_dict(), prefix=keymaps.COMFY_PREFIX)
    for k, v in stored.items():
        if k.endswith(".scale_weight") or k == "scaled_fp8":
            continue
        scale = stored.get(k[: -len("weight")] + "scale_weight")
        if keep_fp8 and scale is not None:
            assert got[k].dtype == torch.float8_e4m3fn and torch.equal(got[k], v), k
            assert torch.equal(expert.get_submodule(keymaps.transformer_to_diffusers({k: v}).popitem()[0][: -len(".weight")])
                               .weight_scale, scale), k
            continue
        want = (v.float() * scale if scale is not None else v).to(v.dtype if keep_fp8 else torch.bfloat16)
        assert torch.equal(got[k], want.to(got[k].dtype)), k


def test_umt5_loads_one_tensor_at_a_time(tmp_path):
    """The text encoder too (an fp16 umt5_xxl file loaded as bf16 was 2 x 11 GB on the device): the model plus
    one tensor in flight, the embedding table read once and tied."""
    from safetensors.torch import save_file
    from transformers import UMT5Config, UMT5EncoderModel

    from wanrt.model.loading import load_umt5
    from wanrt.model.tiny import TINY_UMT5_CONFIG
    from wanrt.runtime.memory import module_bytes

    torch.manual_seed(0)
    te = UMT5EncoderModel(UMT5Config(**{**TINY_UMT5_CONFIG, "num_layers": 6, "vocab_size": 132}))
    stored = {k: v.half().contiguous() for k, v in te.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(stored, str(tmp_path / "umt5_xxl_fp16.safetensors"))
    with LiveStorages() as live:
        loaded = load_umt5(tmp_path / "umt5_xxl_fp16.safetensors", "cpu", torch.bfloat16)
    model = module_bytes(loaded)
    one = max(v.numel() for v in stored.values()) * (2 + 2)  # the largest tensor: its fp16 source and bf16 copy
    assert live.peak <= model + one, (live.peak, model, one)
    assert live.now == model
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight
    got = loaded.state_dict()
    for k, v in stored.items():
        assert torch.equal(got[k], v.to(torch.bfloat16).to(got[k].dtype)), k


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_artifacts_load_one_tensor_at_a_time_into_the_resident_experts(tmp_path, monkeypatch, precision):
    """`wanrt build` weights go into the experts already on the device one tensor at a time (the whole artifact,
    and for FP8 its dequantized copy, beside a resident expert did not fit an 80 GB card)."""
    import json

    from safetensors.torch import save_file

    from wanrt.model.tiny import build_tiny_model
    from wanrt.runtime import artifacts
    from wanrt.runtime.fp8 import dequantize_weight, quantize_weight

    served = build_tiny_model()
    expected, manifest = {}, {"base": {"model": "tiny"}, "precision": precision, "experts": {}}
    for name, expert in served.experts.items():
        sd, expected[name] = {}, {}
        for k, v in expert.state_dict().items():
            v = v + 0.01  # fused: other weights than the served ones
            if precision == "fp8" and k.endswith(".weight") and v.ndim == 2:
                sd[k], sd[k[: -len("weight")] + "weight_scale"] = quantize_weight(v)
                expected[name][k] = dequantize_weight(*quantize_weight(v))
            else:
                sd[k] = v.to(torch.bfloat16) if precision == "bf16" else v
                expected[name][k] = sd[k].float()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
        manifest["experts"][name] = {"weights": f"{name}.safetensors"}
    (tmp_path / artifacts.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(artifacts, "base_fingerprint", lambda spec: {"model": "tiny"})  # not built inside the count
    # about one tensor: its e4m3 source, two fp32 temporaries (dequantize_weight), and a byte an element of slack
    one = max(v.numel() for v in served.transformer_high.state_dict().values()) * (1 + 4 + 4 + 1)
    with LiveStorages() as live:
        artifacts.load_artifacts_into(served, tmp_path, "tiny")
    assert live.peak <= one, (live.peak, one)
    for name, expert in served.experts.items():
        for k, v in expert.state_dict().items():
            assert torch.equal(v, expected[name][k]), k

"""Writing model files for the loader tests: the layouts the loaders read, made from the tiny model.

The runtime only reads checkpoints; writers live with the tests that need them. (loading.save_single_files stays in
the package for now: tests/test_tiers.py and benchmarks/bench_memory.py import it from there.)
"""

from __future__ import annotations

import json
from pathlib import Path

from wanrt.model.components import WanI2VModel


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

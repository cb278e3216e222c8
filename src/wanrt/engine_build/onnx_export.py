"""Expert -> ONNX with dynamic batch (1, or 2 for CFG), frames, height and width; onnxruntime parity.

Only the dynamo exporter handles this model (the legacy one fails on aten::rms_norm and bakes RoPE shapes
in). Opset 18 (TensorRT 10 reads it). Weights over 2 GB go to an external-data file beside the .onnx.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The I/O names are the contract with the TensorRT backend, so they live in the runtime.
from wanrt.runtime.artifacts import INPUT_NAMES, OUTPUT_NAMES

OPSET = 18


class ExpertForExport(torch.nn.Module):
    """Positional inputs, one tensor out: what ONNX and TensorRT see."""

    def __init__(self, expert):
        super().__init__()
        self.expert = expert

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return self.expert(hidden_states=hidden_states, timestep=timestep,
                           encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def sample_inputs(expert, batch=2, latent_frames=3, latent_h=8, latent_w=12, text_len=512, seed=0):
    cfg = expert.config
    g = torch.Generator("cpu").manual_seed(seed)
    device, dtype = next(expert.parameters()).device, expert.dtype
    return (
        torch.randn(batch, cfg.in_channels, latent_frames, latent_h, latent_w, generator=g).to(device, dtype),
        torch.full((batch,), 700.0, device=device),
        torch.randn(batch, text_len, cfg.text_dim, generator=g).to(device, dtype),
    )


def export_expert(expert, path: Path, max_latent_frames: int = 31, max_latent_side: int = 128,
                  text_len: int = 512) -> Path:
    """Dynamic axes: batch 1-2, latent frames 1-31 (121 frames), latent height/width even, up to 128 (1024 px)."""
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = Dim("batch", min=1, max=2)
    frames = Dim("latent_frames", min=1, max=max_latent_frames)
    half_h = Dim("latent_half_h", min=2, max=max_latent_side // 2)
    half_w = Dim("latent_half_w", min=2, max=max_latent_side // 2)
    dynamic = {"hidden_states": {0: batch, 2: frames, 3: 2 * half_h, 4: 2 * half_w},
               "timestep": {0: batch}, "encoder_hidden_states": {0: batch}}
    module = ExpertForExport(expert).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in expert.parameters())
    with torch.no_grad():
        program = torch.onnx.export(module, sample_inputs(expert, text_len=text_len), dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=dynamic, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                    external_data=n_bytes > 1.5 * 2**30, verbose=False)
    program.save(str(path), external_data=n_bytes > 1.5 * 2**30)
    return path


@dataclass
class ParityResult:
    shape: tuple
    max_abs_error: float
    rel_error: float


def onnx_parity(expert, onnx_path: Path, shapes=((1, 3, 6, 10), (2, 2, 8, 8)), text_len: int = 512,
                seed: int = 1) -> list[ParityResult]:
    """Run the ONNX file in onnxruntime (CPU) and torch on the same inputs, for several dynamic shapes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = ExpertForExport(expert).eval()
    results = []
    for batch, f, h, w in shapes:
        inputs = sample_inputs(expert, batch, f, h, w, text_len, seed)
        with torch.no_grad():
            ref = module(*inputs).float().cpu().numpy()
        feeds = {name: t.float().cpu().numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True)}
        got = session.run(None, feeds)[0]
        err = float(np.abs(ref - got).max())
        rel = float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-30))
        results.append(ParityResult((batch, expert.config.in_channels, f, h, w), err, rel))
    return results

"""First-frame preparation: orientation, RGB, cover-resize and centre-crop to the requested size."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover width x height and crop the centre (no stretching, no borders).

    The crop is taken in source coordinates (the centred region with the output's aspect ratio) and resampled
    straight to width x height, so memory is bounded by the input plus the output whatever the shape: scaling
    first and cropping after would make a 1x100000 strip 256x25,600,000 (~20 GB) to cover 256x256."""
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size == (width, height):
        return image
    w, h = image.size
    scale = max(width / w, height / h)
    crop_w, crop_h = min(w, width / scale), min(h, height / scale)  # one of them is the full side
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return image.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor does."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0

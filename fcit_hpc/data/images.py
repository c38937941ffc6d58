"""Image loading for the embedded LLaVA models: RGB, resized, scaled to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fcit_hpc.errors import DataError


def open_rgb(path: str) -> Image.Image:
    """The image at ``path`` decoded as RGB; an error naming the file if it does not open."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def load_image(path: str | None, size: int) -> torch.Tensor:
    """[3, size, size] float32; a grey image when the sample has none."""
    if path is None:
        return torch.zeros(3, size, size)
    arr = np.asarray(open_rgb(path).resize((size, size), Image.BILINEAR), np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0

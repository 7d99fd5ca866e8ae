"""Pictures for people: arrays in [0, 1] to PIL images, grids, PNG files."""

from __future__ import annotations

import math
from pathlib import Path
import numpy as np
from PIL import Image


def to_pil(images) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] (or a list of PIL images) -> list of PIL images."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        return list(images)
    a = np.asarray(images, dtype=np.float32)
    if a.ndim == 3:
        a = a[None]
    return [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in a]


def grid(images, cols: int | None = None, pad: int = 2, background: int = 255) -> Image.Image:
    """Tiles images into one picture, `cols` per row (default: as square as possible)."""
    pics = to_pil(images)
    if not pics:
        raise ValueError("grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(pics)))
    rows = math.ceil(len(pics) / cols)
    w, h = max(p.width for p in pics), max(p.height for p in pics)
    out = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (background,) * 3)
    for i, p in enumerate(pics):
        r, c = divmod(i, cols)
        out.paste(p, (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def save_images(images, out_dir: str | Path, prefix: str = "image", cols: int | None = None) -> list[Path]:
    """Writes one PNG per image and `<prefix>_grid.png`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(to_pil(images)):
        paths.append(out_dir / f"{prefix}_{i:03d}.png")
        p.save(paths[-1])
    paths.append(out_dir / f"{prefix}_grid.png")
    grid(images, cols).save(paths[-1])
    return paths

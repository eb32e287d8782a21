"""Procedural stand-ins for catalog datasets, written in each dataset's *real* layout.

Tests and the quickstart need data without downloads, and the code reading it must be the
code that reads the real datasets. So the generator asks the entry's layout
(``layouts.LAYOUTS``) to write the same folders, file names and split or list files the real
dataset has (for a split-JSON benchmark also the official lists or ``.mat`` files CoOp
re-splits from, ``official.RULES``), filled with small drawn images: each class is one
coloured shape on a noisy grey background, with jittered colour, size and position, so
classes are distinguishable and a model can learn them, while no two images are identical.

Output is a pure function of (entry, images_per_class, image_size, seed, num_classes):
each image draws from its own ``numpy`` generator seeded with (seed, label, index), so the
same arguments give byte-identical files, and a class's images do not depend on how many
classes were generated.

Per class the images are split 50/20/30 into train/val/test, the ratio CoOp uses when it
regenerates a split (``cuts.split_counts``; Dassl ``read_and_split_data``). The default of
40 images per class leaves 20 training images, enough for the 16-shot protocol.

Small-world entries (``CatalogEntry.world``) are drawn by ``smallworld.render_task_image``
instead, with the entry's own default image count (80: 40/16/24), same layout and seeding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlprompt.datasets.catalog import CatalogEntry, get_entry
from vlprompt.datasets.files import MARKER_FILE
from vlprompt.datasets.layout import StandIn
from vlprompt.datasets.layouts import layout_of
from vlprompt.datasets.smallworld import render_task_image

__all__ = ["MARKER_FILE", "RGB", "generate_dataset", "render"]

MIN_IMAGES_PER_CLASS = 4  # smallest count for which 50/20/30 leaves no split empty
MIN_IMAGE_SIZE = 8

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 40),
    "orange": (245, 135, 20),
    "purple": (135, 50, 190),
    "cyan": (40, 215, 225),
    "pink": (245, 140, 200),
}


def generate_dataset(
    name: str,
    root: str | Path,
    *,
    images_per_class: int | None = None,
    image_size: int = 32,
    seed: int = 0,
    num_classes: int | None = None,
) -> Path:
    """Write a procedural copy of catalog entry ``name`` under ``root``; return its folder.

    ``num_classes`` keeps the first N classes of the entry (labels 0..N-1). The folder is
    built under a temporary name and renamed into place, so a reader never sees half a
    dataset and concurrent callers (several trials starting at once) do not clash. If the
    folder already exists and was generated with the same arguments it is reused as is;
    any other existing folder (different arguments, or real data) raises
    ``FileExistsError`` — the generator never deletes or overwrites a dataset.
    """
    entry = get_entry(name)
    params = _params(entry, images_per_class, image_size, seed, num_classes)
    root = Path(root)
    final = root / entry.folder
    if final.exists():
        return _reuse(final, params)
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{entry.folder}.partial-", dir=root))
    try:
        os.chmod(partial, 0o755)  # mkdtemp makes it private; the dataset should not be
        _write(entry, partial, params)
        try:
            partial.rename(final)
        except OSError:
            if final.exists():  # another process finished first
                return _reuse(final, params)
            raise
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return final


def _params(
    entry: CatalogEntry, images_per_class: int | None, image_size: int, seed: int, num_classes: int | None
) -> dict[str, Any]:
    """The checked arguments, as recorded in the marker file (defaults filled in)."""
    if images_per_class is None:
        images_per_class = entry.images_per_class
    n_classes = len(entry.class_folders) if num_classes is None else num_classes
    if not 1 <= n_classes <= len(entry.class_folders):
        raise ValueError(
            f"num_classes must be between 1 and {len(entry.class_folders)} for {entry.name!r}, "
            f"got {num_classes}"
        )
    if images_per_class < MIN_IMAGES_PER_CLASS:
        raise ValueError(
            f"images_per_class must be at least {MIN_IMAGES_PER_CLASS} so that the 50/20/30 "
            f"train/val/test split leaves no split empty, got {images_per_class}"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return {
        "generator": "vlprompt.datasets.generate",
        "version": 1,
        "name": entry.name,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
        "num_classes": n_classes,
    }


def _reuse(folder: Path, params: dict[str, Any]) -> Path:
    marker = folder / MARKER_FILE
    if not marker.is_file():
        raise FileExistsError(
            f"{folder} exists and was not written by the generator (no {MARKER_FILE}); "
            f"refusing to touch it. Use another root or remove the folder yourself."
        )
    found = json.loads(marker.read_text(encoding="utf-8"))
    if found != params:
        raise FileExistsError(
            f"{folder} was generated with {found}, not {params}; remove it or use another root"
        )
    return folder


def _write(entry: CatalogEntry, folder: Path, params: dict[str, Any]) -> None:
    """The entry's layout writes the stand-in; the marker goes last, so it marks a complete folder."""

    def draw(style: int, index: int) -> Image.Image:
        rng = np.random.default_rng([params["seed"], style, index])
        if entry.world:
            return render_task_image(entry.world, style, params["image_size"], rng)
        return render(entry.styles[style], params["image_size"], rng)

    stand_in = StandIn(params["num_classes"], params["images_per_class"], params["image_size"], draw, _save)
    layout_of(entry).write(entry, folder, stand_in)
    text = json.dumps(params, indent=2, sort_keys=True)
    (folder / MARKER_FILE).write_text(text + "\n", encoding="utf-8")


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path)


def render(style: tuple[str, str], size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size``×``size`` RGB image: a jittered ``(colour, shape)`` on a noisy grey ground."""
    colour, shape = style
    grey = int(rng.integers(70, 140))
    noise = rng.integers(-20, 21, size=(size, size, 1)) + rng.integers(-8, 9, size=(size, size, 3))
    image = Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8), "RGB")
    fill = tuple(int(v) for v in np.clip(np.array(RGB[colour]) + rng.integers(-20, 21, size=3), 0, 255))
    r = float(size * rng.uniform(0.22, 0.34))
    cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        t = 0.3 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image

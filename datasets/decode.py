"""Decoding image files with Pillow alone: ``load_image`` and ``drop_unreadable``.

They live apart from ``images.py`` (the torch ``Dataset`` and transforms) because the
orchestrator and the data doctor check images before anything needs torch: ``import
vlprompt.datasets`` stays free of torch and torchvision, so validating a config or walking a
data root does not pay for them.

A corrupt or unreadable image is an ``OSError`` naming the file (``load_image``); skipping
such images is an explicit choice, made with ``drop_unreadable`` before a run starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from vlprompt.datasets.types import Datum


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, fully decoded; a bad file raises ``OSError`` naming it.

    Decoding here (``convert`` forces it) instead of lazily inside a transform means a
    truncated or corrupt file fails with its path rather than deep inside a worker.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise OSError(f"cannot read image {path}: {exc}") from exc


def drop_unreadable(items: Sequence[Datum]) -> tuple[tuple[Datum, ...], tuple[str, ...]]:
    """The items whose image decodes, in order, and the paths of those that do not.

    Each image is fully decoded with ``load_image`` (``Image.open`` + ``convert``, which
    reads every pixel, unlike ``Image.verify``), so a truncated JPEG, an empty file or a
    non-image with an image suffix is caught here rather than in a data-loader worker.
    A path listed twice is decoded once; unreadable paths are returned once each, in order
    of first appearance. This is the explicit opt-in to skipping bad images (the caller
    logs the count, e.g. the orchestrator's ``data.skip_bad_images``); without it
    ``load_image`` raises ``OSError`` naming the file. It costs one decode of every image.
    """
    readable: dict[str, bool] = {}
    kept: list[Datum] = []
    for item in items:
        if item.path not in readable:
            try:
                load_image(item.path)
            except OSError:
                readable[item.path] = False
            else:
                readable[item.path] = True
        if readable[item.path]:
            kept.append(item)
    return tuple(kept), tuple(path for path, ok in readable.items() if not ok)

"""Turning ``Datum`` items into tensors: a map-style torch ``Dataset`` and the CoOp transforms.

The transforms are the Dassl/CoOp ones (``reference/METHODS.md`` §0 "Transforms"); the
caller passes the backbone's own input size, mean and std so a non-224 or non-OpenAI
backbone gets matching preprocessing. Their ``repr`` lists every step and parameter, so
the orchestrator can log the exact transform with each run (transform drift silently moved
results in CoOp #8, #26, #88).

A corrupt or unreadable image is an ``OSError`` naming the file (``load_image``); skipping
such images is an explicit choice, made with ``drop_unreadable`` before a run starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

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


class ImageDataset(Dataset):
    """``(transform(image), label)`` for each ``Datum``, in the given order."""

    def __init__(self, items: Sequence[Datum], transform: Callable[[Image.Image], Any]):
        self.items = tuple(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.items[index]
        return self.transform(load_image(item.path)), item.label


def train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.08
) -> T.Compose:
    """RandomResizedCrop(scale min_scale-1, bicubic) → horizontal flip → tensor → normalise (Dassl).

    ``min_scale`` 0.08 is the reference (``INPUT.RRCROP_SCALE``); tiny images (the small world's
    32 px) lose what defines their class in crops that small, hence the option.
    """
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    return T.Compose(
        [
            T.RandomResizedCrop(
                image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def test_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the shorter side (bicubic) → centre crop → tensor → normalise (Dassl test)."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


# The name starts with "test_": stop pytest from collecting it as a test wherever a test
# module imports it.
test_transform.__test__ = False  # type: ignore[attr-defined]

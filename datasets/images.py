"""Turning ``Datum`` items into tensors: a map-style torch ``Dataset`` and the CoOp transforms.

The only torch-using modules of the package are this one and ``views.py``; import them by
name (``from vlprompt.datasets.images import ImageDataset``): ``import vlprompt.datasets``
does not pull in torch.

The transforms are the Dassl/CoOp ones (Dassl ``data/transforms/transforms.py``
``build_transform``, CoOp's ``configs/trainers/*/vit_b16*.yaml`` ``INPUT`` settings); the
caller passes the backbone's own input size, mean and std so a non-224 or non-OpenAI
backbone gets matching preprocessing. Their ``repr`` lists every step and parameter, so
the orchestrator can log the exact transform with each run (transform drift silently moved
results in CoOp #8, #26, #88).

Images are decoded with ``decode.load_image`` (Pillow only), so a corrupt file is an
``OSError`` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from vlprompt.datasets.decode import load_image
from vlprompt.datasets.types import Datum


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

"""The test-time view transform (TPT's AugMixAugmenter): original + random views."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlprompt.datasets.images import ImageDataset, test_transform
from vlprompt.datasets.types import Datum
from vlprompt.datasets.views import AUGMIX_OPS, AugmentedViews, augmix, test_time_views

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A non-square, textured image (so crops, flips and the AugMix ops all change pixels)."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 1, 3))
    noise = rng.integers(0, 60, size=(40, 48, 3))
    return Image.fromarray(np.clip(x + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("use_augmix", [False, True])
def test_shapes_and_the_original_is_the_test_transform(image: Image.Image, use_augmix: bool) -> None:
    transform = test_time_views(24, CLIP_MEAN, CLIP_STD, 5, augmix=use_augmix)
    original, views = transform(image)
    assert (original.shape, views.shape) == ((3, 24, 24), (5, 3, 24, 24))
    assert original.dtype == views.dtype == torch.float32
    assert torch.equal(original, test_transform(24, CLIP_MEAN, CLIP_STD)(image))
    assert all(not torch.equal(views[i], views[j]) for i in range(5) for j in range(i + 1, 5))
    assert not any(torch.equal(view, original) for view in views)


def test_seeded_views_repeat_and_the_transform_pickles(image: Image.Image) -> None:
    for use_augmix in (False, True):
        transform = test_time_views(24, CLIP_MEAN, CLIP_STD, 4, augmix=use_augmix)
        copy = pickle.loads(pickle.dumps(transform))
        assert isinstance(copy, AugmentedViews) and repr(copy) == repr(transform)
        torch.manual_seed(0)
        first = transform(image)[1]
        second = transform(image)[1]
        torch.manual_seed(0)
        again = copy(image)[1]
        assert not torch.equal(first, second)
        assert torch.equal(first, again)


def test_augmix_mixes_the_crop_with_augmented_chains(image: Image.Image) -> None:
    plain = test_time_views(24, CLIP_MEAN, CLIP_STD, 8)
    mixed = test_time_views(24, CLIP_MEAN, CLIP_STD, 8, augmix=True)
    torch.manual_seed(3)
    crop = plain.crop(image)
    clean = plain.preprocess(crop)
    out = augmix(crop, clean, plain.preprocess, severity=1)
    assert out.shape == clean.shape and not torch.equal(out, clean)
    # a convex mix of images in [0, 1] stays in the normalised range of [0, 1]
    low = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    high = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (out >= low[:, None, None] - 1e-5).all() and (out <= high[:, None, None] + 1e-5).all()
    assert "AugMix(severity=1, width=3, depth=1-3" in repr(mixed) and "AugMix" not in repr(plain)


@pytest.mark.parametrize("op", AUGMIX_OPS, ids=lambda op: op.__name__)
def test_each_augmix_op_keeps_size_and_mode(image: Image.Image, op) -> None:
    torch.manual_seed(0)
    out = op(image, 10)
    assert out.size == image.size and out.mode == "RGB"
    if op.__name__ not in ("equalize", "autocontrast"):  # those two may leave an image unchanged
        assert not np.array_equal(np.asarray(out), np.asarray(image))


def test_reference_settings_are_the_defaults() -> None:
    text = repr(test_time_views(224, CLIP_MEAN, CLIP_STD, 63))
    assert "Resize(size=224, interpolation=bicubic" in text and "CenterCrop(size=(224, 224))" in text
    assert "RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0)" in text
    assert "interpolation=bilinear" in text and "RandomHorizontalFlip" in text and "63 x" in text
    text = repr(test_time_views(224, CLIP_MEAN, CLIP_STD, 63, min_scale=0.5, interpolation="bicubic"))
    assert "scale=(0.5, 1.0), ratio=(0.75, 1.3333), interpolation=bicubic" in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_views": 0}, "n_views"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"augmix": 1}, "augmix"),
        ({"severity": 0}, "severity"),
        ({"interpolation": "nearest"}, "interpolation"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    kwargs = {"n_views": 2, **options}
    with pytest.raises(ValueError, match=message):
        test_time_views(24, CLIP_MEAN, CLIP_STD, **kwargs)


@pytest.mark.e2e  # spawns DataLoader worker processes (seconds)
def test_runs_in_spawned_dataloader_workers(image: Image.Image, tmp_path: Path) -> None:
    """Spawned workers receive the transform pickled, as on any platform without fork."""
    path = tmp_path / "image.png"
    image.save(path)
    transform = test_time_views(16, CLIP_MEAN, CLIP_STD, 3, augmix=True)
    data = ImageDataset([Datum(str(path), 0, "thing")] * 2, transform)
    loader = DataLoader(data, batch_size=1, num_workers=1, multiprocessing_context="spawn")
    batches = [views for (original, views), label in loader]
    assert [tuple(v.shape) for v in batches] == [(1, 3, 3, 16, 16)] * 2
    assert not torch.equal(batches[0], batches[1])

"""ImageDataset and the Dassl/CoOp transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlprompt.datasets import Datum, ImageDataset, load_dataset, test_transform, train_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_test_transform_normalises_exactly(synthetic_root: Path) -> None:
    splits = load_dataset("synthetic", synthetic_root)
    data = ImageDataset(splits.test, test_transform(32, CLIP_MEAN, CLIP_STD))
    assert len(data) == len(splits.test)
    x, y = data[7]
    assert (x.shape, x.dtype) == ((3, 32, 32), torch.float32)
    assert y == splits.test[7].label
    raw = np.asarray(Image.open(splits.test[7].path).convert("RGB"), dtype=np.float32) / 255.0
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expected = (torch.from_numpy(raw).permute(2, 0, 1) - mean) / std
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_test_transform_resizes_shorter_side_then_crops(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path)
    x, _ = ImageDataset([Datum(str(path), 0, "red")], test_transform(16, (0.5,) * 3, (0.5,) * 3))[0]
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[0], torch.ones(16, 16))  # red: (1 - 0.5) / 0.5
    torch.testing.assert_close(x[1], -torch.ones(16, 16))


def test_train_transform_is_random_and_seedable(synthetic_root: Path) -> None:
    splits = load_dataset("synthetic", synthetic_root)
    data = ImageDataset(splits.train, train_transform(24, CLIP_MEAN, CLIP_STD))
    torch.manual_seed(0)
    a, _ = data[0]
    b, _ = data[0]
    torch.manual_seed(0)
    a_again, _ = data[0]
    assert a.shape == (3, 24, 24)
    assert not torch.equal(a, b)
    assert torch.equal(a, a_again)


def test_transforms_are_the_reference_ones() -> None:
    train = repr(train_transform(224, CLIP_MEAN, CLIP_STD))
    test = repr(test_transform(224, CLIP_MEAN, CLIP_STD))
    assert "RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0)" in train
    assert "interpolation=bicubic" in train and "RandomHorizontalFlip" in train
    assert "Resize(size=224, interpolation=bicubic" in test and "CenterCrop(size=(224, 224))" in test
    for text in (train, test):
        assert "ToTensor()" in text and "Normalize(mean=[0.48145466" in text


def test_batches_through_a_dataloader(synthetic_root: Path) -> None:
    splits = load_dataset("synthetic", synthetic_root)
    loader = DataLoader(ImageDataset(splits.val, test_transform(16, CLIP_MEAN, CLIP_STD)), batch_size=8)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 16, 16)
    assert y.tolist() == [d.label for d in splits.val[:8]]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_unreadable_image_names_the_file(synthetic_root: Path, tmp_path: Path, kind: str) -> None:
    good = Path(load_dataset("synthetic", synthetic_root).train[0].path).read_bytes()
    bad = tmp_path / f"{kind}.png"
    content = {"garbage": b"not an image at all", "truncated": good[: len(good) // 2], "empty": b""}
    bad.write_bytes(content[kind])
    data = ImageDataset([Datum(str(bad), 0, "red circle")], test_transform(16, CLIP_MEAN, CLIP_STD))
    with pytest.raises(OSError, match="cannot read image") as err:
        data[0]
    assert str(bad) in str(err.value)

"""ImageDataset, the Dassl/CoOp transforms, and unreadable images (an error, or dropped and counted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlprompt.datasets import Datum, drop_unreadable, generate_dataset, load_dataset, load_image
from vlprompt.datasets.images import ImageDataset, test_transform, train_transform

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


def break_images(root: Path) -> tuple[list[Datum], dict[str, Path]]:
    """A generated JPEG tree (2 classes x 4) with three images broken three ways."""
    generate_dataset("eurosat", root, images_per_class=4, num_classes=2, image_size=48)
    splits = load_dataset("eurosat", root)
    items = list(splits.train + splits.val + splits.test)
    truncated, empty, text = (Path(items[i].path) for i in (1, 4, 6))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 3])  # cut in the scan
    empty.write_bytes(b"")
    text.write_text("label,path\n0,forest.jpg\n")  # a text file with a .jpg name
    return items, {"truncated": truncated, "empty": empty, "text": text}


def test_truncated_jpeg_passes_verify_but_not_a_full_decode(tmp_path: Path) -> None:
    _, bad = break_images(tmp_path)
    with Image.open(bad["truncated"]) as image:
        image.verify()  # what a header check would accept
    with pytest.raises(OSError, match=r"cannot read image .*truncated"):
        load_image(str(bad["truncated"]))


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_without_the_option_a_bad_jpeg_is_an_error_naming_it(tmp_path: Path, kind: str) -> None:
    items, bad = break_images(tmp_path)
    with pytest.raises(OSError, match="cannot read image") as err:
        load_image(str(bad[kind]))
    assert str(bad[kind]) in str(err.value)
    index = next(i for i, d in enumerate(items) if d.path == str(bad[kind]))
    with pytest.raises(OSError, match="cannot read image") as err:
        ImageDataset(items, test_transform(16, CLIP_MEAN, CLIP_STD))[index]
    assert str(bad[kind]) in str(err.value)


def test_drop_unreadable_keeps_order_and_counts_the_bad(tmp_path: Path) -> None:
    items, bad = break_images(tmp_path)
    kept, dropped = drop_unreadable(items)
    assert dropped == tuple(str(p) for p in (bad["truncated"], bad["empty"], bad["text"]))
    assert kept == tuple(d for d in items if d.path not in dropped)
    assert len(kept) == 5
    for item in kept:
        load_image(item.path)
    twice = items + items[:2]  # a path listed twice is decoded once and reported once
    kept, dropped = drop_unreadable(twice)
    assert len(kept) == 6 and len(dropped) == 3
    assert drop_unreadable([]) == ((), ())
    missing = Datum(str(tmp_path / "gone.jpg"), 0, "x")
    assert drop_unreadable([missing]) == ((), (missing.path,))

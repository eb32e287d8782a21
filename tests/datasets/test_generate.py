"""The procedural generator: deterministic, safe to call twice, and its images show their class."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlprompt.datasets import generate_dataset, get_entry, load_dataset
from vlprompt.datasets.generate import MARKER_FILE, RGB


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = generate_dataset("oxford_pets", tmp_path / "a", images_per_class=5, num_classes=4, seed=3)
    b = generate_dataset("oxford_pets", tmp_path / "b", images_per_class=5, num_classes=4, seed=3)
    files = files_of(a)
    assert len(files) == 4 * 5 + 4  # images, split file, 2 annotation lists, marker
    assert files == files_of(b)


OFFICIAL_FILES = {  # what make_split reads, beside the split JSON (CoOp datasets/*.py)
    "stanford_cars": {
        "devkit/cars_meta.mat",
        "devkit/cars_train_annos.mat",
        "cars_test_annos_withlabels.mat",
    },
    "oxford_flowers": {"imagelabels.mat", "cat_to_name.json"},
    "sun397": {"ClassName.txt", "Training_01.txt", "Testing_01.txt"},
    "ucf101": {f"ucfTrainTestlist/{f}.txt" for f in ("classInd", "trainlist01", "testlist01")},
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_FILES))
def test_official_files_written_and_byte_identical(tmp_path: Path, name: str) -> None:
    a = generate_dataset(name, tmp_path / "a", images_per_class=5, num_classes=3, image_size=8)
    b = generate_dataset(name, tmp_path / "b", images_per_class=5, num_classes=3, image_size=8)
    files = files_of(a)
    entry = get_entry(name)
    images = {f for f in files if f.endswith(".jpg")}
    assert len(images) == 15
    assert set(files) - images == {entry.split_file, MARKER_FILE, *OFFICIAL_FILES[name]}
    assert files == files_of(b)  # .mat files too: no creation time in their header


def test_real_file_names_where_a_pattern_cannot_say_them(tmp_path: Path) -> None:
    flowers = generate_dataset("oxford_flowers", tmp_path, images_per_class=4, num_classes=2)
    assert sorted(p.name for p in (flowers / "jpg").iterdir()) == [f"image_{i:05d}.jpg" for i in range(1, 9)]
    generate_dataset("stanford_cars", tmp_path, images_per_class=4, num_classes=2)
    cars = load_dataset("stanford_cars", tmp_path)
    assert {Path(d.path).parent.name for d in cars.train + cars.val} == {"cars_train"}
    assert {Path(d.path).parent.name for d in cars.test} == {"cars_test"}
    generate_dataset("ucf101", tmp_path, images_per_class=4, num_classes=2)
    ucf = load_dataset("ucf101", tmp_path)
    assert ucf.train[0].path.endswith("Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg")


def test_other_seed_changes_images_not_split(tmp_path: Path) -> None:
    a = generate_dataset("synthetic", tmp_path / "a", images_per_class=4, num_classes=2, seed=0)
    b = generate_dataset("synthetic", tmp_path / "b", images_per_class=4, num_classes=2, seed=1)
    split = get_entry("synthetic").split_file
    assert (a / split).read_bytes() == (b / split).read_bytes()
    image = "images/red_circle/1.png"
    assert (a / image).read_bytes() != (b / image).read_bytes()


def test_class_images_do_not_depend_on_class_count(tmp_path: Path) -> None:
    few = generate_dataset("eurosat", tmp_path / "few", images_per_class=4, num_classes=2)
    many = generate_dataset("eurosat", tmp_path / "many", images_per_class=4)
    for rel, content in files_of(few / "2750").items():
        assert (many / "2750" / rel).read_bytes() == content
    assert load_dataset("eurosat", tmp_path / "few").classnames == ("Annual Crop Land", "Forest")


def test_second_call_reuses_same_arguments_and_refuses_others(tmp_path: Path) -> None:
    first = generate_dataset("synthetic", tmp_path, images_per_class=4, num_classes=2)
    marker = (first / MARKER_FILE).read_bytes()
    assert generate_dataset("synthetic", tmp_path, images_per_class=4, num_classes=2) == first
    assert (first / MARKER_FILE).read_bytes() == marker
    with pytest.raises(FileExistsError, match="was generated with"):
        generate_dataset("synthetic", tmp_path, images_per_class=5, num_classes=2)
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no partial folders left


def test_never_touches_a_folder_it_did_not_write(tmp_path: Path) -> None:
    real = tmp_path / "eurosat"
    real.mkdir()
    (real / "split_zhou_EuroSAT.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not written by the generator"):
        generate_dataset("eurosat", tmp_path)
    assert (real / "split_zhou_EuroSAT.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images_per_class": 3}, "at least 4"),
        ({"num_classes": 0}, "between 1 and 16"),
        ({"num_classes": 17}, "between 1 and 16"),
        ({"image_size": 4}, "image_size"),
        ({"seed": -1}, "non-negative"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_dataset("synthetic", tmp_path, **kwargs)
    assert not (tmp_path / "synthetic").exists()


def test_fast_enough_for_tests(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate_dataset("eurosat", tmp_path, images_per_class=20)
    assert time.perf_counter() - start < 3.0  # typically ~0.1 s; generous for a loaded CI box


def describe(path: str) -> tuple[str, str]:
    """(colour, shape) read back from pixels: the saturated blob's mean colour and geometry."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    mask = (a.max(-1) - a.min(-1)) > 50  # the background is grey, every palette colour is not
    mean = a[mask].mean(0)
    colour = min(RGB, key=lambda c: float(((np.array(RGB[c]) - mean) ** 2).sum()))
    ys, xs = np.nonzero(mask)
    blob = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = blob.shape
    fill = blob.mean()
    if fill > 0.9:
        return colour, "square"
    if fill > 0.68:
        return colour, "circle"
    if blob[-1].mean() > 0.6 and blob[0].mean() < 0.5:
        return colour, "triangle"
    v, u = np.mgrid[0:h, 0:w]
    u, v = (u + 0.5) / w * 2 - 1, (v + 0.5) / h * 2 - 1  # -1..1 across the blob
    off_axis = (np.abs(np.abs(u) - 0.45) < 0.12) & (np.abs(np.abs(v) - 0.45) < 0.12)
    return colour, "diamond" if blob[off_axis].mean() > 0.5 else "cross"


def test_synthetic_images_show_their_class_name(synthetic_root: Path) -> None:
    """'red circle' must be a red circle: zero-shot prompts depend on names matching pixels."""
    splits = load_dataset("synthetic", synthetic_root)
    items = splits.train + splits.val + splits.test
    hits = sum(" ".join(describe(d.path)) == d.classname for d in items)
    assert hits / len(items) >= 0.95


def test_jpeg_datasets_draw_each_class_in_its_colour(tmp_path: Path) -> None:
    generate_dataset("eurosat", tmp_path, images_per_class=10)
    splits = load_dataset("eurosat", tmp_path)
    styles = get_entry("eurosat").styles
    hits = sum(describe(d.path)[0] == styles[d.label][0] for d in splits.train)
    assert hits / len(splits.train) >= 0.95

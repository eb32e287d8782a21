"""The CoOp benchmarks: every entry generated in its real layout and read back; readers' traps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprompt.datasets import CATALOG, generate_dataset, get_entry, load_dataset, subsample_classes
from vlprompt.datasets.__main__ import main as cli_main
from vlprompt.datasets.benchmarks import BENCHMARKS
from vlprompt.datasets.generate import MARKER_FILE
from vlprompt.datasets.imagenet_meta import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS
from vlprompt.datasets.layouts import LAYOUTS
from vlprompt.datasets.official import sun397_name, year_first

TEMPLATES = {  # CoOp trainers/zsclip.py CUSTOM_TEMPLATES
    "caltech101": "a photo of a {}.",
    "dtd": "{} texture.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "food101": "a photo of {}, a type of food.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "stanford_cars": "a photo of a {}.",
    "sun397": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
LAYOUT = {  # CoOp DATASETS.md: folder, image dir, split file, #classes
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", 196),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102),
    "food101": ("food-101", "images", "split_zhou_Food101.json", 101),
    "fgvc_aircraft": ("fgvc_aircraft", "images", "", 100),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", 397),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", 47),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101),
    "imagenet": ("imagenet", "images", "", 1000),
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "", 1000),
    "imagenet_sketch": ("imagenet-sketch", "images", "", 1000),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "", 200),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "", 200),
}
TEST_ONLY = {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}


def gen(name: str, root: Path, k: int = 3, per_class: int = 5) -> Path:
    return generate_dataset(name, root, images_per_class=per_class, num_classes=k, image_size=8)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_entry_layout_template_and_reader(name: str) -> None:
    entry = get_entry(name)
    assert entry.template == TEMPLATES[name]
    assert (entry.folder, entry.image_dir, entry.split_file, entry.num_classes) == LAYOUT[name]
    assert entry.layout_name in LAYOUTS


def test_every_entry_has_a_known_reader() -> None:
    assert set(TEMPLATES) <= set(CATALOG)
    assert {e.layout_name for e in CATALOG.values()} <= set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_generated_in_real_layout_and_read_back(tmp_path: Path, name: str) -> None:
    gen(name, tmp_path)
    splits = load_dataset(name, tmp_path)
    entry = get_entry(name)
    expected_names = entry.classnames[:3]
    if name == "imagenet_v2":  # labels are ImageNet's: all 1000 names, 3 folders of images
        assert splits.num_classes == 1000 and splits.classnames[:3] == expected_names
    else:
        assert splits.classnames == expected_names
    if name in TEST_ONLY:
        assert (len(splits.train), len(splits.val), len(splits.test)) == (0, 0, 15)
    elif name == "imagenet":
        assert (len(splits.train), len(splits.val)) == (6, 9) and splits.test == splits.val
    else:
        assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 6)  # 5 → 3/1/1 per class
    assert all(Path(d.path).is_file() for d in splits.train + splits.val + splits.test)
    assert {d.label for d in splits.test} == {0, 1, 2}


def test_class_name_rules() -> None:
    assert get_entry("caltech101").classnames[:5] == ("face", "leopard", "motorbike", "accordion", "airplane")
    assert year_first("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"
    assert get_entry("stanford_cars").classnames[0] == "2000 AM General Hummer SUV"
    assert sun397_name("a/apse/indoor") == "indoor apse"
    assert sun397_name("/a/airplane_cabin") == "airplane cabin"
    assert get_entry("ucf101").classnames[0] == "Apply Eye Makeup"


def test_fgvc_reader_uses_variants_order_and_names_bad_lines(tmp_path: Path) -> None:
    folder = gen("fgvc_aircraft", tmp_path)
    train_list = (folder / "images_variant_train.txt").read_text().splitlines()
    assert train_list[0].split(" ", 1)[1] == "707-320"
    # reorder variants.txt: labels follow its line order
    (folder / "variants.txt").write_text("737-200\n707-320\n727-200\n")
    splits = load_dataset("fgvc_aircraft", tmp_path)
    assert splits.classnames == ("737-200", "707-320", "727-200")
    assert {d.label for d in splits.train if d.classname == "707-320"} == {1}
    (folder / "images_variant_test.txt").write_text("0000001 Boeing 999\n")
    with pytest.raises(ValueError, match=r"images_variant_test.txt line 1: variant 'Boeing 999'"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_imagenet_v2_folders_map_by_number(tmp_path: Path) -> None:
    gen("imagenet_v2", tmp_path, k=12, per_class=4)
    splits = load_dataset("imagenet_v2", tmp_path)
    names = (tmp_path / "imagenetv2" / "classnames.txt").read_text().splitlines()
    from_10 = [d for d in splits.test if Path(d.path).parent.name == "10"]
    assert from_10 and {d.label for d in from_10} == {10}  # string order would make it class 2
    assert {d.classname for d in from_10} == {names[10].split(" ", 1)[1]}
    assert splits.imagenet_labels[10] == 10 and splits.wnids[10] == IMAGENET_WNIDS[10]


@pytest.mark.parametrize(
    ("name", "wnids"), [("imagenet_a", IMAGENET_A_WNIDS), ("imagenet_r", IMAGENET_R_WNIDS)]
)
def test_imagenet_a_r_labels_map_to_the_1000(tmp_path: Path, name: str, wnids: tuple[str, ...]) -> None:
    gen(name, tmp_path, k=4, per_class=4)
    splits = load_dataset(name, tmp_path)
    assert splits.wnids == wnids[:4]  # label = index in the sorted wnid folders; README.txt ignored
    assert splits.imagenet_labels == tuple(IMAGENET_WNIDS.index(w) for w in wnids[:4])
    known = {"imagenet_a": (6, 11, 13, 15), "imagenet_r": (1, 2, 4, 6)}  # timm imagenet_{a,r}_indices.txt
    assert splits.imagenet_labels == known[name]


def test_subsample_keeps_imagenet_mapping(tmp_path: Path) -> None:
    gen("imagenet", tmp_path, k=4, per_class=4)
    new = subsample_classes(load_dataset("imagenet", tmp_path), "new")
    assert new.wnids == IMAGENET_WNIDS[2:4] and new.imagenet_labels == (2, 3)


def test_class_count_mismatch_is_named(tmp_path: Path) -> None:
    folder = gen("imagenet_a", tmp_path, k=3, per_class=4)
    (folder / MARKER_FILE).unlink()  # now it looks like real data with 3 of 200 folders
    with pytest.raises(ValueError, match=r"found 3 class folders in .*imagenet-a, expected 200"):
        load_dataset("imagenet_a", tmp_path)
    marker = {"num_classes": 3}
    (folder / MARKER_FILE).write_text(json.dumps(marker))
    (folder / "imagenet-a" / "n99999999").mkdir()
    with pytest.raises(ValueError, match=r"found 4 class folders"):
        load_dataset("imagenet_a", tmp_path)
    (folder / MARKER_FILE).write_text(json.dumps({"num_classes": 4}))
    with pytest.raises(
        ValueError, match=r"not wnids listed in imagenet-adversarial/classnames.txt.*n99999999"
    ):
        load_dataset("imagenet_a", tmp_path)


def test_missing_classnames_file_says_to_copy_it(tmp_path: Path) -> None:
    folder = gen("imagenet_sketch", tmp_path)
    (folder / "classnames.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"imagenet-sketch/classnames.txt not found \(CoOp DATASETS.md: copy"
    ):
        load_dataset("imagenet_sketch", tmp_path)


def test_flat_imagenet_val_is_explained(tmp_path: Path) -> None:
    folder = gen("imagenet", tmp_path, k=2, per_class=4)
    val = folder / "images" / "val"
    for image in list(val.rglob("*.JPEG")):
        image.rename(val / image.name)
    for sub in [p for p in val.iterdir() if p.is_dir()]:
        sub.rmdir()
    with pytest.raises(ValueError, match=r"holds 4 images directly \(flat ImageNet val.*val/<wnid>/"):
        load_dataset("imagenet", tmp_path)


def test_missing_folder_names_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"fgvc_aircraft/variants.txt"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_doctor_reports_found_missing_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen("dtd", tmp_path)
    gen("fgvc_aircraft", tmp_path)
    gen("imagenet_a", tmp_path)
    names = ["dtd", "fgvc_aircraft", "food101", "imagenet_a"]
    assert cli_main(["doctor", *names[:2], names[3], "--root", str(tmp_path)]) == 0  # all there
    capsys.readouterr()
    assert cli_main(["doctor", *names, "--root", str(tmp_path)]) == 1  # food101 was asked for, is missing
    out = capsys.readouterr().out.splitlines()
    assert (
        out[1].startswith("found    dtd ")
        and "3 of 47 classes, 15 images (train 6 / val 3 / test 6)" in out[1]
    )
    assert out[3].startswith("missing  food101 ")
    assert f"expected under {tmp_path}: food-101/split_zhou_Food101.json" in out[3]
    assert out[-1] == "3 found, 1 missing, 0 broken"

    (tmp_path / "fgvc_aircraft" / "images_variant_val.txt").unlink()
    bad = next((tmp_path / "dtd" / "images").rglob("*.jpg"))
    bad.write_bytes(b"not a jpeg")
    assert cli_main(["doctor", *names, "--root", str(tmp_path), "--verify-images"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("broken   dtd ") and "1 unreadable images" in out[1]
    assert out[2].strip() == f"unreadable: {bad}"
    fgvc = next(line for line in out if line.startswith("broken   fgvc_aircraft"))
    assert f"val list {tmp_path}/fgvc_aircraft/images_variant_val.txt not found" in fgvc
    assert "found    imagenet_a           3 of 200 classes, 15 images" in "\n".join(out)
    assert "all images readable" in "\n".join(out)
    assert out[-1] == "1 found, 1 missing, 2 broken"


def test_doctor_fails_a_root_with_no_dataset_and_not_an_unrequested_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["doctor", "--root", str(tmp_path)]) == 1  # a wrong --root, most likely
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"no dataset under {tmp_path}")
    gen("dtd", tmp_path)
    assert cli_main(["doctor", "--root", str(tmp_path)]) == 0  # the rest missing: nobody asked for them
    assert "0 broken" in capsys.readouterr().out

"""Regenerating a missing split file from the files each dataset ships with (CoOp's rules).

The generator writes, beside its own split JSON, the official annotation files of Pets,
Flowers, Cars, SUN397 and UCF101; deleting the JSON and regenerating it must give the same
images, labels and class names, the reference's ratios, and the same bytes on every machine.
"""

from __future__ import annotations

import random
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat

from vlprompt.datasets import generate_dataset, get_entry, load_dataset, make_split
from vlprompt.datasets.__main__ import main as cli_main
from vlprompt.datasets.makesplit import datasets_with_rules
from vlprompt.datasets.official import RULES, savemat_bytes, sun397_name, ucf101_name
from vlprompt.datasets.splitjson import read_split_file

TRAINVAL_RULES = ("oxford_pets", "stanford_cars", "sun397", "ucf101")  # official train(val)/test, 80/20
OFFICIAL = (*TRAINVAL_RULES, "oxford_flowers")


def gen(name: str, root: Path, k: int = 3, per_class: int = 10) -> Path:
    return generate_dataset(name, root, images_per_class=per_class, num_classes=k, image_size=8)


def regenerate(name: str, root: Path, **kwargs) -> Path:
    folder = gen(name, root, **kwargs)
    (folder / get_entry(name).split_file).unlink()
    make_split(name, root)
    return folder


def by_path(items) -> dict[str, tuple[int, str]]:
    return {d.path: (d.label, d.classname) for d in items}


def test_every_split_json_benchmark_has_a_rule() -> None:
    for name in ("caltech101", "dtd", "eurosat", "food101", *OFFICIAL):
        assert get_entry(name).split_rule in RULES, name
    assert get_entry("oxford_pets").split_rule == "oxford_pets"
    assert {"oxford_pets", "sun397", "ucf101"} <= set(datasets_with_rules())
    assert "fgvc_aircraft" not in datasets_with_rules() and "synthetic" not in datasets_with_rules()


@pytest.mark.parametrize("name", OFFICIAL)
def test_regenerated_from_official_files_matches_generator(tmp_path: Path, name: str) -> None:
    folder = gen(name, tmp_path)
    published = load_dataset(name, tmp_path)
    split = folder / get_entry(name).split_file
    split.unlink()
    assert make_split(name, tmp_path) == split  # written next to the data
    regenerated = load_dataset(name, tmp_path)
    assert regenerated.classnames == published.classnames
    everything = by_path(published.train + published.val + published.test)
    assert by_path(regenerated.train + regenerated.val + regenerated.test) == everything
    if name in TRAINVAL_RULES:  # same official test list; trainval re-cut 80/20 per class
        assert by_path(regenerated.test) == by_path(published.test)
        assert set(by_path(regenerated.train + regenerated.val)) == set(
            by_path(published.train + published.val)
        )
        assert (len(regenerated.train), len(regenerated.val), len(regenerated.test)) == (18, 3, 9)
    else:  # Flowers: 50/20/30 per class of everything imagelabels.mat lists
        assert (len(regenerated.train), len(regenerated.val), len(regenerated.test)) == (15, 6, 9)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("name", OFFICIAL)
def test_same_files_give_same_bytes_and_the_seed_matters(tmp_path: Path, name: str) -> None:
    folder = regenerate(name, tmp_path / "a")
    split = folder / get_entry(name).split_file
    first = split.read_bytes()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / folder.name / split.name).unlink()
    make_split(name, tmp_path / "b")
    assert (tmp_path / "b" / folder.name / split.name).read_bytes() == first
    with pytest.raises(FileExistsError, match="already exists"):
        make_split(name, tmp_path / "a")
    make_split(name, tmp_path / "a", seed=2, overwrite=True)
    assert split.read_bytes() != first


@pytest.mark.parametrize("name", TRAINVAL_RULES)
def test_trainval_cut_is_80_20_per_class(tmp_path: Path, name: str) -> None:
    per_class = 40  # generator: 20 train + 8 val = 28 trainval → val round(5.6) = 6, train 22
    regenerate(name, tmp_path, k=2, per_class=per_class)
    splits = load_dataset(name, tmp_path)
    assert Counter(d.label for d in splits.val) == {0: 6, 1: 6}
    assert Counter(d.label for d in splits.train) == {0: 22, 1: 22}
    assert Counter(d.label for d in splits.test) == {0: 12, 1: 12}
    # rows class by class in label order, as CoOp writes them
    assert [d.label for d in splits.train] == sorted(d.label for d in splits.train)


def test_flowers_cut_is_50_20_30_per_class(tmp_path: Path) -> None:
    regenerate("oxford_flowers", tmp_path, k=2, per_class=15)
    splits = load_dataset("oxford_flowers", tmp_path)
    sizes = [Counter(d.label for d in splits.split(s)) for s in ("train", "val", "test")]
    assert sizes == [{0: 8, 1: 8}, {0: 3, 1: 3}, {0: 4, 1: 4}]  # round(7.5), round(3.0), rest


def test_listing_order_does_not_change_the_split(tmp_path: Path) -> None:
    """Items are sorted before the shuffle: a reordered official list gives the same file."""
    folder = regenerate("oxford_pets", tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lines = (folder / "annotations" / "trainval.txt").read_text().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    other = tmp_path / "b" / "oxford_pets"
    (other / "annotations" / "trainval.txt").write_text("# shuffled\n" + "".join(lines))
    make_split("oxford_pets", tmp_path / "b", overwrite=True)
    name = get_entry("oxford_pets").split_file
    assert (other / name).read_bytes() == (folder / name).read_bytes()
    test_list = [line.split()[0] for line in (folder / "annotations" / "test.txt").read_text().splitlines()]
    assert [Path(d.path).stem for d in load_dataset("oxford_pets", tmp_path / "a").test] == test_list


def test_class_names_are_stored_as_coop_stores_them(tmp_path: Path) -> None:
    expected = {
        "oxford_pets": ("abyssinian", "american_bulldog"),
        "stanford_cars": ("2000 AM General Hummer SUV", "2012 Acura RL Sedan"),
        "sun397": ("abbey", "airplane_cabin"),
        "ucf101": ("Apply_Eye_Makeup", "Apply_Lipstick"),
        "oxford_flowers": ("pink primrose", "hard-leaved pocket orchid"),
    }
    for name, names in expected.items():
        folder = regenerate(name, tmp_path, k=2, per_class=5)
        rows = read_split_file(folder / get_entry(name).split_file)  # reading makes "_" a space
        raw = (folder / get_entry(name).split_file).read_text()
        assert all(f'"{n}"' in raw for n in names), name
        assert {(y, c) for y, c in ((r[1], r[2]) for r in rows["train"])} == {
            (i, n.replace("_", " ")) for i, n in enumerate(names)
        }
    assert sun397_name("/a/apse/indoor", keep_underscores=True) == "indoor apse"
    assert sun397_name("/b/bakery/shop_x", keep_underscores=True) == "shop_x bakery"
    assert ucf101_name("ApplyEyeMakeup") == "Apply_Eye_Makeup" and ucf101_name("YoYo") == "Yo_Yo"


def test_generated_mat_files_read_the_way_coop_reads_them(tmp_path: Path) -> None:
    cars = gen("stanford_cars", tmp_path, k=2, per_class=5)
    anno = loadmat(cars / "devkit" / "cars_train_annos.mat")["annotations"][0]  # CoOp stanford_cars.py
    meta = loadmat(cars / "devkit" / "cars_meta.mat")["class_names"][0]
    assert (anno[0]["fname"][0], int(anno[0]["class"][0, 0])) == ("00101.jpg", 1)
    assert meta[int(anno[-1]["class"][0, 0]) - 1][0] == "Acura RL Sedan 2012"  # the devkit puts the year last
    test = loadmat(cars / "cars_test_annos_withlabels.mat")["annotations"][0]
    assert len(anno) == 2 * 3 and len(test) == 2 * 2
    assert all((cars / "cars_test" / t["fname"][0]).is_file() for t in test)
    flowers = gen("oxford_flowers", tmp_path, k=2, per_class=5)
    labels = loadmat(flowers / "imagelabels.mat")["labels"][0]  # CoOp oxford_flowers.py
    assert labels.tolist() == [1] * 5 + [2] * 5
    assert sorted(p.name for p in (flowers / "jpg").iterdir())[-1] == "image_00010.jpg"
    header = (flowers / "imagelabels.mat").read_bytes()[:116]
    assert header.startswith(b"MATLAB 5.0 MAT-file") and b"Created on" not in header


def test_savemat_bytes_is_deterministic() -> None:
    data = {"labels": np.array([[1, 2, 3]], dtype=np.uint8)}
    assert savemat_bytes(data) == savemat_bytes(data)


def test_load_dataset_writes_a_missing_split_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = gen("sun397", tmp_path)
    split = folder / "split_zhou_SUN397.json"
    split.unlink()
    with pytest.raises(FileNotFoundError, match=r"make-split sun397.*Training_01.txt") as err:
        load_dataset("sun397", tmp_path)
    assert "make_missing_split=True" in str(err.value)
    assert not split.exists()
    splits = load_dataset("sun397", tmp_path, make_missing_split=True)
    assert split.is_file() and (len(splits.train), len(splits.val), len(splits.test)) == (18, 3, 9)
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and str(split) in err_lines[0] and "NOT the published" in err_lines[0]
    first = split.read_bytes()
    assert load_dataset("sun397", tmp_path, make_missing_split=True) == splits  # read, not rewritten
    assert capsys.readouterr().err == "" and split.read_bytes() == first


def test_make_missing_split_without_a_rule_is_the_usual_error(tmp_path: Path) -> None:
    folder = generate_dataset("synthetic", tmp_path, images_per_class=4, num_classes=2)
    (folder / "split_synthetic.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .* not found") as err:
        load_dataset("synthetic", tmp_path, make_missing_split=True)
    assert "make-split" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("oxford_pets", "annotations/test.txt"),
        ("oxford_flowers", "cat_to_name.json"),
        ("stanford_cars", "devkit/cars_meta.mat"),
        ("sun397", "ClassName.txt"),
        ("ucf101", "ucfTrainTestlist/classInd.txt"),
    ],
)
def test_missing_official_file_is_named(tmp_path: Path, name: str, path: str) -> None:
    folder = gen(name, tmp_path, k=2, per_class=5)
    (folder / get_entry(name).split_file).unlink()
    (folder / path).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / path} not found; regenerating")):
        make_split(name, tmp_path)
    assert not (folder / get_entry(name).split_file).exists()


@pytest.mark.parametrize(
    ("name", "path", "bad", "match"),
    [
        (
            "oxford_pets",
            "annotations/trainval.txt",
            "Abyssinian_1 one 1 1\n",
            r"trainval.txt line 1: expected",
        ),
        ("sun397", "Testing_01.txt", "/z/zoo/sun_1.jpg\n", r"Testing_01.txt line 1: class 'z/zoo'"),
        ("ucf101", "ucfTrainTestlist/testlist01.txt", "\nYoYo/v_YoYo_g01_c01.avi\n", r"line 2: action"),
    ],
)
def test_bad_official_line_is_named(tmp_path: Path, name: str, path: str, bad: str, match: str) -> None:
    folder = gen(name, tmp_path, k=2, per_class=5)
    (folder / get_entry(name).split_file).unlink()
    (folder / path).write_text(bad)
    with pytest.raises(ValueError, match=match):
        make_split(name, tmp_path)


def test_missing_listed_image_writes_nothing(tmp_path: Path) -> None:
    folder = gen("ucf101", tmp_path, k=2, per_class=5)
    (folder / "split_zhou_UCF101.json").unlink()
    gone = folder / "UCF-101-midframes" / "Apply_Lipstick" / "v_ApplyLipstick_g05_c01.jpg"
    gone.unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"1 of 10 listed images are missing, the first {gone}")
    ):
        make_split("ucf101", tmp_path)
    assert not (folder / "split_zhou_UCF101.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_too_few_trainval_images_per_class(tmp_path: Path) -> None:
    folder = gen("sun397", tmp_path, k=2, per_class=5)
    (folder / "split_zhou_SUN397.json").unlink()
    (folder / "Training_01.txt").write_text("/a/abbey/sun_000001.jpg\n/a/airplane_cabin/sun_000001.jpg\n")
    with pytest.raises(ValueError, match=r"class 'abbey' \(label 0\) has 1 trainval images"):
        make_split("sun397", tmp_path)


def test_flowers_label_without_a_name(tmp_path: Path) -> None:
    folder = gen("oxford_flowers", tmp_path, k=2, per_class=5)
    (folder / "split_zhou_OxfordFlowers.json").unlink()
    (folder / "cat_to_name.json").write_text('{"1": "pink primrose"}')
    with pytest.raises(ValueError, match=r"imagelabels.mat: image 6 has label 2, not a key of"):
        make_split("oxford_flowers", tmp_path)


def test_caltech_drops_renames_and_is_deterministic(tmp_path: Path) -> None:
    folder = gen("caltech101", tmp_path / "a", k=5, per_class=10)
    split = folder / "split_zhou_Caltech101.json"
    split.unlink()
    for junk in ("BACKGROUND_Google", "Faces_easy"):
        shutil.copytree(folder / "101_ObjectCategories" / "Faces", folder / "101_ObjectCategories" / junk)
    with pytest.raises(FileNotFoundError, match="make-split caltech101"):
        load_dataset("caltech101", tmp_path / "a")
    assert make_split("caltech101", tmp_path / "a") == split  # written next to the data
    splits = load_dataset("caltech101", tmp_path / "a")
    assert splits.classnames == ("face", "leopard", "motorbike", "accordion", "airplane")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 10, 15)
    first = split.read_bytes()
    other = tmp_path / "b"
    shutil.copytree(tmp_path / "a", other)
    (other / "caltech-101" / "split_zhou_Caltech101.json").unlink()
    make_split("caltech101", other)
    assert (other / "caltech-101" / "split_zhou_Caltech101.json").read_bytes() == first
    with pytest.raises(FileExistsError):
        make_split("caltech101", tmp_path / "a")
    make_split("caltech101", tmp_path / "a", seed=2, overwrite=True)
    assert split.read_bytes() != first


def test_cli_and_datasets_without_a_rule(tmp_path: Path) -> None:
    folder = gen("eurosat", tmp_path, k=2, per_class=4)
    (folder / "split_zhou_EuroSAT.json").unlink()
    assert cli_main(["make-split", "eurosat", "--root", str(tmp_path)]) == 0
    assert load_dataset("eurosat", tmp_path).classnames == ("Annual Crop Land", "Forest")
    folder = gen("ucf101", tmp_path, k=2, per_class=5)
    (folder / "split_zhou_UCF101.json").unlink()
    assert cli_main(["make-split", "ucf101", "--root", str(tmp_path)]) == 0
    assert load_dataset("ucf101", tmp_path).classnames == ("Apply Eye Makeup", "Apply Lipstick")
    for name in ("fgvc_aircraft", "imagenet", "synthetic"):
        with pytest.raises(ValueError, match="has no split rule"):
            make_split(name, tmp_path)

"""Reading CoOp split files: round trip through every catalog entry, and every error path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vlprompt.datasets import (
    CATALOG,
    SPLIT_NAMES,
    generate_dataset,
    get_entry,
    load_dataset,
    sample_fewshot,
    split_fingerprint,
)
from vlprompt.datasets.__main__ import main as cli_main
from vlprompt.datasets.cuts import split_counts


# Entries without a split file (FGVC-Aircraft, the ImageNet family) are read back in test_benchmarks.py.
@pytest.mark.parametrize("key", sorted(k for k, e in CATALOG.items() if e.layout_name == "split_json"))
def test_generated_entry_reads_back(tmp_path: Path, key: str) -> None:
    entry = get_entry(key)
    folder = generate_dataset(key, tmp_path, images_per_class=5)
    assert folder == tmp_path / entry.folder
    assert (folder / entry.split_file).is_file()
    splits = load_dataset(key, tmp_path)
    n = len(entry.classnames)
    assert splits.name == key
    assert splits.template == entry.template
    assert splits.classnames == entry.classnames
    assert split_counts(5) == (2, 1, 2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2 * n, n, 2 * n)
    image_root = (tmp_path / entry.folder / entry.image_dir).resolve()
    for split in SPLIT_NAMES:
        for item in splits.split(split):
            assert os.path.isabs(item.path)
            assert Path(item.path).is_file()
            assert Path(item.path).resolve().is_relative_to(image_root)
            assert splits.classnames[item.label] == item.classname
    assert sorted({d.label for d in splits.test}) == list(range(n))


def test_real_file_names(tmp_path: Path) -> None:
    for key in CATALOG:
        generate_dataset(key, tmp_path, images_per_class=4, num_classes=2 if key != "oxford_pets" else 37)
    assert (tmp_path / "eurosat/2750/AnnualCrop/AnnualCrop_1.jpg").is_file()
    assert (tmp_path / "eurosat/2750/Forest/Forest_4.jpg").is_file()
    assert (tmp_path / "oxford_pets/images/Abyssinian_1.jpg").is_file()
    assert (tmp_path / "oxford_pets/images/american_bulldog_3.jpg").is_file()
    assert (tmp_path / "synthetic/images/red_circle/1.png").is_file()
    eurosat = load_dataset("eurosat", tmp_path)
    assert eurosat.classnames == ("Annual Crop Land", "Forest")
    assert eurosat.train[0].path.endswith(os.path.join("2750", "AnnualCrop", "AnnualCrop_1.jpg"))


def test_oxford_pets_annotations(tmp_path: Path) -> None:
    generate_dataset("oxford_pets", tmp_path, images_per_class=5)
    splits = load_dataset("oxford_pets", tmp_path)
    annotations = tmp_path / "oxford_pets" / "annotations"
    trainval = (annotations / "trainval.txt").read_text().splitlines()
    test = (annotations / "test.txt").read_text().splitlines()
    assert len(trainval) == len(splits.train) + len(splits.val) == 37 * 3
    assert len(test) == len(splits.test) == 37 * 2
    rows = {line.split()[0]: tuple(int(v) for v in line.split()[1:]) for line in trainval + test}
    assert all(len(v) == 3 for v in rows.values())
    assert rows["Abyssinian_1"] == (1, 1, 1)  # class 1, cat, first cat breed
    assert rows["american_bulldog_1"] == (2, 2, 1)  # class 2, dog, first dog breed
    assert rows["Sphynx_1"] == (34, 1, 12)  # last of 12 cat breeds
    assert rows["yorkshire_terrier_5"] == (37, 2, 25)  # last of 25 dog breeds
    test_stems = {Path(d.path).stem for d in splits.test}
    assert test_stems == {line.split()[0] for line in test}


def test_missing_folder_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("eurosat", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "eurosat") in message
    assert "split_zhou_EuroSAT.json" in message
    assert "eurosat/2750" in message
    assert "EuroSAT" in message  # the entry's description
    assert "python -m vlprompt.datasets generate eurosat" in message


def test_missing_split_file_points_to_coop_file(small_root: Path) -> None:
    split_file = small_root / "synthetic" / "split_synthetic.json"
    split_file.unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("synthetic", small_root)
    message = str(err.value)
    assert str(split_file) in message
    assert "CoOp split files" in message


def test_missing_image_names_row_and_path(small_root: Path) -> None:
    split_file = small_root / "synthetic" / "split_synthetic.json"
    rel = json.loads(split_file.read_text())["val"][1][0]  # second val row
    missing = small_root / "synthetic" / "images" / rel
    missing.unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("synthetic", small_root)
    message = str(err.value)
    assert str(split_file) in message
    assert "split 'val' row 1" in message
    assert str(missing) in message
    assert "1 of 12" in message


def _edit_split(root: Path, edit) -> Path:
    split_file = root / "synthetic" / "split_synthetic.json"
    data = json.loads(split_file.read_text())
    edit(data)
    split_file.write_text(json.dumps(data))
    return split_file


def test_label_gap_is_rejected(small_root: Path) -> None:
    def relabel(data: dict) -> None:
        for split in SPLIT_NAMES:
            for row in data[split]:
                if row[1] == 2:
                    row[1] = 7

    split_file = _edit_split(small_root, relabel)
    with pytest.raises(ValueError, match=r"labels must be 0\.\.n-1") as err:
        load_dataset("synthetic", small_root)
    assert str(split_file) in str(err.value)
    assert "missing [2, 3, 4, 5, 6]" in str(err.value)


def test_inconsistent_classname_names_row(small_root: Path) -> None:
    split_file = _edit_split(small_root, lambda d: d["test"][2].__setitem__(2, "purple blob"))
    with pytest.raises(ValueError) as err:
        load_dataset("synthetic", small_root)
    message = str(err.value)
    assert str(split_file) in message
    assert "split 'test' row 2" in message
    assert "'purple blob'" in message


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (["images/x.png", "0", "red circle"], "expected \\[relative_path, label, classname\\]"),
        (["images/x.png", 0], "expected \\[relative_path, label, classname\\]"),
        (["../../etc/passwd", 0, "red circle"], "must be relative"),
        (["/etc/passwd", 0, "red circle"], "must be relative"),
        (["red_circle/1.png", -1, "red circle"], "negative label"),
    ],
)
def test_malformed_row_names_file_split_and_row(small_root: Path, bad_row: list, expected: str) -> None:
    split_file = _edit_split(small_root, lambda d: d["train"].insert(3, bad_row))
    with pytest.raises(ValueError, match=expected) as err:
        load_dataset("synthetic", small_root)
    assert f"split file {split_file}: split 'train' row 3" in str(err.value)


def test_invalid_json_and_missing_key(small_root: Path) -> None:
    split_file = small_root / "synthetic" / "split_synthetic.json"
    split_file.write_text('{"train": [')
    with pytest.raises(ValueError, match="not valid JSON") as err:
        load_dataset("synthetic", small_root)
    assert str(split_file) in str(err.value)
    split_file.write_text('{"train": [], "val": []}')
    with pytest.raises(ValueError, match=r"missing keys \['test'\]"):
        load_dataset("synthetic", small_root)


def test_underscores_in_split_classnames_become_spaces(small_root: Path) -> None:
    """Real CoOp files store e.g. 'american_bulldog'; prompts need 'american bulldog'."""

    def underscore(data: dict) -> None:
        for split in SPLIT_NAMES:
            for row in data[split]:
                row[2] = row[2].replace(" ", "_")

    _edit_split(small_root, underscore)
    splits = load_dataset("synthetic", small_root)
    assert splits.classnames == ("red circle", "green square", "blue triangle")
    assert splits.train[0].classname == "red circle"


def test_fingerprint_stable_and_root_independent(synthetic_root: Path, tmp_path: Path) -> None:
    first = split_fingerprint(load_dataset("synthetic", synthetic_root))
    assert first == split_fingerprint(load_dataset("synthetic", synthetic_root))
    assert len(first) == 64 and int(first, 16) >= 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(synthetic_root, moved)
    assert split_fingerprint(load_dataset("synthetic", moved)) == first


def test_fingerprint_changes_with_the_split(small_root: Path) -> None:
    splits = load_dataset("synthetic", small_root)
    before = split_fingerprint(splits)

    def move_row(data: dict) -> None:  # one image changes split: test -> train
        data["train"].append(data["test"].pop())

    _edit_split(small_root, move_row)
    assert split_fingerprint(load_dataset("synthetic", small_root)) != before


def test_fingerprint_changes_with_fewshot_seed(synthetic_root: Path) -> None:
    splits = load_dataset("synthetic", synthetic_root)
    prints = {split_fingerprint(sample_fewshot(splits, 2, seed)) for seed in (1, 2, 3)}
    assert len(prints) == 3
    assert split_fingerprint(splits) not in prints


def test_cli_check(small_root: Path, tmp_path_factory: pytest.TempPathFactory, capsys) -> None:
    assert cli_main(["check", "synthetic", "--root", str(small_root)]) == 0
    out = capsys.readouterr().out
    assert "synthetic: 3 classes; train 6, val 3, test 3" in out
    assert split_fingerprint(load_dataset("synthetic", small_root)) in out
    empty = tmp_path_factory.mktemp("empty")
    assert cli_main(["check", "eurosat", "--root", str(empty)]) == 1
    assert str(empty / "eurosat") in capsys.readouterr().err

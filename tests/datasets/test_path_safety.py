"""Paths read from data files never leave the dataset folder (``files.check_relative``).

A split file, an official list or a few-shot cache is text someone else wrote. Each test plants
a traversal or absolute entry that points at a file which *does exist* outside the image folder,
so without the check the reader would load it; the entry must instead be refused with a message
naming the file, the entry and the fix -- through every reader, and through the front door
(``experiments/benchmark.py``: exit 2 before Ray starts). Legitimate nested and symlinked
paths still load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlprompt.datasets import generate_dataset, get_entry, load_dataset, load_tasks, make_split
from vlprompt.datasets.fewshot_cache import cache_path, cached_fewshot
from vlprompt.datasets.files import UnsafePathError, check_relative

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "experiments" / "benchmark.py"
UNIT = REPO / "tests" / "assets" / "unit.yaml"

REFUSED = [
    ("../x.jpg", "'..'"),
    ("../../etc/passwd", "'..'"),
    ("cls/../../x.jpg", "'..'"),
    ("cls/../x.jpg", "'..'"),  # normalises to x.jpg, but through a symlinked cls/ it lands outside
    ("..\\..\\x.jpg", "'..'"),
    ("cls\\..\\..\\x.jpg", "'..'"),
    ("/etc/passwd", "absolute"),
    ("//host/share/x.jpg", "absolute"),
    ("\\\\host\\share\\x.jpg", "absolute"),
    ("C:\\Windows\\x.jpg", "absolute"),
    ("C:x.jpg", "absolute"),
    ("", "empty"),
    ("cls/x\0.jpg", "NUL"),
]
ALLOWED = ["x.jpg", "cls/x.jpg", "cls/a/b/c/x.jpg", "./cls/x.jpg", "cls//x.jpg", "cls/..x.jpg", "x...jpg"]


@pytest.mark.parametrize(("rel", "why"), REFUSED, ids=[repr(r) for r, _ in REFUSED])
def test_the_check_refuses_paths_that_leave_the_folder(rel, why):
    with pytest.raises(UnsafePathError, match=why) as caught:
        check_relative("split file S: split 'train' row 7", rel)
    message = str(caught.value)
    assert message.startswith("split file S: split 'train' row 7: image path ")
    assert repr(rel) in message and "fix or remove that entry" in message


@pytest.mark.parametrize("rel", ALLOWED)
def test_the_check_allows_paths_inside_the_folder(rel):
    check_relative("here", rel)  # no exception


# --- helpers ------------------------------------------------------------------------------------


def _outside_image(image_root: Path, some_image: Path) -> Path:
    """A real image two folders above ``image_root``: what a traversal entry would read."""
    target = image_root.parent.parent / "outside.jpg"
    shutil.copyfile(some_image, target)
    return target


def _split_json(root: Path, name: str = "synthetic") -> tuple[Path, Path, dict]:
    entry = get_entry(name)
    folder = root / entry.folder
    split_path = folder / entry.split_file
    return split_path, folder / entry.image_dir, json.loads(split_path.read_text())


def _plant(split_path: Path, data: dict, split: str, row: int, rel: str) -> None:
    data[split][row][0] = rel
    split_path.write_text(json.dumps(data))


# --- the readers --------------------------------------------------------------------------------


def test_split_json_traversal_to_an_existing_file_is_refused(small_root):
    split_path, image_root, data = _split_json(small_root)
    outside = _outside_image(image_root, image_root / data["train"][0][0])
    rel = os.path.relpath(outside, image_root)  # "../../outside.jpg", and that file exists
    assert rel.startswith("..") and (image_root / rel).is_file()
    _plant(split_path, data, "val", 1, rel)
    with pytest.raises(UnsafePathError) as caught:
        load_dataset("synthetic", small_root)
    message = str(caught.value)
    assert str(split_path) in message and "split 'val' row 1" in message and repr(rel) in message


def test_split_json_absolute_entry_is_refused(small_root):
    split_path, image_root, data = _split_json(small_root)
    absolute = str(_outside_image(image_root, image_root / data["train"][0][0]))
    _plant(split_path, data, "test", 0, absolute)
    with pytest.raises(UnsafePathError, match="absolute") as caught:
        load_dataset("synthetic", small_root)
    assert str(split_path) in str(caught.value) and repr(absolute) in str(caught.value)


def test_nested_and_symlinked_paths_inside_the_folder_still_load(small_root, tmp_path_factory):
    split_path, image_root, data = _split_json(small_root)
    first, second = data["train"][0][0], data["train"][1][0]
    nested = Path(first).parent / "deep" / "er" / Path(first).name
    (image_root / nested).parent.mkdir(parents=True)
    (image_root / first).rename(image_root / nested)
    elsewhere = tmp_path_factory.mktemp("other_disk")  # image folder kept on another disk
    (image_root / second).rename(elsewhere / "kept.jpg")
    (image_root / "linked").symlink_to(elsewhere, target_is_directory=True)
    data["train"][0][0], data["train"][1][0] = nested.as_posix(), "linked/kept.jpg"
    split_path.write_text(json.dumps(data))
    splits = load_dataset("synthetic", small_root)
    paths = [Path(d.path) for d in splits.train[:2]]
    assert paths == [image_root.absolute() / nested, image_root.absolute() / "linked" / "kept.jpg"]
    assert all(p.is_file() for p in paths) and len(splits.train) == len(data["train"])


def test_fgvc_list_entry_is_refused_at_its_line(tmp_path):
    folder = generate_dataset("fgvc_aircraft", tmp_path, images_per_class=4, num_classes=2, image_size=8)
    image_root = folder / get_entry("fgvc_aircraft").image_dir
    _outside_image(image_root, next(image_root.glob("*.jpg")))
    listing = folder / "images_variant_train.txt"
    lines = listing.read_text().splitlines()
    lines[1] = "../../outside " + lines[1].split(" ", 1)[1]  # ../../outside.jpg exists
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(UnsafePathError) as caught:
        load_dataset("fgvc_aircraft", tmp_path)
    assert f"{listing} line 2" in str(caught.value) and "'../../outside.jpg'" in str(caught.value)


def test_make_split_refuses_a_traversal_in_the_official_files_and_writes_nothing(tmp_path):
    folder = generate_dataset("ucf101", tmp_path, images_per_class=5, num_classes=2, image_size=8)
    entry = get_entry("ucf101")
    image_root = folder / entry.image_dir
    _outside_image(image_root, next(image_root.glob("*/*.jpg")))
    (folder / entry.split_file).unlink()
    listing = folder / "ucfTrainTestlist" / "trainlist01.txt"
    lines = listing.read_text().splitlines()
    lines[0] = "ApplyEyeMakeup/../../../outside.avi 1"  # image Apply_Eye_Makeup/../../../outside.jpg
    listing.write_text("\n".join(lines) + "\n")
    assert (image_root / "Apply_Eye_Makeup/../../../outside.jpg").is_file()
    with pytest.raises(UnsafePathError, match=re.escape("'Apply_Eye_Makeup/../../../outside.jpg'")):
        make_split("ucf101", tmp_path)
    assert not (folder / entry.split_file).exists()


def test_fashion20_split_row_is_refused(tmp_path):
    generate_dataset("fashion20", tmp_path, images_per_class=4, num_classes=2, image_size=8)
    split_path, image_root, data = _split_json(tmp_path, "fashion20")
    _outside_image(image_root, image_root / data["train"][0][0])
    _plant(split_path, data, "train", 0, "../../outside.jpg")
    with pytest.raises(UnsafePathError) as caught:
        load_tasks("fashion20", tmp_path)
    assert str(split_path) in str(caught.value) and "split 'train' row 0" in str(caught.value)


def test_a_tampered_fewshot_cache_is_refused(small_root):
    splits = load_dataset("synthetic", small_root)
    folder = small_root / get_entry("synthetic").folder
    cached_fewshot(splits, 1, 1, folder)
    path = cache_path(folder, 1, 1)
    record = json.loads(path.read_text())
    record["train"][0][0] = "../../outside.jpg"
    path.write_text(json.dumps(record))
    with pytest.raises(UnsafePathError) as caught:  # before the fingerprint check (a plain ValueError)
        cached_fewshot(splits, 1, 1, folder)
    assert str(path) in str(caught.value) and "delete the file" in str(caught.value)


# --- the front door -----------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["../../etc/passwd", "/etc/passwd"])
def test_benchmark_refuses_the_split_file_before_ray(tmp_path, planted):
    """A real ``python experiments/benchmark.py``: exit 2, one line naming the file and the entry."""
    generate_dataset("synthetic", tmp_path / "data", num_classes=4, images_per_class=10)
    split_path, _, data = _split_json(tmp_path / "data")
    _plant(split_path, data, "train", 2, planted)
    argv = [str(BENCHMARK), "--config", str(UNIT), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    argv += ["sweep.space={}", "data.generate_missing=false"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and last.startswith("config error: data.dataset=synthetic: ")
    assert str(split_path) in last and "split 'train' row 2" in last and repr(planted) in last
    assert "[vlprompt] sweep" not in done.stdout  # refused before Ray started

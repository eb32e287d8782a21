"""Fashion-20 (SoftCPT): its layout generated and read back per task, the split rule, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlprompt.datasets import generate_dataset, get_entry, load_dataset, load_tasks, split_fingerprint
from vlprompt.datasets.__main__ import main as cli_main
from vlprompt.datasets.fashion20 import (
    FEWSHOT_DIR,
    STAND_IN_TASKS,
    TASK_INFO_FILE,
    TASK_TEMPLATES,
    read_task_info,
    write_layout,
)
from vlprompt.datasets.generate import MARKER_FILE
from vlprompt.datasets.layout import StandIn
from vlprompt.datasets.layouts import layout_of
from vlprompt.datasets.makesplit import make_split

PER_CLASS = 5
SPLIT = "split_dk_Fashion20.json"


def gen(root: Path, tasks: int | None = None) -> Path:
    return generate_dataset("fashion20", root, images_per_class=PER_CLASS, image_size=8, num_classes=tasks)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole generated stand-in (20 tasks, 78 classes, 5 images each), read-only."""
    root = tmp_path_factory.mktemp("f20")
    gen(root)
    return root


def test_stand_in_matches_the_real_sizes_and_templates() -> None:
    entry = get_entry("fashion20")
    assert (entry.folder, entry.image_dir, entry.split_file) == ("fashion20", "images", SPLIT)
    assert len(STAND_IN_TASKS) == len(entry.class_folders) == len(TASK_TEMPLATES) == 20
    assert sum(len(labels) for _, _, labels in STAND_IN_TASKS) == entry.num_classes == 78
    assert TASK_TEMPLATES[0] == "a photo of {}, a type of pants."  # SoftCPT zsclip.py
    assert TASK_TEMPLATES[14] == "a photo of {}, a type of hat."
    assert TASK_TEMPLATES[19] == "a photo of {}, a type of underwear."
    assert layout_of(entry).multitask and "task_info.csv" in entry.layout


def test_generated_tree_read_back_per_task(shared_root: Path) -> None:
    tasks = load_tasks("fashion20", shared_root)
    names = [name.replace(" ", "_") for name, _, _ in STAND_IN_TASKS]
    assert list(tasks) == [f"fashion20/{n}" for n in names]
    assert sum(t.splits.num_classes for t in tasks.values()) == 78
    folder = shared_root / "fashion20"
    for task_id, ((key, task), (_, _, labels)) in enumerate(zip(tasks.items(), STAND_IN_TASKS, strict=True)):
        splits = task.splits
        assert splits.name == key
        assert splits.classnames == labels  # task_info.csv order
        assert splits.template == TASK_TEMPLATES[task_id]
        assert task.cache_dir == folder / FEWSHOT_DIR / str(task_id)
        n = len(labels) * PER_CLASS
        sizes = (len(splits.train), len(splits.val), len(splits.test))
        assert sizes == (round(n * 0.5), round(n * 0.2), n - round(n * 0.5) - round(n * 0.2))
        items = splits.train + splits.val + splits.test
        assert len({d.path for d in items}) == n
        for d in items:  # labels are the class folder ids of this task, 0..n_t-1
            rel = Path(d.path).relative_to(folder / "images")
            assert rel.parts[:2] == (str(task_id), str(d.label))
            assert d.classname == splits.classnames[d.label]
        assert {d.label for d in items} == set(range(len(labels)))


def test_fingerprint_does_not_depend_on_the_root(shared_root: Path, tmp_path: Path) -> None:
    shutil.copytree(shared_root / "fashion20", tmp_path / "fashion20")
    here, there = load_tasks("fashion20", shared_root), load_tasks("fashion20", tmp_path)
    for key in here:
        assert split_fingerprint(here[key].splits) == split_fingerprint(there[key].splits)
    assert here[key].splits.train[0].path != there[key].splits.train[0].path


def test_task_info_parsing(tmp_path: Path) -> None:
    path = tmp_path / TASK_INFO_FILE
    path.write_text(
        "0\tnot a task\tthe header line\ta, b\n"  # header: skipped even though it looks like data
        "7\tsleeve length\tsleeves\t short ,long_sleeve,  sleeveless \n"
        "\n"
        "3\ttoe shape\t\tround,pointed\n",
        encoding="utf-8",
    )
    first, second = read_task_info(path)
    assert (first.id, first.name, first.description) == (0, "sleeve_length", "sleeves")  # id = position
    assert first.labels == ("short", "long_sleeve", "sleeveless")
    assert first.classnames == ("short", "long sleeve", "sleeveless")
    assert (second.id, second.name, second.labels) == (1, "toe_shape", ("round", "pointed"))

    path.write_text("header\n0\tsleeve length\tlabels missing\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{TASK_INFO_FILE} line 2: expected 4 tab-separated fields"):
        read_task_info(path)
    path.write_text("header\n0\tsleeve length\t\tshort, short\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lists a label twice"):
        read_task_info(path)


def test_missing_split_is_regenerated_deterministically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = gen(tmp_path / "a")
    split = first / SPLIT
    written = split.read_bytes()  # the generator writes the file by the reader's rule
    data = json.loads(written)
    assert set(data) == {"train", "val", "test", "meta"}
    assert data["train"][0][1:] == [[data["train"][0][1][0]], [0]]  # [path, [label], [task id]]
    assert data["meta"]["taskid2tname"][3] == "sleeve_length"
    before = load_tasks("fashion20", tmp_path / "a")

    split.unlink()
    with pytest.raises(FileNotFoundError, match=rf"split file {split} not found.*make-split fashion20"):
        load_tasks("fashion20", tmp_path / "a")
    assert not split.exists()
    after = load_tasks("fashion20", tmp_path / "a", make_missing_split=True)
    assert split.read_bytes() == written  # next to the data, byte for byte
    assert "was missing; generated SoftCPT's 50/20/30 split per task" in capsys.readouterr().err
    assert {k: t.splits for k, t in after.items()} == {k: t.splits for k, t in before.items()}

    other = gen(tmp_path / "b")
    (other / SPLIT).unlink()
    load_tasks("fashion20", tmp_path / "b", make_missing_split=True)
    assert (other / SPLIT).read_bytes() == written  # another machine, same images: same file
    assert not [p for p in other.iterdir() if p.name.startswith(".")]  # no temporary files left

    assert make_split("fashion20", tmp_path / "b", seed=2, overwrite=True) == other / SPLIT
    assert (other / SPLIT).read_bytes() != written
    with pytest.raises(FileExistsError):
        make_split("fashion20", tmp_path / "b")
    (other / SPLIT).unlink()
    assert cli_main(["make-split", "fashion20", "--root", str(tmp_path / "b")]) == 0
    assert (other / SPLIT).read_bytes() == written


def test_load_dataset_says_it_is_multi_task(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(ValueError, match="fashion20 is a multi-task dataset: use load_tasks"):
            load_dataset("fashion20", root)


def test_missing_files_name_the_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"fashion20 does not exist.*fashion20/task_info.csv"):
        load_tasks("fashion20", tmp_path)
    folder = gen(tmp_path, tasks=2)
    (folder / TASK_INFO_FILE).unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"task list {folder / TASK_INFO_FILE} not found. Expected layout: "
    ):
        load_tasks("fashion20", tmp_path)
    shutil.rmtree(tmp_path / "fashion20")
    folder = gen(tmp_path, tasks=2)
    shutil.rmtree(folder / "images")
    with pytest.raises(FileNotFoundError, match=rf"image folder {folder / 'images'} not found"):
        load_tasks("fashion20", tmp_path)


def _edit_split(
    folder: Path, split: str, row: int, label: int | None = None, task: int | None = None
) -> None:
    data = json.loads((folder / SPLIT).read_text())
    if label is not None:
        data[split][row][1] = [label]
    if task is not None:
        data[split][row][2] = [task]
    (folder / SPLIT).write_text(json.dumps(data))


def test_bad_split_rows_are_named(tmp_path: Path) -> None:
    folder = gen(tmp_path, tasks=2)
    pristine = (folder / SPLIT).read_text()
    _edit_split(folder, "val", 3, task=7)
    with pytest.raises(
        ValueError,
        match=rf"split file {folder / SPLIT}: split 'val' row 3: task id 7 is not in "
        rf"{folder / TASK_INFO_FILE}, which lists tasks 0..1",
    ):
        load_tasks("fashion20", tmp_path)
    (folder / SPLIT).write_text(pristine)
    _edit_split(folder, "test", 0, label=4, task=0)
    with pytest.raises(
        ValueError,
        match=r"split 'test' row 0: label 4 is out of range for task 0 \(pants_length\), which has 4",
    ):
        load_tasks("fashion20", tmp_path)
    (folder / SPLIT).write_text(pristine)
    _edit_split(folder, "train", 1, label=-1)
    with pytest.raises(ValueError, match="split 'train' row 1: label -1 is out of range"):
        load_tasks("fashion20", tmp_path)
    data = json.loads(pristine)
    data["train"][2][1] = 1  # a bare label, not SoftCPT's one-element list
    (folder / SPLIT).write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"split 'train' row 2: expected \[relative_path, \[label\], \[task id\]\]"
    ):
        load_tasks("fashion20", tmp_path)


def test_missing_image_is_named(tmp_path: Path) -> None:
    folder = gen(tmp_path, tasks=2)
    rel = json.loads((folder / SPLIT).read_text())["val"][1][0]
    (folder / "images" / rel).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 of 40 listed images are missing, the first at split 'val' row 1: "
    ) as err:
        load_tasks("fashion20", tmp_path)
    assert str(folder / "images" / rel) in str(err.value)


def test_counts_are_checked_unless_generated(tmp_path: Path) -> None:
    folder = gen(tmp_path, tasks=3)
    assert len(load_tasks("fashion20", tmp_path)) == 3  # the marker declares the 3 tasks
    (folder / MARKER_FILE).unlink()  # now it looks like a real but truncated download
    with pytest.raises(ValueError, match=r"lists 3 tasks with 12 classes, expected 20 tasks with 78 classes"):
        load_tasks("fashion20", tmp_path)
    full = gen(tmp_path / "full")
    (full / MARKER_FILE).unlink()  # 20 tasks with 78 classes: read like the real thing
    assert len(load_tasks("fashion20", tmp_path / "full")) == 20


def test_stray_folder_stops_the_split_rule(tmp_path: Path) -> None:
    folder = gen(tmp_path, tasks=2)
    (folder / SPLIT).unlink()
    (folder / "images" / "0" / "9").mkdir()
    with pytest.raises(ValueError, match=r"images/0/9: expected a class \(task pants_length\) id 0..3"):
        load_tasks("fashion20", tmp_path, make_missing_split=True)


def test_writer_gives_each_class_of_a_task_its_own_style(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    saved: list[Path] = []
    entry = get_entry("fashion20")

    def draw(style: int, index: int) -> None:  # the styles and seeds asked for are what is checked
        calls.append((style, index))

    write_layout(entry, tmp_path, StandIn(20, 4, 8, draw, _record(saved)))
    assert len(calls) == len(set(calls)) == 78 * 4  # every image its own seed
    by_class: dict[tuple[str, str], set[int]] = {}
    for (style, _), path in zip(calls, saved, strict=True):
        by_class.setdefault(path.parts[-3:-1], set()).add(style)
    assert all(len(styles) == 1 for styles in by_class.values())  # one style per class
    for task in range(20):
        styles = [next(iter(s)) for (t, _), s in by_class.items() if t == str(task)]
        assert len(styles) == len(set(styles)) == len(STAND_IN_TASKS[task][2])
    assert (tmp_path / TASK_INFO_FILE).is_file()


def _record(saved: list[Path]):
    def save(image: object, path: Path) -> None:  # an empty file is enough for the split rule
        saved.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    return save


def test_doctor_reports_fashion20(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["doctor", "fashion20", "--root", str(tmp_path)]) == 1  # asked for, missing
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("missing  fashion20 ")
    assert f"expected under {tmp_path}: fashion20/task_info.csv" in line

    folder = gen(tmp_path)
    assert cli_main(["doctor", "fashion20", "--root", str(tmp_path), "--verify-images"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("found    fashion20 ")
    assert "20 tasks, 78 classes, 390 images (train 196 / val 78 / test 116), all images readable" in line

    (folder / SPLIT).unlink()
    assert cli_main(["doctor", "fashion20", "--root", str(tmp_path)]) == 1
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("broken   fashion20 ") and f"split file {folder / SPLIT} not found" in line
    assert not (folder / SPLIT).exists()  # the doctor writes nothing

    gen(tmp_path / "part", tasks=3)
    assert cli_main(["doctor", "fashion20", "--root", str(tmp_path / "part")]) == 0
    assert "3 of 20 tasks, 12 of 78 classes, 60 images" in capsys.readouterr().out


def test_cli_list_and_check(shared_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fashion20      78 classes" in out and "fashion20/images/<task id>/<class id>/<file>.jpg" in out
    assert cli_main(["check", "fashion20", "--root", str(shared_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fashion20: 20 tasks, 78 classes"
    assert out[1] == "fashion20/pants_length: 4 classes; train 10, val 4, test 6"
    assert out[2] == "template: 'a photo of {}, a type of pants.'"
    assert len(out) == 1 + 3 * 20

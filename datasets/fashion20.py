"""Fashion-20 (SoftCPT): 20 fashion-attribute classification tasks, 78 classes, in one folder.

The layout SoftCPT's ``datasets/fashion20.py`` reads (``kding1225/softcpt``)::

    fashion20/task_info.csv            a header line, then one line per task:
                                       <id> TAB <task name> TAB <description> TAB <label, label, ...>
    fashion20/images/<task id>/<class id>/<file>.jpg        integer folders, 0-based
    fashion20/split_dk_Fashion20.json  {"train" | "val" | "test": [[<path under images/>, [<label>],
                                       [<task id>]], ...], "meta": {...}}

Reading follows SoftCPT: the header line is skipped; a task's id is the position of its line
among the task lines (0-based; SoftCPT ignores the first column, and so does vlprompt); the
task name has its spaces replaced by "_"; the label names are split on "," and stripped, label
i of a task being its i-th name. Names come only from ``task_info.csv``: the split file's
``meta`` is not read. A split row's label is the class id *within its task*.

Fashion-20 is multi-task: its tasks reuse class names ("cropped" pants and "cropped" tops), so
it has no single ``DatasetSplits``. ``read_fashion20`` returns one per task, named
``"fashion20/<task name>"``, with the task's own class names (labels 0..n_t-1 in the order
``task_info.csv`` gives) and SoftCPT's template for that task id (``TASK_TEMPLATES``,
SoftCPT ``trainers/zsclip.py`` ``CUSTOM_TEMPLATES["Fashion20"]``). Its ``LAYOUT`` is therefore
multi-task (``read_tasks``): ``tasks.load_tasks`` is the public way in, and
``load_dataset("fashion20", ...)`` is an error that says so.

Missing split file. SoftCPT writes one when it is absent. vlprompt does so when asked, as for
the CoOp datasets (``make_missing_split=True``, ``data.make_missing_splits``, or ``python -m
vlprompt.datasets make-split fashion20``), with a deterministic version of SoftCPT's rule
(``split_rows``; the generator writes its split file by it too): per task, in id order, the
task's images are collected class folder by class folder (class ids in numeric order), file
names sorted within each; one ``random.Random(seed)`` (seed 1, CoOp's default) shuffles each
task's list, task after task; then ``round(0.5 n)`` train, ``round(0.2 n)`` val and the rest
test (SoftCPT ``read_and_split_data``: ``p_trn=0.5, p_val=0.2``). The split is per task, not per
class, as in SoftCPT. The file is written in SoftCPT's format (``json.dump(indent=4)``, with its
``meta``) next to the data, atomically, so every machine sharing the folder reads the same
split; sorting first makes the file the same on every machine for the same images (SoftCPT
shuffles an unsorted listing with the global ``random``). A task's images must lie in
``images/<task id>/<class id>/``, ids below the counts ``task_info.csv`` gives; any other folder
there is an error naming it.

Stand-in. The real task and class names are only in the Baidu download (SoftCPT README). The
generator writes ``STAND_IN_TASKS``: 20 invented attribute tasks with 78 classes in total,
ordered so that each task's garment matches SoftCPT's template for its id (tasks 0-2 pants,
3-6 tops, 7-13 shoes, 14 hat, 15-16 socks, 17 skirt, 18 tops, 19 underwear). They are
stand-ins, *not* Fashion-20's names; the reader never uses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.datasets.cuts import DEFAULT_SEED, cut_50_20_30
from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.files import (
    check_images_exist,
    check_relative,
    generated_count,
    image_path,
    list_images,
    read_split_object,
    require,
    write_atomically,
)
from vlprompt.datasets.layout import Layout, StandIn
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits, Datum, TaskData

TASK_INFO_FILE = "task_info.csv"
FEWSHOT_DIR = "split_fewshot_mt"
"""SoftCPT's few-shot folder; vlprompt's per-task caches go in ``<FEWSHOT_DIR>/<task id>/``."""

TASK_TEMPLATES: tuple[str, ...] = (
    *["a photo of {}, a type of pants."] * 3,  # tasks 0-2
    *["a photo of {}, a type of tops."] * 4,  # 3-6
    *["a photo of {}, a type of shoes."] * 7,  # 7-13
    "a photo of {}, a type of hat.",  # 14
    *["a photo of {}, a type of socks."] * 2,  # 15-16
    "a photo of {}, a type of skirt.",  # 17
    "a photo of {}, a type of tops.",  # 18
    "a photo of {}, a type of underwear.",  # 19
)
"""SoftCPT's zero-shot template per Fashion-20 task id (``trainers/zsclip.py``); a task id
beyond them (not in the real data) gets the catalog entry's template."""

# (task name as written in task_info.csv, description, label names): invented stand-ins.
STAND_IN_TASKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pants length", "length of the pants", ("ankle length", "cropped", "knee length", "shorts")),
    ("pants fit", "cut of the pants legs", ("skinny", "straight", "wide leg", "flared")),
    ("pants waist", "waist of the pants", ("high waist", "mid waist", "low waist", "elastic waist")),
    ("sleeve length", "sleeve length", ("sleeveless", "short sleeve", "three quarter sleeve", "long sleeve")),
    ("neckline", "neckline of the top", ("crew neck", "v neck", "turtleneck", "collared", "off shoulder")),
    ("top length", "length of the top", ("cropped", "regular", "longline")),
    ("top closure", "how the top closes", ("pullover", "button front", "zip front")),
    ("heel height", "heel height of the shoe", ("flat", "low heel", "mid heel", "high heel")),
    ("toe shape", "toe shape of the shoe", ("round toe", "pointed toe", "square toe", "open toe")),
    ("shaft height", "shaft height of the shoe", ("low top", "ankle high", "mid calf", "knee high")),
    ("shoe fastening", "how the shoe fastens", ("lace up", "slip on", "buckle", "hook and loop")),
    ("shoe material", "upper material of the shoe", ("leather", "canvas", "suede", "mesh")),
    ("shoe sole", "sole of the shoe", ("flat sole", "platform", "wedge")),
    ("shoe style", "kind of shoe", ("sneaker", "boot", "sandal", "loafer", "pump")),
    ("hat type", "kind of hat", ("baseball cap", "beanie", "bucket hat", "fedora")),
    ("sock length", "length of the socks", ("no show", "ankle", "crew", "knee high")),
    ("sock pattern", "pattern of the socks", ("solid", "striped", "dotted", "argyle")),
    ("skirt length", "length of the skirt", ("mini", "knee length", "midi", "maxi")),
    ("top pattern", "pattern of the top", ("solid", "striped", "floral", "plaid")),
    ("underwear type", "kind of underwear", ("brief", "boxer", "trunk")),
)  # fmt: skip

SplitRow = tuple[str, int, int]  # (path relative to images/, label within the task, task id)


@dataclass(frozen=True)
class Task:
    """One line of ``task_info.csv``."""

    id: int  # position among the task lines, 0-based
    name: str  # spaces replaced by "_" (SoftCPT), e.g. "sleeve_length"
    description: str
    labels: tuple[str, ...]  # stripped, as written; label i = labels[i]

    @property
    def classnames(self) -> tuple[str, ...]:
        """The label names as prompts use them (``"_"`` → ``" "``, as everywhere in vlprompt)."""
        return tuple(label.replace("_", " ") for label in self.labels)


def task_key(entry: CatalogEntry, task: Task) -> str:
    """``"fashion20/<task name>"``: the task's key in ``load_tasks`` and its ``DatasetSplits.name``."""
    return f"{entry.name}/{task.name}"


def task_cache_dir(folder: Path, task: Task) -> Path:
    """``<dataset folder>/split_fewshot_mt/<task id>``: where a task's few-shot cache lives."""
    return folder / FEWSHOT_DIR / str(task.id)


# --- task_info.csv ----------------------------------------------------------------------------


def read_task_info(path: Path) -> tuple[Task, ...]:
    """Parse ``task_info.csv``; every problem names the file and the line."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    tasks: list[Task] = []
    for n, line in enumerate(lines[1:], start=2):  # line 1 is the header
        if not line.strip():
            continue
        where = f"{path} line {n}"
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(
                f"{where}: expected 4 tab-separated fields '<id>\\t<task name>\\t<description>\\t"
                f"<label, label, ...>', found {len(fields)}: {line!r:.120}"
            )
        _, name, description, labels = fields
        name = name.strip().replace(" ", "_")
        names = tuple(label.strip() for label in labels.split(","))
        if not name:
            raise ValueError(f"{where}: empty task name")
        if not all(names):
            raise ValueError(f"{where}: empty label name in {labels.strip()!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: task {name!r} lists a label twice: {labels.strip()!r}")
        if any(t.name == name for t in tasks):
            raise ValueError(f"{where}: task name {name!r} is used by an earlier line")
        tasks.append(Task(len(tasks), name, description.strip(), names))
    if not tasks:
        raise ValueError(f"{path}: no task lines after the header")
    return tuple(tasks)


def _task_info_text(tasks: Sequence[tuple[str, str, Sequence[str]]]) -> str:
    lines = ["task_id\ttask_name\ttask_description\tlabel_names"]
    lines += [f"{i}\t{name}\t{desc}\t{', '.join(labels)}" for i, (name, desc, labels) in enumerate(tasks)]
    return "\n".join(lines) + "\n"


# --- the split file ---------------------------------------------------------------------------


def read_split(path: Path, tasks: Sequence[Task], task_info: Path) -> dict[str, list[SplitRow]]:
    """Parse ``split_dk_Fashion20.json`` and check each row's task id and label against the tasks."""
    data = read_split_object(path, extra_keys=("meta",))
    rows = {
        split: [_parse_row(path, split, i, row, tasks, task_info) for i, row in enumerate(data[split])]
        for split in SPLIT_NAMES
    }
    empty = [
        f"{t.id} ({t.name}): {split}" for t in tasks for split in SPLIT_NAMES if not _has(rows[split], t.id)
    ]
    if empty:
        raise ValueError(f"split file {path}: tasks with no rows in a split: {', '.join(empty[:10])}")
    return rows


def _has(rows: Sequence[SplitRow], task_id: int) -> bool:
    return any(t == task_id for _, _, t in rows)


def _one_int(value: Any) -> int | None:
    ok = isinstance(value, list) and len(value) == 1 and type(value[0]) is int
    return value[0] if ok else None


def _parse_row(
    path: Path, split: str, index: int, row: Any, tasks: Sequence[Task], task_info: Path
) -> SplitRow:
    where = f"split file {path}: split {split!r} row {index}"
    ok = isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
    label, task_id = (_one_int(row[1]), _one_int(row[2])) if ok else (None, None)
    if label is None or task_id is None:
        raise ValueError(f"{where}: expected [relative_path, [label], [task id]], got {row!r:.200}")
    rel = row[0]
    check_relative(where, rel)
    if not 0 <= task_id < len(tasks):
        raise ValueError(
            f"{where}: task id {task_id} is not in {task_info}, which lists tasks 0..{len(tasks) - 1}"
        )
    task = tasks[task_id]
    if not 0 <= label < len(task.labels):
        raise ValueError(
            f"{where}: label {label} is out of range for task {task_id} ({task.name}), which has "
            f"{len(task.labels)} labels in {task_info}"
        )
    return rel, label, task_id


def split_rows(
    image_root: Path, tasks: Sequence[Task], seed: int = DEFAULT_SEED
) -> dict[str, list[SplitRow]]:
    """The split the rule in the module docstring gives for the images under ``image_root``."""
    found = _int_folders(image_root, "task", len(tasks))
    rng = random.Random(seed)
    rows: dict[str, list[SplitRow]] = {split: [] for split in SPLIT_NAMES}
    for task in tasks:
        task_dir = image_root / str(task.id)
        if task.id not in found:
            raise FileNotFoundError(f"task {task.id} ({task.name}): folder {task_dir} not found")
        items = [
            (f"{task.id}/{cls}/{image.name}", cls)
            for cls in sorted(_int_folders(task_dir, f"class (task {task.name})", len(task.labels)))
            for image in list_images(task_dir / str(cls))
        ]
        what = f"task {task.id} ({task.name}): {len(items)} images under {task_dir}"
        for split, part in zip(SPLIT_NAMES, cut_50_20_30(items, rng, what), strict=True):
            rows[split] += [(rel, label, task.id) for rel, label in part]
    return rows


def _int_folders(parent: Path, what: str, count: int) -> dict[int, str]:
    """Sub-folders of ``parent`` named 0..count-1 (by number); any other folder is an error."""
    found: dict[int, str] = {}
    for p in parent.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not p.name.isdigit() or int(p.name) >= count:
            raise ValueError(
                f"folder {p}: expected a {what} id 0..{count - 1} (the lines of {TASK_INFO_FILE})"
            )
        found[int(p.name)] = p.name
    return found


def split_text(rows: dict[str, list[SplitRow]], tasks: Sequence[Task]) -> str:
    """SoftCPT's split file for ``rows``: Dassl ``write_json`` (indent 4), with its ``meta``."""
    data: dict[str, Any] = {
        split: [[rel, [label], [task]] for rel, label, task in rows[split]] for split in SPLIT_NAMES
    }
    data["meta"] = {
        "taskid2cname": [list(t.labels) for t in tasks],
        "taskid2desc": [t.description for t in tasks],
        "taskid2type": ["sl"] * len(tasks),  # single-label classification, every task
        "taskid2tname": [t.name for t in tasks],
        "taskid2metric": ["mean_acc"] * len(tasks),
    }
    return json.dumps(data, indent=4, separators=(",", ": "), ensure_ascii=False) + "\n"


def expected_size(entry: CatalogEntry, folder: Path) -> tuple[int, int]:
    """(tasks, classes) the folder should hold: Fashion-20's 20 and 78, or what the generator wrote."""
    generated = generated_count(folder)  # for this entry the generator counts tasks
    if generated is None:
        return len(entry.class_folders), entry.num_classes
    return generated, sum(len(labels) for _, _, labels in STAND_IN_TASKS[:generated])


def _read_layout(entry: CatalogEntry, folder: Path) -> tuple[Task, ...]:
    """Check ``task_info.csv`` and ``images/`` in the (existing) folder; return the tasks."""
    info = folder / TASK_INFO_FILE
    require(entry, info, "task list")
    require(entry, folder / entry.image_dir, "image folder", is_dir=True)
    tasks = read_task_info(info)
    n_tasks, n_classes = expected_size(entry, folder)
    found = sum(len(t.labels) for t in tasks)
    if (len(tasks), found) != (n_tasks, n_classes):
        raise ValueError(
            f"dataset {entry.name!r}: {info} lists {len(tasks)} tasks with {found} classes, expected "
            f"{n_tasks} tasks with {n_classes} classes. Expected layout: {entry.layout}."
        )
    return tasks


# --- the layout: reading, making the split file, writing the stand-in -----------------------------


def read_tasks(entry: CatalogEntry, root: Path, make_missing_split: bool) -> tuple[TaskData, ...]:
    """Every task of the dataset under ``root`` with its splits and few-shot cache folder, in id order.

    A missing split file is an error naming it, unless ``make_missing_split`` (as for
    ``load_dataset``): then it is made by the rule (module docstring), written next to the data,
    one line on stderr says so, and it is used like a shipped one; a read-only folder gets the
    same split in memory.
    """
    folder = root / entry.folder
    tasks = _read_layout(entry, folder)
    image_root = folder / entry.image_dir
    split_path = folder / entry.split_file
    if split_path.is_file():
        rows = read_split(split_path, tasks, folder / TASK_INFO_FILE)
        relative = f". Paths in the split file are relative to {image_root}."
        listed = {split: [rel for rel, _, _ in rows[split]] for split in SPLIT_NAMES}
        check_images_exist(f"split file {split_path}", image_root, listed, at_row=True, note=relative)
    elif make_missing_split:
        rows = split_rows(image_root, tasks)
        with contextlib.suppress(OSError):  # read-only data: the rule gives this split on every read
            write_atomically(split_path, split_text(rows, tasks), overwrite=True)
        print(
            f"vlprompt: {split_path} was missing; generated SoftCPT's 50/20/30 split per task (seed 1). "
            f"It may differ from the split the Fashion-20 download ships with.",
            file=sys.stderr,
        )
    else:
        raise FileNotFoundError(
            f"dataset {entry.name!r}: split file {split_path} not found. SoftCPT writes it when "
            f"absent (50/20/30 per task); so does vlprompt with make_missing_split=True "
            f"(data.make_missing_splits=true), or run `python -m vlprompt.datasets make-split "
            f"{entry.name} --root {root}`. Expected layout: {entry.layout}."
        )
    return tuple(
        TaskData(splits, task_cache_dir(folder, task))
        for task, splits in _build(entry, image_root, tasks, rows)
    )


def _build(
    entry: CatalogEntry, image_root: Path, tasks: Sequence[Task], rows: dict[str, list[SplitRow]]
) -> tuple[tuple[Task, DatasetSplits], ...]:
    base = os.path.abspath(image_root)
    out = []
    for task in tasks:
        names = task.classnames
        items = {
            split: tuple(
                Datum(image_path(base, rel), label, names[label])
                for rel, label, task_id in rows[split]
                if task_id == task.id
            )
            for split in SPLIT_NAMES
        }
        template = TASK_TEMPLATES[task.id] if task.id < len(TASK_TEMPLATES) else entry.template
        splits = DatasetSplits(task_key(entry, task), names, template, image_root=base, **items)
        out.append((task, splits))
    return tuple(out)


def make_split(entry: CatalogEntry, root: Path, seed: int = DEFAULT_SEED, overwrite: bool = False) -> Path:
    """Write ``<root>/fashion20/split_dk_Fashion20.json`` by the rule; return its path."""
    folder = root / entry.folder
    tasks = _read_layout(entry, folder)
    target = folder / entry.split_file
    write_atomically(
        target, split_text(split_rows(folder / entry.image_dir, tasks, seed), tasks), overwrite=overwrite
    )
    return target


def describe_rule(entry: CatalogEntry) -> str:
    """The split rule in words, for messages and listings."""
    return (
        f"SoftCPT's 50/20/30 split per task from {TASK_INFO_FILE} and {entry.image_dir}/<task id>/<class id>/"
    )


def write_layout(entry: CatalogEntry, folder: Path, stand_in: StandIn) -> None:
    """Write the first ``stand_in.num_classes`` stand-in *tasks* in Fashion-20's layout.

    For this entry the catalog's class lists are its stand-in tasks, so the generator's class
    count is a task count. Each task's classes get consecutive styles of the entry's palette
    (``stand_in.draw(style, index)``), cycling through it task after task: within a task every
    class looks different, across tasks styles repeat, which separate task heads do not mind.
    ``task_info.csv`` and the split file (by the reader's rule, seed 1) are written too.
    """
    chosen = STAND_IN_TASKS[: stand_in.num_classes]
    palette = len(entry.styles)
    offset = 0
    for t, (_, _, labels) in enumerate(chosen):
        for c in range(len(labels)):
            style = (offset + c) % palette
            for i in range(stand_in.images_per_class):
                # distinct seeds across tasks that share a style: the index carries the task
                image = stand_in.draw(style, t * 100_000 + i)
                stand_in.save(image, folder / entry.image_dir / str(t) / str(c) / f"{i + 1:04d}.jpg")
        offset += len(labels)
    (folder / TASK_INFO_FILE).write_text(_task_info_text(chosen), encoding="utf-8")
    tasks = read_task_info(folder / TASK_INFO_FILE)
    (folder / entry.split_file).write_text(
        split_text(split_rows(folder / entry.image_dir, tasks), tasks), encoding="utf-8"
    )


LAYOUT = Layout(
    description="SoftCPT's Fashion-20: task_info.csv, images/<task id>/<class id>/, split_dk_Fashion20.json",
    read_tasks=read_tasks,
    write=write_layout,
    make_split=make_split,
    split_rule=describe_rule,
)

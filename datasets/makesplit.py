"""Regenerate a missing CoOp split file the way the reference does — only when asked.

``load_dataset`` reads the published CoOp split files, because results are only comparable
with the papers on those splits. When a file cannot be had (dead links, CoOp #90, #29),
``make_split`` (CLI: ``python -m vlprompt.datasets make-split NAME --root R``, or
``load_dataset(..., make_missing_split=True)``) writes one in CoOp's format, *next to the
data* under the entry's split-file name, so every machine sharing the folder reads the same
split. A regenerated file is not the published one: CoOp regenerates with the unseeded
global ``random`` over unsorted listings, so not even its own regenerated files agree
across machines, and neither will ours agree with them.

Every rule is deterministic: items are sorted before they are shuffled, and one
``random.Random(seed)`` (seed 1 by default, CoOp's default seed) is consumed class after
class in label order, so the same files give the same split file, byte for byte, on every
machine. Train and val rows are written class by class in label order (CoOp: in the order
classes first appear in its listing), the test rows of the trainval rules in the official
list's order, as CoOp does. Class names are stored as CoOp stores them (underscores kept;
``read_split_file`` makes them prompt-ready).

The rule is the entry's ``split_rule`` (``RULES``;
``"tasks"``, SoftCPT's multi-task split, is ``fashion20.make_split``'s). Two cuts are used:

* 50/20/30 (Dassl/CoOp ``read_and_split_data``, ``datasets/dtd.py``, and CoOp
  ``oxford_flowers.py``): per class ``round(0.5 n)`` train, ``round(0.2 n)`` val, the rest
  test; every split must get at least one image (CoOp asserts it).
* trainval 80/20 (CoOp ``OxfordPets.split_trainval(p_val=0.2)``): the official train(val)
  list is cut per class into ``n_val = round(0.2 n)`` val (the first ``n_val`` after the
  shuffle, as CoOp) and the rest train; the official test list is the test split.
  *Deviation:* CoOp asserts ``n_val > 0``; here ``n_val`` is at least 1 (a class needs 2
  trainval images), which only matters for classes smaller than real ones.

The rules:

* ``"folders"`` — Caltech101, DTD, Food101, EuroSAT (CoOp ``caltech101.py``, ``dtd.py``,
  ``food101.py``, ``eurosat.py`` → ``read_and_split_data``): class folders in Python's
  sorted order (case-sensitive, so Caltech's "Faces" precedes "accordion"), the entry's
  ``ignored_folders`` skipped, label = index in that order, images sorted by file name;
  50/20/30. Class names are the folder names, renamed where the catalog's prompt name
  differs (Caltech "airplanes" → "airplane", EuroSAT "AnnualCrop" → "Annual Crop Land").
* ``"oxford_flowers"`` — CoOp ``oxford_flowers.py``: ``imagelabels.mat`` (``labels``, the
  1-based class of ``jpg/image_%05d.jpg`` by image number), names from ``cat_to_name.json``
  (key = 1-based label); 50/20/30 per class.
* ``"oxford_pets"`` — CoOp ``oxford_pets.py``: ``annotations/trainval.txt`` and
  ``annotations/test.txt`` ("<image> <class id 1..37> <species> <breed id>", ``#`` lines
  skipped), label = class id − 1, image ``images/<image>.jpg``, class name = the image name
  without its trailing number, lowercased ("american_bulldog"); trainval 80/20.
* ``"stanford_cars"`` — CoOp ``stanford_cars.py``: ``devkit/cars_meta.mat``
  (``class_names``), ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat``
  (``annotations``: ``fname``, ``class`` 1-based); paths ``cars_train/<fname>`` and
  ``cars_test/<fname>`` relative to the dataset folder itself; class name with the year
  moved to the front (``benchmarks.year_first``); trainval 80/20.
* ``"sun397"`` — CoOp ``sun397.py``: ``ClassName.txt`` ("/a/abbey"; label = line order),
  ``Training_01.txt`` / ``Testing_01.txt`` ("/a/abbey/sun_x.jpg", relative to ``SUN397/``
  after the leading "/"), class = the image's folder, named by ``benchmarks.sun397_name``
  (letter dir dropped, the rest reversed: "indoor apse"); trainval 80/20.
* ``"ucf101"`` — CoOp ``ucf101.py``: ``ucfTrainTestlist/classInd.txt`` ("1 ApplyEyeMakeup";
  label = number − 1), ``trainlist01.txt`` / ``testlist01.txt`` (first field
  "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"), image
  ``UCF-101-midframes/Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg``, class name the
  CamelCase action split at capitals with "_" (``benchmarks.ucf101_name``); trainval 80/20.

Before anything is written, labels are checked (0..n-1, one name each) and every listed
image must exist; a bad official file is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.datasets.benchmarks import sun397_name, ucf101_name, year_first
from vlprompt.datasets.catalog import CATALOG, CatalogEntry, get_entry
from vlprompt.datasets.generate import split_counts
from vlprompt.datasets.readers import list_images
from vlprompt.datasets.splits import Row, check_labels, split_file_text

DEFAULT_SEED = 1
TRAINVAL_VAL_FRACTION = 0.2  # CoOp OxfordPets.split_trainval(p_val=0.2)

Rows = dict[str, list[Row]]


@dataclass(frozen=True)
class SplitRule:
    """How one kind of dataset's split file is regenerated."""

    read: Callable[[CatalogEntry, Path, random.Random], Rows]  # (entry, dataset folder, rng) -> rows
    files: str  # what it reads, relative to the dataset folder (for messages)
    summary: str  # the cut, in words


def split_rule(entry: CatalogEntry) -> str:
    """The name of ``entry``'s split rule (a key of ``RULES``), or "" when it has none."""
    return entry.split_rule


def datasets_with_rules() -> tuple[str, ...]:
    """Catalog keys whose split file ``make_split`` can write, sorted."""
    return tuple(sorted(name for name, entry in CATALOG.items() if split_rule(entry)))


def make_split(name: str, root: str | Path, *, seed: int = DEFAULT_SEED, overwrite: bool = False) -> Path:
    """Write ``<root>/<folder>/<split_file>`` by the entry's rule; return its path.

    Raises ``ValueError`` for an entry without a rule or bad official files,
    ``FileNotFoundError`` when the files the rule reads (or listed images) are missing, and
    ``FileExistsError`` when the split file exists and ``overwrite`` is false. The file is
    written beside the target and moved into place, so a reader never sees half of it.
    """
    entry = get_entry(name)
    rule_name = split_rule(entry)
    if not rule_name:
        raise ValueError(
            f"dataset {entry.name!r} has no split rule; vlprompt reads its official files only. "
            f"Expected layout: {entry.layout}. Datasets with a rule: {', '.join(datasets_with_rules())}."
        )
    if rule_name == "tasks":  # SoftCPT's multi-task split has its own format and rule
        from vlprompt.datasets.fashion20 import make_split as make_tasks_split

        return make_tasks_split(entry, root, seed=seed, overwrite=overwrite)
    if rule_name not in RULES:
        raise ValueError(
            f"catalog entry {entry.name!r}: unknown split rule {rule_name!r}; known: {sorted(RULES)}"
        )
    rule = RULES[rule_name]
    folder = Path(root) / entry.folder
    target = folder / entry.split_file
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: folder {folder} not found; make-split reads {rule.files} there. "
            f"Expected layout: {entry.layout}."
        )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    rows = rule.read(entry, folder, random.Random(seed))
    where = f"dataset {entry.name!r}: split regenerated from {rule.files}"
    check_labels(where, rows)
    _check_listed_images(where, folder / entry.image_dir, rows)
    write_atomically(target, split_file_text(rows), overwrite=overwrite)
    return target


def describe_rule(entry: CatalogEntry) -> str:
    """One phrase for messages: what the entry's rule reads and how it cuts ("" without one)."""
    rule = RULES.get(split_rule(entry))
    return f"{rule.summary} from {rule.files}" if rule else ""


# --- the cuts --------------------------------------------------------------------------------


def _cut_50_20_30(where: str, by_label: dict[int, list[Row]], rng: random.Random) -> Rows:
    """Dassl ``read_and_split_data``'s cut per class, classes in label order."""
    rows: Rows = {"train": [], "val": [], "test": []}
    for label in sorted(by_label):
        items = sorted(by_label[label])
        rng.shuffle(items)
        n = len(items)
        n_train, n_val, n_test = split_counts(n)
        if 0 in (n_train, n_val, n_test):
            raise ValueError(
                f"{where}: class {items[0][2]!r} (label {label}) has {n} images, too few for a "
                f"50/20/30 split with every split non-empty"
            )
        rows["train"] += items[:n_train]
        rows["val"] += items[n_train : n_train + n_val]
        rows["test"] += items[n_train + n_val :]
    return rows


def _cut_trainval(where: str, trainval: list[Row], test: list[Row], rng: random.Random) -> Rows:
    """CoOp ``OxfordPets.split_trainval``: per class, the first ``round(0.2 n)`` shuffled are val."""
    by_label: dict[int, list[Row]] = defaultdict(list)
    for row in trainval:
        by_label[row[1]].append(row)
    rows: Rows = {"train": [], "val": [], "test": list(test)}
    for label in sorted(by_label):
        items = sorted(by_label[label])
        n_val = max(1, round(len(items) * TRAINVAL_VAL_FRACTION))
        if len(items) - n_val < 1:
            raise ValueError(
                f"{where}: class {items[0][2]!r} (label {label}) has {len(items)} trainval images, "
                f"too few for an 80/20 train/val cut with both non-empty"
            )
        rng.shuffle(items)
        rows["val"] += items[:n_val]
        rows["train"] += items[n_val:]
    return rows


# --- the rules ---------------------------------------------------------------------------------


def renames(entry: CatalogEntry) -> dict[str, str]:
    """Folder → class name where the catalog's prompt name is not just the folder name."""
    return {
        folder: name
        for folder, name in zip(entry.class_folders, entry.classnames, strict=True)
        if name != folder.replace("_", " ")
    }


def _folders(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    image_root = folder / entry.image_dir
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: image folder {image_root} not found; make-split needs one "
            f"folder per class there. Expected layout: {entry.layout}."
        )
    classes = sorted(p.name for p in image_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [c for c in classes if c not in entry.ignored_folders]
    if not classes:
        raise FileNotFoundError(f"dataset {entry.name!r}: no class folders in {image_root}")
    new_names = renames(entry)
    by_label = {
        label: [(f"{cls}/{p.name}", label, new_names.get(cls, cls)) for p in list_images(image_root / cls)]
        for label, cls in enumerate(classes)
    }
    return _cut_50_20_30(f"dataset {entry.name!r}: {image_root}", by_label, rng)


def _oxford_flowers(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    label_file, names_file = folder / "imagelabels.mat", folder / "cat_to_name.json"
    labels = _mat(label_file, "labels", entry).reshape(-1)
    names = _json_object(names_file, entry)
    by_label: dict[int, list[Row]] = defaultdict(list)
    for i, value in enumerate(labels):
        label = int(value)
        if str(label) not in names:
            raise ValueError(f"{label_file}: image {i + 1} has label {label}, not a key of {names_file}")
        by_label[label - 1].append((f"image_{i + 1:05d}.jpg", label - 1, names[str(label)]))
    return _cut_50_20_30(f"dataset {entry.name!r}: {label_file}", by_label, rng)


def _oxford_pets(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    def read(path: Path) -> list[Row]:
        rows = []
        for number, line in _lines(path, entry):
            fields = line.split()
            if len(fields) != 4 or not fields[1].isdigit() or int(fields[1]) < 1 or "_" not in fields[0]:
                raise ValueError(
                    f"{path} line {number}: expected '<image name> <class id 1..> <species> <breed id>', "
                    f"got {line!r}"
                )
            image, class_id = fields[0], int(fields[1])
            rows.append((f"{image}.jpg", class_id - 1, image.rsplit("_", 1)[0].lower()))
        return rows

    annotations = folder / "annotations"
    where = f"dataset {entry.name!r}: {annotations}"
    return _cut_trainval(where, read(annotations / "trainval.txt"), read(annotations / "test.txt"), rng)


def _stanford_cars(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    meta_file = folder / "devkit" / "cars_meta.mat"
    class_names = [_mat_string(v) for v in _mat(meta_file, "class_names", entry).reshape(-1)]

    def read(path: Path, image_dir: str) -> list[Row]:
        rows = []
        for i, record in enumerate(_mat(path, "annotations", entry).reshape(-1)):
            try:
                fname, class_id = _mat_string(record["fname"]), int(record["class"].reshape(-1)[0])
            except (ValueError, IndexError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: annotation {i}: no readable 'fname' and 'class' ({exc})") from exc
            if not 1 <= class_id <= len(class_names):
                raise ValueError(
                    f"{path}: annotation {i} ({fname}): class {class_id} not in 1..{len(class_names)} "
                    f"({meta_file} class_names)"
                )
            rows.append((f"{image_dir}/{fname}", class_id - 1, year_first(class_names[class_id - 1])))
        return rows

    trainval = read(folder / "devkit" / "cars_train_annos.mat", "cars_train")
    test = read(folder / "cars_test_annos_withlabels.mat", "cars_test")
    return _cut_trainval(f"dataset {entry.name!r}: {folder}", trainval, test, rng)


def _sun397(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    class_file = folder / "ClassName.txt"
    label_of = {line.lstrip("/"): label for label, (_, line) in enumerate(_lines(class_file, entry))}

    def read(path: Path) -> list[Row]:
        rows = []
        for number, line in _lines(path, entry):
            rel = line.lstrip("/")
            cls = rel.rsplit("/", 1)[0] if "/" in rel else ""
            if cls not in label_of:
                raise ValueError(f"{path} line {number}: class {cls!r} of {line!r} is not in {class_file}")
            rows.append((rel, label_of[cls], sun397_name(cls, keep_underscores=True)))
        return rows

    trainval, test = read(folder / "Training_01.txt"), read(folder / "Testing_01.txt")
    return _cut_trainval(f"dataset {entry.name!r}: {folder}", trainval, test, rng)


def _ucf101(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    lists = folder / "ucfTrainTestlist"
    class_file = lists / "classInd.txt"
    label_of: dict[str, int] = {}
    for number, line in _lines(class_file, entry):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"{class_file} line {number}: expected '<number> <Action>', got {line!r}")
        label_of[fields[1]] = int(fields[0]) - 1

    def read(path: Path) -> list[Row]:
        rows = []
        for number, line in _lines(path, entry):
            video = line.split()[0]  # trainlist: "<Action>/<video>.avi <number>"
            action, _, filename = video.partition("/")
            if action not in label_of or not filename:
                raise ValueError(f"{path} line {number}: action of {video!r} is not in {class_file}")
            renamed = ucf101_name(action)
            rows.append((f"{renamed}/{filename.replace('.avi', '.jpg')}", label_of[action], renamed))
        return rows

    trainval, test = read(lists / "trainlist01.txt"), read(lists / "testlist01.txt")
    return _cut_trainval(f"dataset {entry.name!r}: {lists}", trainval, test, rng)


RULES: dict[str, SplitRule] = {
    "folders": SplitRule(_folders, "the class folders", "a 50/20/30 split per class folder"),
    "oxford_flowers": SplitRule(
        _oxford_flowers, "imagelabels.mat and cat_to_name.json", "a 50/20/30 split per class"
    ),
    "oxford_pets": SplitRule(
        _oxford_pets,
        "annotations/trainval.txt and annotations/test.txt",
        "the official trainval/test lists, trainval cut 80/20 into train/val",
    ),
    "stanford_cars": SplitRule(
        _stanford_cars,
        "devkit/cars_meta.mat, devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat",
        "the official train/test annotations, train cut 80/20 into train/val",
    ),
    "sun397": SplitRule(
        _sun397,
        "ClassName.txt, Training_01.txt and Testing_01.txt",
        "the official partition 01, training cut 80/20 into train/val",
    ),
    "ucf101": SplitRule(
        _ucf101,
        "ucfTrainTestlist/classInd.txt, trainlist01.txt and testlist01.txt",
        "the official split 01, trainlist cut 80/20 into train/val",
    ),
}
"""Rule name (``CatalogEntry.split_rule``) → how the split file is regenerated."""


# --- reading official files ---------------------------------------------------------------------


def _need(path: Path, entry: CatalogEntry) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: {path} not found; regenerating {entry.split_file} needs "
            f"{RULES[split_rule(entry)].files} (the files the dataset ships with). "
            f"Expected layout: {entry.layout}."
        )


def _lines(path: Path, entry: CatalogEntry) -> Iterable[tuple[int, str]]:
    """(1-based line number, stripped line) of a text list, blank and ``#`` lines skipped."""
    _need(path, entry)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def _json_object(path: Path, entry: CatalogEntry) -> dict[str, str]:
    _need(path, entry)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object of label → class name")
    return data


def _mat(path: Path, key: str, entry: CatalogEntry) -> Any:
    """Variable ``key`` of a MATLAB file (``scipy.io.loadmat``, as CoOp reads it)."""
    from scipy.io import loadmat  # local: only the .mat rules need scipy

    _need(path, entry)
    try:
        data = loadmat(path)
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{path}: not a readable MATLAB file ({exc})") from exc
    if key not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(f"{path}: no variable {key!r} (found {found})")
    return data[key]


def _mat_string(value: Any) -> str:
    """A MATLAB char array as loadmat returns it (``array(['text'])``) → ``"text"``."""
    while not isinstance(value, str):
        value = value[0]
    return str(value)


# --- checks and writing --------------------------------------------------------------------------


def _check_listed_images(where: str, image_root: Path, rows: Rows) -> None:
    listed = [rel for split in ("train", "val", "test") for rel, _, _ in rows[split]]
    missing = [rel for rel in listed if not (image_root / rel).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{where}: {len(missing)} of {len(listed)} listed images are missing, the first "
            f"{image_root / missing[0]}; the split file was not written"
        )


def write_atomically(target: Path, text: str, *, overwrite: bool) -> None:
    """Write a split file beside the data so no reader ever sees half of it: a temporary file,
    then a hard link (never replaces a file another process wrote meanwhile) or, with
    ``overwrite``, a rename. Used for every rule's file, Fashion-20's too."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot write {target}: {exc}. Regenerate it where the data folder is writable "
            f"(`python -m vlprompt.datasets make-split`) or put the published file there."
        ) from exc
    os.close(fd)
    try:
        Path(tmp).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic, and never replaces a file another process wrote
            except FileExistsError:
                raise FileExistsError(f"{target} was written meanwhile by another process; kept") from None
            except OSError:  # a file system without hard links
                os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""The files a split-JSON benchmark ships with: read to regenerate its split file, written for its stand-in.

When a CoOp split file cannot be had (dead links, CoOp #90, #29), CoOp re-splits the dataset
from the files it ships with; ``make_split`` does the same by the entry's ``split_rule``. The
generator writes those same files beside a stand-in's split JSON, from the same rows, so a
regenerated split can be checked against a generated folder exactly as against the real one.
Both directions of one dataset's files are one ``SplitRule`` (``RULES``): what ``read`` parses
is what ``write`` writes.

Labels and class names are stored as CoOp stores them (underscores kept; ``read_split_file``
makes them prompt-ready). Train and val rows come class by class in label order (CoOp: in
the order classes first appear in its listing), the test rows of the trainval rules in the
official list's order, as CoOp does. The cuts are ``cuts.py``'s. The rules:

* ``"folders"`` — Caltech101, DTD, Food101, EuroSAT (CoOp ``caltech101.py``, ``dtd.py``,
  ``food101.py``, ``eurosat.py`` → ``read_and_split_data``): class folders in Python's
  sorted order (case-sensitive, so Caltech's "Faces" precedes "accordion"), the entry's
  ``ignored_folders`` skipped, label = index in that order, images sorted by file name;
  50/20/30. Class names are the folder names, renamed where the catalog's prompt name
  differs (Caltech "airplanes" → "airplane", EuroSAT "AnnualCrop" → "Annual Crop Land").
  Nothing to write: the stand-in's class folders are the files.
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
  moved to the front (``year_first``); trainval 80/20.
* ``"sun397"`` — CoOp ``sun397.py``: ``ClassName.txt`` ("/a/abbey"; label = line order),
  ``Training_01.txt`` / ``Testing_01.txt`` ("/a/abbey/sun_x.jpg", relative to ``SUN397/``
  after the leading "/"), class = the image's folder, named by ``sun397_name`` (letter dir
  dropped, the rest reversed: "indoor apse"); trainval 80/20.
* ``"ucf101"`` — CoOp ``ucf101.py``: ``ucfTrainTestlist/classInd.txt`` ("1 ApplyEyeMakeup";
  label = number − 1), ``trainlist01.txt`` / ``testlist01.txt`` (first field
  "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"), image
  ``UCF-101-midframes/Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg``, class name the
  CamelCase action split at capitals with "_" (``ucf101_name``); trainval 80/20.

A bad official file is an error naming the file and line.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlprompt.datasets.cuts import cut_per_class, cut_trainval
from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.files import list_images, read_json, require, subfolders
from vlprompt.datasets.layout import StandIn
from vlprompt.datasets.types import Row, Rows


@dataclass(frozen=True)
class SplitRule:
    """One dataset's official files: how they are read into split rows, and written for a stand-in."""

    read: Callable[[CatalogEntry, Path, random.Random], Rows]  # (entry, dataset folder, rng) -> rows
    files: str  # what it reads, relative to the dataset folder (for messages)
    summary: str  # the cut, in words
    write: Callable[[CatalogEntry, Path, Rows, StandIn], None] | None = None  # None: nothing to write
    # (entry, label, index, split, images per class) -> path under image_dir; None: path_pattern
    image_path: Callable[[CatalogEntry, int, int, str, int], str] | None = None

    def describe(self) -> str:
        """One phrase for messages: what the rule reads and how it cuts."""
        return f"{self.summary} from {self.files}"


# --- class-name rules ------------------------------------------------------------------------


def year_first(name: str) -> str:
    """StanfordCars' class name rule: the model year moves to the front (CoOp stanford_cars.py)."""
    words = name.split()
    return " ".join([words[-1], *words[:-1]]) if words and words[-1].isdigit() else name


def _year_last(name: str) -> str:
    """The inverse of ``year_first``: the devkit's own spelling ("AM General Hummer SUV 2000")."""
    words = name.split()
    return " ".join([*words[1:], words[0]]) if words and words[0].isdigit() else name


def sun397_name(folder: str, *, keep_underscores: bool = False) -> str:
    """SUN397's rule: drop the letter dir, reverse the rest ("b/bakery/shop" → "shop bakery").

    CoOp (sun397.py ``read_data``) stores the name with its underscores ("airplane_cabin")
    and replaces them at prompt time; ``keep_underscores`` gives that stored form.
    """
    parts = [p for p in folder.strip("/").split("/") if p][1:]
    name = " ".join(reversed(parts))
    return name if keep_underscores else name.replace("_", " ")


def ucf101_name(action: str) -> str:
    """UCF101's rule: split the CamelCase action at capitals, join with "_" (CoOp ucf101.py).

    "ApplyEyeMakeup" → "Apply_Eye_Makeup", "YoYo" → "Yo_Yo"; this is also the folder name of
    the action's middle frames in CoOp's ``UCF-101-midframes``.
    """
    return "_".join(re.findall(r"[A-Z][^A-Z]*", action))


def renames(entry: CatalogEntry) -> dict[str, str]:
    """Folder → class name where the catalog's prompt name is not just the folder name."""
    return {
        folder: name
        for folder, name in zip(entry.class_folders, entry.classnames, strict=True)
        if name != folder.replace("_", " ")
    }


# --- reading official files ---------------------------------------------------------------------


def _need(path: Path, entry: CatalogEntry) -> None:
    note = (
        f"; regenerating {entry.split_file} needs {RULES[entry.split_rule].files} "
        f"(the files the dataset ships with)"
    )
    require(entry, path, note=note)


def _lines(path: Path, entry: CatalogEntry) -> Iterable[tuple[int, str]]:
    """(1-based line number, stripped line) of a text list, blank and ``#`` lines skipped."""
    _need(path, entry)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def _json_object(path: Path, entry: CatalogEntry) -> dict[str, str]:
    _need(path, entry)
    data = read_json(path, str(path))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object of label → class name")
    return data


def _mat(path: Path, key: str, entry: CatalogEntry) -> Any:
    """Variable ``key`` of a MATLAB file (``scipy.io.loadmat``, as CoOp reads it)."""
    from scipy.io import loadmat  # local: scipy is heavy and only the .mat rules need it

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


def savemat_bytes(data: dict[str, Any]) -> bytes:
    """``scipy.io.savemat`` output with a fixed header text instead of the creation time.

    MATLAB 5 files start with 116 bytes of free text (scipy writes a timestamp there); a fixed
    text keeps generated datasets byte-identical for the same arguments.
    """
    from scipy.io import savemat  # local: scipy is heavy and only the .mat writers need it

    buffer = io.BytesIO()
    savemat(buffer, data)
    raw = buffer.getvalue()
    header = b"MATLAB 5.0 MAT-file, written by vlprompt.datasets.generate".ljust(116, b" ")
    return header + raw[116:]


def _trainval(rows: Rows) -> list[Row]:
    return sorted(rows["train"] + rows["val"])


# --- class folders (Caltech101, DTD, Food101, EuroSAT) ------------------------------------------


def _read_folders(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    image_root = folder / entry.image_dir
    require(
        entry, image_root, "image folder", is_dir=True, note="; make-split needs one folder per class there"
    )
    classes = [c for c in subfolders(image_root) if c not in entry.ignored_folders]
    if not classes:
        raise FileNotFoundError(f"dataset {entry.name!r}: no class folders in {image_root}")
    new_names = renames(entry)
    by_label = {
        label: [(f"{cls}/{p.name}", label, new_names.get(cls, cls)) for p in list_images(image_root / cls)]
        for label, cls in enumerate(classes)
    }
    return cut_per_class(f"dataset {entry.name!r}: {image_root}", by_label, rng)


# --- Oxford Flowers ------------------------------------------------------------------------------


def _read_flowers(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
    label_file, names_file = folder / "imagelabels.mat", folder / "cat_to_name.json"
    labels = _mat(label_file, "labels", entry).reshape(-1)
    names = _json_object(names_file, entry)
    by_label: dict[int, list[Row]] = defaultdict(list)
    for i, value in enumerate(labels):
        label = int(value)
        if str(label) not in names:
            raise ValueError(f"{label_file}: image {i + 1} has label {label}, not a key of {names_file}")
        by_label[label - 1].append((f"image_{i + 1:05d}.jpg", label - 1, names[str(label)]))
    return cut_per_class(f"dataset {entry.name!r}: {label_file}", by_label, rng)


def _flowers_image(entry: CatalogEntry, label: int, index: int, split: str, per_class: int) -> str:
    # The real images are numbered 1..8189 without gaps (imagelabels.mat gives each number a
    # label), so the stand-in numbers them class after class.
    return f"image_{label * per_class + index + 1:05d}.jpg"


def _write_flowers(entry: CatalogEntry, folder: Path, rows: Rows, stand_in: StandIn) -> None:
    """``imagelabels.mat`` (``labels``: 1 x N, the 1-based class of image_%05d.jpg) and
    ``cat_to_name.json`` ({"1": "pink primrose", ...})."""
    label_of = {int(rel[6:-4]): y + 1 for split in rows for rel, y, _ in rows[split]}  # image_NNNNN.jpg
    numbers = sorted(label_of)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError("oxford_flowers stand-in: image numbers must run 1..N without gaps")
    labels = np.array([[label_of[i] for i in numbers]], dtype=np.uint8)
    (folder / "imagelabels.mat").write_bytes(savemat_bytes({"labels": labels}))
    names = {str(k + 1): entry.classnames[k] for k in range(stand_in.num_classes)}
    (folder / "cat_to_name.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")


# --- Oxford-IIIT Pets ----------------------------------------------------------------------------


def _read_pets(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
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
    return cut_trainval(where, read(annotations / "trainval.txt"), read(annotations / "test.txt"), rng)


# Oxford Pets annotations give each image a species (1 = cat, 2 = dog) and a breed id
# counted within its species; the cat breeds are the capitalised ones in the file names.
_OXFORD_PETS_CATS = frozenset(
    {
        "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
        "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
    }
)  # fmt: skip


def _write_pets(entry: CatalogEntry, folder: Path, rows: Rows, stand_in: StandIn) -> None:
    """``annotations/{trainval,test}.txt``: "<image stem> <class id 1-based> <species> <breed id>"."""
    species_of = {b: 1 if b in _OXFORD_PETS_CATS else 2 for b in entry.class_folders}
    breed_id: dict[str, int] = {}
    for species in (1, 2):
        same = [b for b in entry.class_folders if species_of[b] == species]
        breed_id.update({b: i + 1 for i, b in enumerate(same)})
    out = folder / "annotations"
    out.mkdir(parents=True, exist_ok=True)
    for filename, splits in (("trainval.txt", ("train", "val")), ("test.txt", ("test",))):
        listed = sorted((row for split in splits for row in rows[split]), key=lambda row: row[1])
        lines = []
        for rel, label, _ in listed:  # class by class, as in the real lists
            breed = entry.class_folders[label]
            lines.append(f"{Path(rel).stem} {label + 1} {species_of[breed]} {breed_id[breed]}\n")
        (out / filename).write_text("".join(lines), encoding="utf-8")


# --- Stanford Cars -------------------------------------------------------------------------------


def _read_cars(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
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
    return cut_trainval(f"dataset {entry.name!r}: {folder}", trainval, test, rng)


def _cars_image(entry: CatalogEntry, label: int, index: int, split: str, per_class: int) -> str:
    folder = "cars_test" if split == "test" else "cars_train"
    return f"{folder}/{entry.class_folders[label]}{index + 1:02d}.jpg"


def _write_cars(entry: CatalogEntry, folder: Path, rows: Rows, stand_in: StandIn) -> None:
    """``devkit/cars_meta.mat`` (``class_names``), ``devkit/cars_train_annos.mat`` and
    ``cars_test_annos_withlabels.mat`` (``annotations``: bbox_x1..bbox_y2, class 1-based, fname)."""
    names = np.empty((1, stand_in.num_classes), dtype=object)
    for k in range(stand_in.num_classes):
        names[0, k] = _year_last(entry.classnames[k])
    (folder / "devkit").mkdir(parents=True, exist_ok=True)
    (folder / "devkit" / "cars_meta.mat").write_bytes(savemat_bytes({"class_names": names}))
    size = stand_in.image_size
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    for path, listed in (
        (folder / "devkit" / "cars_train_annos.mat", _trainval(rows)),
        (folder / "cars_test_annos_withlabels.mat", sorted(rows["test"])),
    ):
        annotations = np.empty((1, len(listed)), dtype=[(f, object) for f in fields])
        for i, (rel, label, _) in enumerate(listed):
            box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, size, size)]
            annotations[0, i] = (*box, np.array([[label + 1]], dtype=np.uint8), np.array([Path(rel).name]))
        path.write_bytes(savemat_bytes({"annotations": annotations}))


# --- SUN397 --------------------------------------------------------------------------------------


def _read_sun397(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
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
    return cut_trainval(f"dataset {entry.name!r}: {folder}", trainval, test, rng)


def _write_sun397(entry: CatalogEntry, folder: Path, rows: Rows, stand_in: StandIn) -> None:
    """``ClassName.txt`` ("/a/abbey"), ``Training_01.txt`` / ``Testing_01.txt`` ("/a/abbey/sun_x.jpg")."""
    classes = "".join(f"/{entry.class_folders[k]}\n" for k in range(stand_in.num_classes))
    (folder / "ClassName.txt").write_text(classes, encoding="utf-8")
    for filename, listed in (("Training_01.txt", _trainval(rows)), ("Testing_01.txt", sorted(rows["test"]))):
        (folder / filename).write_text("".join(f"/{rel}\n" for rel, _, _ in listed), encoding="utf-8")


# --- UCF101 --------------------------------------------------------------------------------------


def _read_ucf101(entry: CatalogEntry, folder: Path, rng: random.Random) -> Rows:
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
    return cut_trainval(f"dataset {entry.name!r}: {lists}", trainval, test, rng)


def _ucf_image(entry: CatalogEntry, label: int, index: int, split: str, per_class: int) -> str:
    folder = entry.class_folders[label]  # "Apply_Eye_Makeup"; the video is v_ApplyEyeMakeup_g01_c01
    return f"{folder}/v_{folder.replace('_', '')}_g{index + 1:02d}_c01.jpg"


def _write_ucf101(entry: CatalogEntry, folder: Path, rows: Rows, stand_in: StandIn) -> None:
    """``ucfTrainTestlist/classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist01.txt``
    ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1"), ``testlist01.txt`` (no label)."""
    out = folder / "ucfTrainTestlist"
    out.mkdir(parents=True, exist_ok=True)
    actions = [entry.class_folders[k].replace("_", "") for k in range(stand_in.num_classes)]
    (out / "classInd.txt").write_text("".join(f"{k + 1} {a}\n" for k, a in enumerate(actions)), "utf-8")

    def video(rel: str, label: int) -> str:
        return f"{actions[label]}/{Path(rel).stem}.avi"

    train = "".join(f"{video(rel, y)} {y + 1}\n" for rel, y, _ in _trainval(rows))
    (out / "trainlist01.txt").write_text(train, encoding="utf-8")
    test = "".join(f"{video(rel, y)}\n" for rel, y, _ in sorted(rows["test"]))
    (out / "testlist01.txt").write_text(test, encoding="utf-8")


RULES: dict[str, SplitRule] = {
    "folders": SplitRule(_read_folders, "the class folders", "a 50/20/30 split per class folder"),
    "oxford_flowers": SplitRule(
        _read_flowers,
        "imagelabels.mat and cat_to_name.json",
        "a 50/20/30 split per class",
        _write_flowers,
        _flowers_image,
    ),
    "oxford_pets": SplitRule(
        _read_pets,
        "annotations/trainval.txt and annotations/test.txt",
        "the official trainval/test lists, trainval cut 80/20 into train/val",
        _write_pets,
    ),
    "stanford_cars": SplitRule(
        _read_cars,
        "devkit/cars_meta.mat, devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat",
        "the official train/test annotations, train cut 80/20 into train/val",
        _write_cars,
        _cars_image,
    ),
    "sun397": SplitRule(
        _read_sun397,
        "ClassName.txt, Training_01.txt and Testing_01.txt",
        "the official partition 01, training cut 80/20 into train/val",
        _write_sun397,
    ),
    "ucf101": SplitRule(
        _read_ucf101,
        "ucfTrainTestlist/classInd.txt, trainlist01.txt and testlist01.txt",
        "the official split 01, trainlist cut 80/20 into train/val",
        _write_ucf101,
        _ucf_image,
    ),
}
"""Rule name (``CatalogEntry.split_rule``) → how its split file is regenerated and its files written."""

"""The real CoOp benchmarks as catalog data, and the generator's writers for their non-JSON layouts.

``BENCHMARKS`` holds one plain keyword dict per dataset (``catalog.py`` turns each into a
``CatalogEntry``; this module does not import the catalog, so there is no import cycle).
Folders, image dirs, split-file names, templates and class-name rules follow
``reference/METHODS.md`` §0 (CoOp ``DATASETS.md``, ``datasets/*.py``, ``zsclip.py``).

The class lists of these entries are a *stand-in*: the first classes of the real dataset in
label order (real folder names, CoOp's prompt names), enough for the generator to write a
small copy in the real layout. ``real_num_classes`` is the real count, which readers and the
data doctor check against. Labels of real data always come from the data itself (split
file, ``variants.txt``, ``classnames.txt`` and the folders), never from these lists.

``write_layout`` writes the layouts that have no split JSON (FGVC-Aircraft's text lists, the
ImageNet family's wnid folders + ``classnames.txt``) for ``generate_dataset``; ``OFFICIAL_FILES``
writes, beside a split JSON, the annotation files the real dataset ships with (Pets' lists,
Flowers' and Cars' ``.mat`` files, SUN397's and UCF101's text lists), so that ``make_split``
can regenerate the JSON from a generated folder exactly as from the real one.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from vlprompt.datasets.imagenet_meta import (
    CLASSNAMES_TXT,
    IMAGENET_A_WNIDS,
    IMAGENET_NAMES,
    IMAGENET_R_WNIDS,
    IMAGENET_WNIDS,
)

_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "pink")  # = catalog.COLOURS
_SHAPES = ("circle", "square", "triangle", "cross", "diamond")  # = catalog.SHAPES
_STYLES = tuple((colour, shape) for shape in _SHAPES for colour in _COLOURS)
STAND_IN_CLASSES = 16
"""Classes in the ImageNet-family stand-in lists (the generator writes at most these)."""


def year_first(name: str) -> str:
    """StanfordCars' class name rule: the model year moves to the front (CoOp stanford_cars.py)."""
    words = name.split()
    return " ".join([words[-1], *words[:-1]]) if words and words[-1].isdigit() else name


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


def _spec(
    folder: str,
    image_dir: str,
    split_file: str,
    template: str,
    description: str,
    classes: tuple[tuple[str, str], ...],  # (on-disk folder / id, prompt name) in label order
    path_pattern: str,
    real_num_classes: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "folder": folder,
        "image_dir": image_dir,
        "split_file": split_file,
        "template": template,
        "description": description,
        "class_folders": tuple(f for f, _ in classes),
        "classnames": tuple(n.replace("_", " ") for _, n in classes),
        "styles": _STYLES[: len(classes)],
        "path_pattern": path_pattern,
        "real_num_classes": real_num_classes,
        **extra,
    }


def _same(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((n, n) for n in names)


_CALTECH = (
    # Dassl sorts folders case-sensitively, so the capitalised ones come first (labels 0-2).
    ("Faces", "face"), ("Leopards", "leopard"), ("Motorbikes", "motorbike"),
    ("accordion", "accordion"), ("airplanes", "airplane"), ("anchor", "anchor"),
    ("ant", "ant"), ("barrel", "barrel"), ("bass", "bass"), ("beaver", "beaver"),
)  # fmt: skip
_CARS_RAW = (
    "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
    "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001",
)  # fmt: skip
_FLOWERS = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise",
)  # fmt: skip
_SUN = ("a/abbey", "a/airplane_cabin", "a/airport_terminal", "a/alley", "a/amphitheater", "a/apse/indoor")
_AIRCRAFT = ("707-320", "727-200", "737-200", "737-300", "737-400", "737-500", "737-600", "737-700")
_IMAGENET_ENSEMBLES = ("imagenet80", "imagenet7")  # CLIP's 80 templates, CoOp's 7 selected
_IMAGENET_NAME = dict(zip(IMAGENET_WNIDS, IMAGENET_NAMES, strict=True))


def _wnid_classes(wnids: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((w, _IMAGENET_NAME[w]) for w in wnids[:STAND_IN_CLASSES])


def _imagenet_note(folder: str, images: str, extra: str = "") -> str:
    return (
        f"{folder}/classnames.txt ('<wnid> <class name>' per line, the 1000 lines of "
        f"imagenet/classnames.txt; CoOp DATASETS.md: copy it into this folder) and "
        f"{folder}/{images}{extra}"
    )


BENCHMARKS: dict[str, dict[str, Any]] = {
    "caltech101": _spec(
        "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}.",
        "Caltech101, 100 object classes (CoOp split)", _CALTECH, "{cls}/image_{n:04d}.jpg", 100,
        split_rule="folders", ignored_folders=("BACKGROUND_Google", "Faces_easy"),
    ),
    "dtd": _spec(
        "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.",
        "Describable Textures, 47 texture classes (CoOp split)",
        _same("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked"),
        "{cls}/{cls}_{n:04d}.jpg", 47, split_rule="folders",
    ),
    "food101": _spec(
        "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.",
        "Food-101, 101 dishes (CoOp split)",
        _same("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad"),
        "{cls}/{n}.jpg", 101, split_rule="folders",
    ),
    "oxford_flowers": _spec(
        "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower.",
        "Oxford 102 Flowers (CoOp split; names from cat_to_name.json)",
        tuple((f"{i + 1:03d}", n) for i, n in enumerate(_FLOWERS)), "image_{cls}{n:02d}.jpg", 102,
        split_rule="oxford_flowers", annotations="oxford_flowers",
    ),
    "stanford_cars": _spec(
        "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}.",
        "Stanford Cars, 196 models, year first (CoOp split; paths like cars_train/00001.jpg)",
        tuple((f"{i + 1:03d}", year_first(n)) for i, n in enumerate(_CARS_RAW)),
        "cars_train/{cls}{n:02d}.jpg", 196, split_rule="stanford_cars", annotations="stanford_cars",
    ),
    "sun397": _spec(
        "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}.",
        "SUN397, 397 scene classes (CoOp split)",
        tuple((f, sun397_name(f)) for f in _SUN), "{cls}/sun_{n:06d}.jpg", 397,
        split_rule="sun397", annotations="sun397",
    ),
    "ucf101": _spec(
        "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.",
        "UCF101 middle frames, 101 actions (CoOp split)",
        _same("Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling", "Balance_Beam"),
        # the generator names frames as the real ones (OFFICIAL_FILES: v_ApplyEyeMakeup_g01_c01.jpg)
        "{cls}/v_{cls}_g{n:02d}_c01.jpg", 101, split_rule="ucf101", annotations="ucf101",
        layout_note=(
            "ucf101/split_zhou_UCF101.json (split file) and ucf101/UCF-101-midframes/"
            "Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg (a video's middle frame: folder = the "
            "action split at capitals with '_', file = the video name; paths relative to "
            "ucf101/UCF-101-midframes); make-split reads ucf101/ucfTrainTestlist/"
            "{classInd,trainlist01,testlist01}.txt"
        ),
    ),
    "fgvc_aircraft": _spec(
        "fgvc_aircraft", "images", "", "a photo of a {}, a type of aircraft.",
        "FGVC-Aircraft 2013b variants, 100 classes (official lists, no split JSON)",
        _same(*_AIRCRAFT), "", 100, reader="fgvc_aircraft",
        layout_note=(
            "fgvc_aircraft/variants.txt (one variant per line, label order), "
            "fgvc_aircraft/images_variant_{train,val,test}.txt ('<image id> <variant>' per line) "
            "and fgvc_aircraft/images/<image id>.jpg (the data/ folder of fgvc-aircraft-2013b)"
        ),
    ),
    "imagenet": _spec(
        "imagenet", "images", "", "a photo of a {}.",
        "ImageNet-1k (images/train and images/val by wnid; val is also the test set, as in CoOp)",
        _wnid_classes(IMAGENET_WNIDS), "", 1000, reader="imagenet", classnames_file="classnames.txt",
        ensembles=_IMAGENET_ENSEMBLES,
        layout_note=(
            "imagenet/classnames.txt ('<wnid> <class name>' per line, 1000 lines) and "
            "imagenet/images/train/<wnid>/*.JPEG, imagenet/images/val/<wnid>/*.JPEG "
            "(one folder per class in val too, not the flat val folder image-net.org ships)"
        ),
    ),
    "imagenet_v2": _spec(
        "imagenetv2", "imagenetv2-matched-frequency-format-val", "", "a photo of a {}.",
        "ImageNetV2 matched-frequency, 1000 classes (test only)",
        tuple((str(i), IMAGENET_NAMES[i]) for i in range(STAND_IN_CLASSES)), "", 1000,
        reader="imagenet_v2", classnames_file="classnames.txt",
        ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note(
            "imagenetv2", "imagenetv2-matched-frequency-format-val/<i>/*.jpeg",
            " (folder <i> = 0..999 is line i of classnames.txt, by number)",
        ),
    ),
    "imagenet_sketch": _spec(
        "imagenet-sketch", "images", "", "a photo of a {}.",
        "ImageNet-Sketch, 1000 classes (test only)",
        _wnid_classes(IMAGENET_WNIDS), "", 1000, reader="imagenet_folders", classnames_file="classnames.txt",
        ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note("imagenet-sketch", "images/<wnid>/*"),
    ),
    "imagenet_a": _spec(
        "imagenet-adversarial", "imagenet-a", "", "a photo of a {}.",
        "ImageNet-A, 200 of the ImageNet classes (test only)",
        _wnid_classes(IMAGENET_A_WNIDS), "", 200, reader="imagenet_folders", classnames_file="classnames.txt",
        ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note("imagenet-adversarial", "imagenet-a/<wnid>/* (200 wnid folders)"),
    ),
    "imagenet_r": _spec(
        "imagenet-rendition", "imagenet-r", "", "a photo of a {}.",
        "ImageNet-R, 200 of the ImageNet classes (test only)",
        _wnid_classes(IMAGENET_R_WNIDS), "", 200, reader="imagenet_folders", classnames_file="classnames.txt",
        ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note("imagenet-rendition", "imagenet-r/<wnid>/* (200 wnid folders)"),
    ),
}  # fmt: skip


# --- generator writers for layouts without a split JSON -------------------------------------

ImageFor = Callable[[int, int], Image.Image]  # (label, index) -> image
Save = Callable[[Image.Image, Path], None]


def write_layout(entry: Any, folder: Path, params: dict[str, Any], image_for: ImageFor, save: Save) -> None:
    """Write the first ``params["num_classes"]`` stand-in classes of ``entry`` in its real layout.

    Images are split 50/20/30 per class as everywhere in the generator (``split_counts``);
    layouts that only have a test split (the ImageNet shifts) get all images. The ImageNet
    family always gets the full 1000-line ``classnames.txt``, so a subset of wnid folders
    is read exactly as the real data would be.
    """
    if entry.reader == "fashion20":  # SoftCPT's multi-task layout, written by fashion20.py
        from vlprompt.datasets.fashion20 import write_layout as write_fashion20

        return write_fashion20(entry, folder, params, image_for, save)
    from vlprompt.datasets.generate import split_counts  # local: generate imports this module's user

    k, per_class = params["num_classes"], params["images_per_class"]
    n_train, n_val, _ = split_counts(per_class)
    image_root = folder / entry.image_dir

    def which(index: int) -> str:
        return "train" if index < n_train else "val" if index < n_train + n_val else "test"

    if entry.reader == "fgvc_aircraft":
        variants = entry.class_folders[:k]
        lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for label, variant in enumerate(variants):
            for index in range(per_class):
                image_id = f"{label * 10000 + index + 1:07d}"
                save(image_for(label, index), image_root / f"{image_id}.jpg")
                lists[which(index)].append(f"{image_id} {variant}\n")
        (folder / "variants.txt").write_text("".join(f"{v}\n" for v in variants), encoding="utf-8")
        for split, lines in lists.items():
            (folder / f"images_variant_{split}.txt").write_text("".join(lines), encoding="utf-8")
        return
    if entry.reader not in ("imagenet", "imagenet_v2", "imagenet_folders"):
        raise ValueError(f"catalog entry {entry.name!r}: no generator for reader {entry.reader!r}")
    (folder / entry.classnames_file).write_text(CLASSNAMES_TXT, encoding="utf-8")
    for label in range(k):
        cls = entry.class_folders[label]
        for index in range(per_class):
            if entry.reader == "imagenet":
                sub = "train" if index < n_train else "val"
                path = image_root / sub / cls / f"{cls}_{index + 1}.JPEG"
            else:
                path = image_root / cls / f"{index + 1}.jpeg"
            save(image_for(label, index), path)
    if entry.reader == "imagenet_folders":  # ImageNet-A ships a README.txt beside the folders
        (image_root / "README.txt").write_text("stand-in written by vlprompt\n", encoding="utf-8")


# --- generator writers for the official files make_split reads ------------------------------
# A split-JSON benchmark whose entry names ``annotations`` gets, besides its CoOp split file,
# the files the dataset ships with (the ones CoOp re-splits from when the JSON is missing),
# written from the same rows as the JSON: train+val → the official train(val) list, test →
# the test list. ``image_path`` names the images where the real layout cannot be written as
# a ``path_pattern`` (numbered by dataset, per split folder, or a CamelCase file name).

Row = tuple[str, int, str]  # = splits.Row (not imported: the catalog imports this module)
Rows = dict[str, list[Row]]


class OfficialFiles(NamedTuple):
    """How ``generate_dataset`` writes one kind of official annotation files."""

    write: Callable[[Any, Path, Rows, dict[str, Any]], None]  # (entry, folder, rows, params)
    # (entry, label, index, split, images per class) -> path under image_dir; None: path_pattern
    image_path: Callable[[Any, int, int, str, int], str] | None = None


def _trainval(rows: Rows) -> list[Row]:
    return sorted(rows["train"] + rows["val"])


def _write_pets(entry: Any, folder: Path, rows: Rows, params: dict[str, Any]) -> None:
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


# Oxford Pets annotations give each image a species (1 = cat, 2 = dog) and a breed id
# counted within its species; the cat breeds are the capitalised ones in the file names.
_OXFORD_PETS_CATS = frozenset(
    {
        "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
        "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
    }
)  # fmt: skip


def _flowers_image(entry: Any, label: int, index: int, split: str, per_class: int) -> str:
    # The real images are numbered 1..8189 without gaps (imagelabels.mat gives each number a
    # label), so the stand-in numbers them class after class.
    return f"image_{label * per_class + index + 1:05d}.jpg"


def _write_flowers(entry: Any, folder: Path, rows: Rows, params: dict[str, Any]) -> None:
    """``imagelabels.mat`` (``labels``: 1 x N, the 1-based class of image_%05d.jpg) and
    ``cat_to_name.json`` ({"1": "pink primrose", ...})."""
    label_of = {int(rel[6:-4]): y + 1 for split in rows for rel, y, _ in rows[split]}  # image_NNNNN.jpg
    numbers = sorted(label_of)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError("oxford_flowers stand-in: image numbers must run 1..N without gaps")
    labels = np.array([[label_of[i] for i in numbers]], dtype=np.uint8)
    (folder / "imagelabels.mat").write_bytes(savemat_bytes({"labels": labels}))
    names = {str(k + 1): entry.classnames[k] for k in range(params["num_classes"])}
    (folder / "cat_to_name.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")


def _year_last(name: str) -> str:
    """The inverse of ``year_first``: the devkit's own spelling ("AM General Hummer SUV 2000")."""
    words = name.split()
    return " ".join([*words[1:], words[0]]) if words and words[0].isdigit() else name


def _cars_image(entry: Any, label: int, index: int, split: str, per_class: int) -> str:
    folder = "cars_test" if split == "test" else "cars_train"
    return f"{folder}/{entry.class_folders[label]}{index + 1:02d}.jpg"


def _write_cars(entry: Any, folder: Path, rows: Rows, params: dict[str, Any]) -> None:
    """``devkit/cars_meta.mat`` (``class_names``), ``devkit/cars_train_annos.mat`` and
    ``cars_test_annos_withlabels.mat`` (``annotations``: bbox_x1..bbox_y2, class 1-based, fname)."""
    names = np.empty((1, params["num_classes"]), dtype=object)
    for k in range(params["num_classes"]):
        names[0, k] = _year_last(entry.classnames[k])
    (folder / "devkit").mkdir(parents=True, exist_ok=True)
    (folder / "devkit" / "cars_meta.mat").write_bytes(savemat_bytes({"class_names": names}))
    size = params["image_size"]
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


def _write_sun397(entry: Any, folder: Path, rows: Rows, params: dict[str, Any]) -> None:
    """``ClassName.txt`` ("/a/abbey"), ``Training_01.txt`` / ``Testing_01.txt`` ("/a/abbey/sun_x.jpg")."""
    classes = "".join(f"/{entry.class_folders[k]}\n" for k in range(params["num_classes"]))
    (folder / "ClassName.txt").write_text(classes, encoding="utf-8")
    for filename, listed in (("Training_01.txt", _trainval(rows)), ("Testing_01.txt", sorted(rows["test"]))):
        (folder / filename).write_text("".join(f"/{rel}\n" for rel, _, _ in listed), encoding="utf-8")


def _ucf_image(entry: Any, label: int, index: int, split: str, per_class: int) -> str:
    folder = entry.class_folders[label]  # "Apply_Eye_Makeup"; the video is v_ApplyEyeMakeup_g01_c01
    return f"{folder}/v_{folder.replace('_', '')}_g{index + 1:02d}_c01.jpg"


def _write_ucf101(entry: Any, folder: Path, rows: Rows, params: dict[str, Any]) -> None:
    """``ucfTrainTestlist/classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist01.txt``
    ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1"), ``testlist01.txt`` (no label)."""
    out = folder / "ucfTrainTestlist"
    out.mkdir(parents=True, exist_ok=True)
    actions = [entry.class_folders[k].replace("_", "") for k in range(params["num_classes"])]
    (out / "classInd.txt").write_text("".join(f"{k + 1} {a}\n" for k, a in enumerate(actions)), "utf-8")

    def video(rel: str, label: int) -> str:
        return f"{actions[label]}/{Path(rel).stem}.avi"

    train = "".join(f"{video(rel, y)} {y + 1}\n" for rel, y, _ in _trainval(rows))
    (out / "trainlist01.txt").write_text(train, encoding="utf-8")
    test = "".join(f"{video(rel, y)}\n" for rel, y, _ in sorted(rows["test"]))
    (out / "testlist01.txt").write_text(test, encoding="utf-8")


OFFICIAL_FILES: dict[str, OfficialFiles] = {
    "oxford_pets": OfficialFiles(_write_pets),
    "oxford_flowers": OfficialFiles(_write_flowers, _flowers_image),
    "stanford_cars": OfficialFiles(_write_cars, _cars_image),
    "sun397": OfficialFiles(_write_sun397),
    "ucf101": OfficialFiles(_write_ucf101, _ucf_image),
}
"""``CatalogEntry.annotations`` → the generator's writer of those official files."""


def savemat_bytes(data: dict[str, Any]) -> bytes:
    """``scipy.io.savemat`` output with a fixed header text instead of the creation time.

    MATLAB 5 files start with 116 bytes of free text (scipy writes a timestamp there); a fixed
    text keeps generated datasets byte-identical for the same arguments.
    """
    from scipy.io import savemat  # local: only the generator needs scipy's writer

    buffer = io.BytesIO()
    savemat(buffer, data)
    raw = buffer.getvalue()
    header = b"MATLAB 5.0 MAT-file, written by vlprompt.datasets.generate".ljust(116, b" ")
    return header + raw[116:]

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
ImageNet family's wnid folders + ``classnames.txt``) for ``generate_dataset``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def sun397_name(folder: str) -> str:
    """SUN397's rule: drop the letter dir, reverse the rest ("b/bakery/shop" → "shop bakery")."""
    parts = [p for p in folder.strip("/").split("/") if p][1:]
    return " ".join(reversed(parts)).replace("_", " ")


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
    ),
    "stanford_cars": _spec(
        "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}.",
        "Stanford Cars, 196 models, year first (CoOp split; paths like cars_train/00001.jpg)",
        tuple((f"{i + 1:03d}", year_first(n)) for i, n in enumerate(_CARS_RAW)),
        "cars_train/{cls}{n:02d}.jpg", 196,
    ),
    "sun397": _spec(
        "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}.",
        "SUN397, 397 scene classes (CoOp split)",
        tuple((f, sun397_name(f)) for f in _SUN), "{cls}/sun_{n:06d}.jpg", 397,
    ),
    "ucf101": _spec(
        "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.",
        "UCF101 middle frames, 101 actions (CoOp split)",
        _same("Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling", "Balance_Beam"),
        "{cls}/v_{cls}_g{n:02d}_c01.jpg", 101,
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
        layout_note=_imagenet_note(
            "imagenetv2", "imagenetv2-matched-frequency-format-val/<i>/*.jpeg",
            " (folder <i> = 0..999 is line i of classnames.txt, by number)",
        ),
    ),
    "imagenet_sketch": _spec(
        "imagenet-sketch", "images", "", "a photo of a {}.",
        "ImageNet-Sketch, 1000 classes (test only)",
        _wnid_classes(IMAGENET_WNIDS), "", 1000, reader="imagenet_folders", classnames_file="classnames.txt",
        layout_note=_imagenet_note("imagenet-sketch", "images/<wnid>/*"),
    ),
    "imagenet_a": _spec(
        "imagenet-adversarial", "imagenet-a", "", "a photo of a {}.",
        "ImageNet-A, 200 of the ImageNet classes (test only)",
        _wnid_classes(IMAGENET_A_WNIDS), "", 200, reader="imagenet_folders", classnames_file="classnames.txt",
        layout_note=_imagenet_note("imagenet-adversarial", "imagenet-a/<wnid>/* (200 wnid folders)"),
    ),
    "imagenet_r": _spec(
        "imagenet-rendition", "imagenet-r", "", "a photo of a {}.",
        "ImageNet-R, 200 of the ImageNet classes (test only)",
        _wnid_classes(IMAGENET_R_WNIDS), "", 200, reader="imagenet_folders", classnames_file="classnames.txt",
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

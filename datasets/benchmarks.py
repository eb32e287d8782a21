"""The real CoOp benchmarks as catalog entries: the 11 few-shot datasets and ImageNet's shifts.

``BENCHMARKS`` holds one ``CatalogEntry`` per dataset (``catalog.py`` puts them into
``CATALOG``). Folders, image dirs, split-file names, templates and class-name rules follow
``KaiyangZhou/CoOp`` (``DATASETS.md``, ``datasets/*.py``, ``trainers/zsclip.py``). Each
names its layout (``layout_name``; split JSON unless said) and, for a split-JSON benchmark,
the official-files rule (``split_rule``, ``official.RULES``) that regenerates its split file
and writes its stand-in's annotation files.

The class lists of these entries are a *stand-in*: the first classes of the real dataset in
label order (real folder names, CoOp's prompt names), enough for the generator to write a
small copy in the real layout. ``real_num_classes`` is the real count, which readers and the
data doctor check against. Labels of real data always come from the data itself (split
file, ``variants.txt``, ``classnames.txt`` and the folders), never from these lists.
"""

from __future__ import annotations

from typing import Any

from vlprompt.datasets.entry import PALETTE, CatalogEntry
from vlprompt.datasets.imagenet_meta import (
    IMAGENET_A_WNIDS,
    IMAGENET_NAMES,
    IMAGENET_R_WNIDS,
    IMAGENET_WNIDS,
)
from vlprompt.datasets.official import sun397_name, year_first

STAND_IN_CLASSES = 16
"""Classes in the ImageNet-family stand-in lists (the generator writes at most these)."""


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
        "styles": PALETTE[: len(classes)],
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


_SPECS: dict[str, dict[str, Any]] = {
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
        split_rule="oxford_flowers",
    ),
    "stanford_cars": _spec(
        "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}.",
        "Stanford Cars, 196 models, year first (CoOp split; paths like cars_train/00001.jpg)",
        tuple((f"{i + 1:03d}", year_first(n)) for i, n in enumerate(_CARS_RAW)),
        "cars_train/{cls}{n:02d}.jpg", 196, split_rule="stanford_cars",
    ),
    "sun397": _spec(
        "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}.",
        "SUN397, 397 scene classes (CoOp split)",
        tuple((f, sun397_name(f)) for f in _SUN), "{cls}/sun_{n:06d}.jpg", 397,
        split_rule="sun397",
    ),
    "ucf101": _spec(
        "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.",
        "UCF101 middle frames, 101 actions (CoOp split)",
        _same("Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling", "Balance_Beam"),
        # the generator names frames as the real ones (official.RULES: v_ApplyEyeMakeup_g01_c01.jpg)
        "{cls}/v_{cls}_g{n:02d}_c01.jpg", 101, split_rule="ucf101",
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
        _same(*_AIRCRAFT), "", 100, layout_name="fgvc_aircraft",
        layout_note=(
            "fgvc_aircraft/variants.txt (one variant per line, label order), "
            "fgvc_aircraft/images_variant_{train,val,test}.txt ('<image id> <variant>' per line) "
            "and fgvc_aircraft/images/<image id>.jpg (the data/ folder of fgvc-aircraft-2013b)"
        ),
    ),
    "imagenet": _spec(
        "imagenet", "images", "", "a photo of a {}.",
        "ImageNet-1k (images/train and images/val by wnid; val is also the test set, as in CoOp)",
        _wnid_classes(IMAGENET_WNIDS), "", 1000, layout_name="imagenet", classnames_file="classnames.txt",
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
        layout_name="imagenet_v2", classnames_file="classnames.txt",
        ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note(
            "imagenetv2", "imagenetv2-matched-frequency-format-val/<i>/*.jpeg",
            " (folder <i> = 0..999 is line i of classnames.txt, by number)",
        ),
    ),
    "imagenet_sketch": _spec(
        "imagenet-sketch", "images", "", "a photo of a {}.",
        "ImageNet-Sketch, 1000 classes (test only)",
        _wnid_classes(IMAGENET_WNIDS), "", 1000,
        layout_name="imagenet_folders", classnames_file="classnames.txt", ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note("imagenet-sketch", "images/<wnid>/*"),
    ),
    "imagenet_a": _spec(
        "imagenet-adversarial", "imagenet-a", "", "a photo of a {}.",
        "ImageNet-A, 200 of the ImageNet classes (test only)",
        _wnid_classes(IMAGENET_A_WNIDS), "", 200,
        layout_name="imagenet_folders", classnames_file="classnames.txt", ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note("imagenet-adversarial", "imagenet-a/<wnid>/* (200 wnid folders)"),
    ),
    "imagenet_r": _spec(
        "imagenet-rendition", "imagenet-r", "", "a photo of a {}.",
        "ImageNet-R, 200 of the ImageNet classes (test only)",
        _wnid_classes(IMAGENET_R_WNIDS), "", 200,
        layout_name="imagenet_folders", classnames_file="classnames.txt", ensembles=_IMAGENET_ENSEMBLES,
        layout_note=_imagenet_note("imagenet-rendition", "imagenet-r/<wnid>/* (200 wnid folders)"),
    ),
}  # fmt: skip


BENCHMARKS: dict[str, CatalogEntry] = {name: CatalogEntry(name=name, **spec) for name, spec in _SPECS.items()}

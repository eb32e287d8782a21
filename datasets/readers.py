"""Readers for the layouts that have no CoOp split JSON: FGVC-Aircraft and the ImageNet family.

``load_dataset`` hands an entry to ``read_dataset`` when its ``reader`` field is not
``"split_json"``; the field picks the function from ``READERS`` (never the dataset name):

* ``fgvc_aircraft`` — ``variants.txt`` (label = line order) and
  ``images_variant_{train,val,test}.txt`` ("<image id> <variant name with spaces>"), images
  ``images/<id>.jpg`` (CoOp ``datasets/fgvc_aircraft.py``).
* ``imagenet`` — ``images/{train,val}/<wnid>/*`` and ``classnames.txt``; label = index in the
  sorted wnid folders, the val images are both val and test (CoOp ``datasets/imagenet.py``).
  A flat val folder (image-net.org's form) is an error that explains the re-layout.
* ``imagenet_v2`` — folders ``0``…``999``; folder *number* i is line i of ``classnames.txt``
  (never the string order of the names: ImageNetV2 issue #10), all 1000 class names kept.
* ``imagenet_folders`` — ImageNet-Sketch / -A / -R: wnid folders, label = index in the sorted
  folder list, names from ``classnames.txt``; stray files (ImageNet-A's README.txt) ignored.
* ``fashion20`` — SoftCPT's multi-task folder: no single ``DatasetSplits``, so
  ``load_dataset`` says to use ``load_tasks`` (``fashion20.py``, ``tasks.py`` read it).

The ImageNet family records each label's wnid and ImageNet index (``DatasetSplits.wnids``,
``imagenet_labels``). The number of class folders must equal the entry's class count
(1000, or 200 for A/R) — except in a folder ``generate_dataset`` wrote, whose marker file
declares the subset it generated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vlprompt.datasets.catalog import CatalogEntry
from vlprompt.datasets.types import DatasetSplits, Datum

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def read_dataset(entry: CatalogEntry, root: Path) -> DatasetSplits:
    """Read ``entry`` from ``root`` with the reader its ``reader`` field names."""
    try:
        reader = READERS[entry.reader]
    except KeyError:
        raise ValueError(
            f"catalog entry {entry.name!r}: unknown reader {entry.reader!r}; known: "
            f"split_json, {', '.join(sorted(READERS))}"
        ) from None
    if entry.multitask:  # an error whether or not the data is there
        return reader(entry, root / entry.folder)
    folder = root / entry.folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset {entry.name!r} ({entry.description}): folder {folder} does not exist. "
            f"Expected layout under {root}: {entry.layout}. For a procedural stand-in with the "
            f"same layout run `python -m vlprompt.datasets generate {entry.name} --root {root}`."
        )
    return reader(entry, folder)


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (no hidden files), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _need_dir(entry: CatalogEntry, path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: {what} {path} not found. Expected layout: {entry.layout}."
        )


def _need_file(entry: CatalogEntry, path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: {what} {path} not found. Expected layout: {entry.layout}."
        )


def _splits(
    entry: CatalogEntry, classnames: Sequence[str], image_root: Path, **items: object
) -> DatasetSplits:
    return DatasetSplits(
        name=entry.name,
        classnames=tuple(classnames),
        template=entry.template,
        train=items.get("train", ()),  # type: ignore[arg-type]
        val=items.get("val", ()),  # type: ignore[arg-type]
        test=items.get("test", ()),  # type: ignore[arg-type]
        image_root=os.path.abspath(image_root),
        wnids=items.get("wnids", ()),  # type: ignore[arg-type]
        imagenet_labels=items.get("imagenet_labels", ()),  # type: ignore[arg-type]
    )


# --- FGVC-Aircraft ----------------------------------------------------------------------------


def read_fgvc_aircraft(entry: CatalogEntry, folder: Path) -> DatasetSplits:
    variants_file = folder / "variants.txt"
    _need_file(entry, variants_file, "class list")
    variants = [
        line.strip() for line in variants_file.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not variants:
        raise ValueError(f"dataset {entry.name!r}: {variants_file} lists no variants")
    if len(set(variants)) != len(variants):
        raise ValueError(f"dataset {entry.name!r}: {variants_file} lists a variant twice")
    label_of = {v: i for i, v in enumerate(variants)}
    image_root = folder / entry.image_dir
    _need_dir(entry, image_root, "image folder")
    items: dict[str, tuple[Datum, ...]] = {}
    for split in ("train", "val", "test"):
        list_file = folder / f"images_variant_{split}.txt"
        _need_file(entry, list_file, f"{split} list")
        rows: list[Datum] = []
        missing: list[Path] = []
        for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            variant = variant.strip()
            if variant not in label_of:
                raise ValueError(
                    f"dataset {entry.name!r}: {list_file} line {n}: variant {variant!r} is not in "
                    f"{variants_file}; expected '<image id> <variant name>'"
                )
            path = image_root / f"{image_id}.jpg"
            if not path.is_file():
                missing.append(path)
            rows.append(Datum(os.path.abspath(path), label_of[variant], variant.replace("_", " ")))
        if missing:
            raise FileNotFoundError(
                f"dataset {entry.name!r}: {len(missing)} images listed in {list_file} are missing, "
                f"the first {missing[0]}. Expected layout: {entry.layout}."
            )
        items[split] = tuple(rows)
    return _splits(entry, [v.replace("_", " ") for v in variants], image_root, **items)


# --- the ImageNet family ----------------------------------------------------------------------


def read_classnames(path: Path) -> dict[str, str]:
    """``classnames.txt``: "<wnid> <class name with spaces>" per line, in ImageNet label order."""
    names: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip():
            raise ValueError(f"{path} line {n}: expected '<wnid> <class name>', got {line!r:.100}")
        if wnid in names:
            raise ValueError(f"{path} line {n}: wnid {wnid} listed twice")
        names[wnid] = name.strip()
    if not names:
        raise ValueError(f"{path}: no classes listed")
    return names


def _classnames_of(entry: CatalogEntry, folder: Path) -> dict[str, str]:
    path = folder / entry.classnames_file
    if not path.is_file():
        copy = "" if entry.reader == "imagenet" else " (CoOp DATASETS.md: copy imagenet/classnames.txt here)"
        raise FileNotFoundError(
            f"dataset {entry.name!r}: class list {path} not found{copy}. Expected layout: {entry.layout}."
        )
    return read_classnames(path)


def _generated_classes(folder: Path) -> int | None:
    """The class count a ``generate_dataset`` marker declares for ``folder``, if any."""
    from vlprompt.datasets.generate import MARKER_FILE  # local: keeps this module light

    marker = folder / MARKER_FILE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8")).get("num_classes")


def _check_count(entry: CatalogEntry, folder: Path, where: Path, found: int) -> None:
    expected = entry.num_classes
    if found != expected and found != _generated_classes(folder):
        raise ValueError(
            f"dataset {entry.name!r}: found {found} class folders in {where}, expected {expected}. "
            f"Expected layout: {entry.layout}."
        )


def _wnid_items(
    entry: CatalogEntry, names: dict[str, str], split_dir: Path, wnids: Sequence[str]
) -> tuple[Datum, ...]:
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise ValueError(
            f"dataset {entry.name!r}: {len(unknown)} folders in {split_dir} are not wnids listed in "
            f"{entry.folder}/{entry.classnames_file}, e.g. {unknown[:5]}. Expected layout: {entry.layout}."
        )
    items: list[Datum] = []
    for label, wnid in enumerate(wnids):
        classname = names[wnid].replace("_", " ")
        items.extend(Datum(os.path.abspath(p), label, classname) for p in list_images(split_dir / wnid))
    return tuple(items)


def _imagenet_fields(names: dict[str, str], wnids: Sequence[str]) -> dict[str, tuple]:
    index = {w: i for i, w in enumerate(names)}
    return {"wnids": tuple(wnids), "imagenet_labels": tuple(index[w] for w in wnids)}


def read_imagenet(entry: CatalogEntry, folder: Path) -> DatasetSplits:
    names = _classnames_of(entry, folder)
    image_root = folder / entry.image_dir
    train_dir, val_dir = image_root / "train", image_root / "val"
    _need_dir(entry, train_dir, "training image folder")
    _need_dir(entry, val_dir, "validation image folder")
    flat = list_images(val_dir)
    if flat:
        raise ValueError(
            f"dataset {entry.name!r}: {val_dir} holds {len(flat)} images directly (flat ImageNet val, "
            f"as image-net.org distributes it); CoOp's layout needs one folder per class: "
            f"{val_dir}/<wnid>/<image>. Re-lay it out with the devkit labels, e.g. for each row "
            f"'<image id> <wnid> ...' of LOC_val_solution.csv move <image id>.JPEG into val/<wnid>/ "
            f"(the widely used valprep.sh script does exactly this)."
        )
    wnids = _subfolders(train_dir)
    val_wnids = _subfolders(val_dir)
    if wnids != val_wnids:
        only_train = sorted(set(wnids) - set(val_wnids))[:5]
        only_val = sorted(set(val_wnids) - set(wnids))[:5]
        raise ValueError(
            f"dataset {entry.name!r}: {train_dir} and {val_dir} hold different class folders "
            f"({len(wnids)} vs {len(val_wnids)}; only in train: {only_train}, only in val: {only_val})"
        )
    _check_count(entry, folder, train_dir, len(wnids))
    train = _wnid_items(entry, names, train_dir, wnids)
    val = _wnid_items(entry, names, val_dir, wnids)
    classnames = [names[w].replace("_", " ") for w in wnids]
    return _splits(
        entry, classnames, image_root, train=train, val=val, test=val, **_imagenet_fields(names, wnids)
    )


def read_imagenet_v2(entry: CatalogEntry, folder: Path) -> DatasetSplits:
    names = _classnames_of(entry, folder)
    image_root = folder / entry.image_dir
    _need_dir(entry, image_root, "image folder")
    found = _subfolders(image_root)
    bad = [f for f in found if not f.isdigit() or int(f) >= len(names)]
    if bad:
        raise ValueError(
            f"dataset {entry.name!r}: folders {bad[:5]} in {image_root} are not class numbers "
            f"0..{len(names) - 1}. Expected layout: {entry.layout}."
        )
    _check_count(entry, folder, image_root, len(found))
    wnids = list(names)
    items: list[Datum] = []
    for folder_name in sorted(found, key=int):  # by NUMBER: "10" is class 10, not the 3rd string
        label = int(folder_name)
        classname = names[wnids[label]].replace("_", " ")
        items.extend(
            Datum(os.path.abspath(p), label, classname) for p in list_images(image_root / folder_name)
        )
    classnames = [n.replace("_", " ") for n in names.values()]
    return _splits(entry, classnames, image_root, test=tuple(items), **_imagenet_fields(names, wnids))


def read_imagenet_folders(entry: CatalogEntry, folder: Path) -> DatasetSplits:
    names = _classnames_of(entry, folder)
    image_root = folder / entry.image_dir
    _need_dir(entry, image_root, "image folder")
    wnids = _subfolders(image_root)  # sorted; files such as ImageNet-A's README.txt are skipped
    _check_count(entry, folder, image_root, len(wnids))
    test = _wnid_items(entry, names, image_root, wnids)
    classnames = [names[w].replace("_", " ") for w in wnids]
    return _splits(entry, classnames, image_root, test=test, **_imagenet_fields(names, wnids))


# --- multi-task folders -----------------------------------------------------------------------


def read_multitask(entry: CatalogEntry, folder: Path) -> DatasetSplits:
    raise ValueError(
        f"{entry.name} is a multi-task dataset: use load_tasks / data.protocol=multi_task "
        f"(vlprompt.datasets.load_tasks({entry.name!r}, root) gives one DatasetSplits per task; "
        f"its tasks reuse class names, so they cannot be one {entry.name!r} classification)"
    )


READERS: dict[str, Callable[[CatalogEntry, Path], DatasetSplits]] = {
    "fgvc_aircraft": read_fgvc_aircraft,
    "imagenet": read_imagenet,
    "imagenet_v2": read_imagenet_v2,
    "imagenet_folders": read_imagenet_folders,
    "fashion20": read_multitask,
}
"""Readers by ``CatalogEntry.reader``; ``"split_json"`` is ``splits.load_dataset`` itself."""

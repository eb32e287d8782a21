"""The ImageNet family's three layouts: wnid folders (or numbered ones) beside ``classnames.txt``.

* ``IMAGENET`` — ``images/{train,val}/<wnid>/*`` and ``classnames.txt``; label = index in the
  sorted wnid folders, the val images are both val and test (CoOp ``datasets/imagenet.py``).
  A flat val folder (image-net.org's form) is an error that explains the re-layout.
* ``IMAGENET_V2`` — folders ``0``…``999``; folder *number* i is line i of ``classnames.txt``
  (never the string order of the names: ImageNetV2 issue #10), all 1000 class names kept.
* ``IMAGENET_FOLDERS`` — ImageNet-Sketch / -A / -R: wnid folders, label = index in the sorted
  folder list, names from ``classnames.txt`` (CoOp DATASETS.md: copied from ImageNet's);
  stray files (ImageNet-A's README.txt) ignored.

Every reader records each label's wnid and ImageNet index (``DatasetSplits.wnids``,
``imagenet_labels``). The number of class folders must equal the entry's class count (1000,
or 200 for A/R) — except in a folder ``generate_dataset`` wrote, whose marker file declares
the subset it generated. The stand-ins always get the full 1000-line ``classnames.txt``, so a
subset of folders is read exactly as the real data would be; the shifts are test only, so
they get every image, ImageNet itself its 50/20/30 train share as train and the rest as val.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vlprompt.datasets.cuts import split_counts
from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.files import generated_count, list_images, require, subfolders
from vlprompt.datasets.imagenet_meta import CLASSNAMES_TXT
from vlprompt.datasets.layout import Layout, StandIn
from vlprompt.datasets.types import DatasetSplits, Datum

_COPY_NOTE = " (CoOp DATASETS.md: copy imagenet/classnames.txt here)"


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


def _classnames_of(entry: CatalogEntry, folder: Path, note: str = _COPY_NOTE) -> dict[str, str]:
    path = folder / entry.classnames_file
    require(entry, path, "class list", note=note)
    return read_classnames(path)


def _check_count(entry: CatalogEntry, folder: Path, where: Path, found: int) -> None:
    expected = entry.num_classes
    if found != expected and found != generated_count(folder):
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


def _splits(
    entry: CatalogEntry,
    names: dict[str, str],
    wnids: Sequence[str],
    image_root: Path,
    classnames: Sequence[str],
    **items: tuple[Datum, ...],
) -> DatasetSplits:
    index = {w: i for i, w in enumerate(names)}
    return DatasetSplits(
        name=entry.name,
        classnames=tuple(classnames),
        template=entry.template,
        train=items.get("train", ()),
        val=items.get("val", ()),
        test=items.get("test", ()),
        image_root=os.path.abspath(image_root),
        wnids=tuple(wnids),
        imagenet_labels=tuple(index[w] for w in wnids),
    )


# --- ImageNet ---------------------------------------------------------------------------------


def _check_not_flat(entry: CatalogEntry, val_dir: Path) -> None:
    flat = list_images(val_dir)
    if flat:
        raise ValueError(
            f"dataset {entry.name!r}: {val_dir} holds {len(flat)} images directly (flat ImageNet val, "
            f"as image-net.org distributes it); CoOp's layout needs one folder per class: "
            f"{val_dir}/<wnid>/<image>. Re-lay it out with the devkit labels, e.g. for each row "
            f"'<image id> <wnid> ...' of LOC_val_solution.csv move <image id>.JPEG into val/<wnid>/ "
            f"(the widely used valprep.sh script does exactly this)."
        )


def read_imagenet(entry: CatalogEntry, root: Path, make_missing_split: bool) -> DatasetSplits:
    folder = root / entry.folder
    names = _classnames_of(entry, folder, note="")
    image_root = folder / entry.image_dir
    train_dir, val_dir = image_root / "train", image_root / "val"
    require(entry, train_dir, "training image folder", is_dir=True)
    require(entry, val_dir, "validation image folder", is_dir=True)
    _check_not_flat(entry, val_dir)
    wnids = subfolders(train_dir)
    val_wnids = subfolders(val_dir)
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
    return _splits(entry, names, wnids, image_root, classnames, train=train, val=val, test=val)


def _imagenet_path(cls: str, index: int, per_class: int) -> str:
    sub = "train" if index < split_counts(per_class)[0] else "val"
    return f"{sub}/{cls}/{cls}_{index + 1}.JPEG"


# --- ImageNetV2 -------------------------------------------------------------------------------


def read_imagenet_v2(entry: CatalogEntry, root: Path, make_missing_split: bool) -> DatasetSplits:
    folder = root / entry.folder
    names = _classnames_of(entry, folder)
    image_root = folder / entry.image_dir
    require(entry, image_root, "image folder", is_dir=True)
    found = subfolders(image_root)
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
    return _splits(entry, names, wnids, image_root, classnames, test=tuple(items))


# --- ImageNet-Sketch / -A / -R ----------------------------------------------------------------


def read_imagenet_folders(entry: CatalogEntry, root: Path, make_missing_split: bool) -> DatasetSplits:
    folder = root / entry.folder
    names = _classnames_of(entry, folder)
    image_root = folder / entry.image_dir
    require(entry, image_root, "image folder", is_dir=True)
    wnids = subfolders(image_root)  # sorted; files such as ImageNet-A's README.txt are skipped
    _check_count(entry, folder, image_root, len(wnids))
    test = _wnid_items(entry, names, image_root, wnids)
    classnames = [names[w].replace("_", " ") for w in wnids]
    return _splits(entry, names, wnids, image_root, classnames, test=test)


# --- the stand-ins ----------------------------------------------------------------------------

ImagePath = Callable[[str, int, int], str]  # (class folder, image index, images per class) -> path


def _test_only_path(cls: str, index: int, per_class: int) -> str:
    return f"{cls}/{index + 1}.jpeg"


def _writer(path_of: ImagePath, readme: bool = False) -> Callable[[CatalogEntry, Path, StandIn], None]:
    """A stand-in writer: ``classnames.txt``, each class's images at ``path_of``, maybe a README."""

    def write(entry: CatalogEntry, folder: Path, stand_in: StandIn) -> None:
        (folder / entry.classnames_file).write_text(CLASSNAMES_TXT, encoding="utf-8")
        image_root = folder / entry.image_dir
        for label in range(stand_in.num_classes):
            cls = entry.class_folders[label]
            for index in range(stand_in.images_per_class):
                rel = path_of(cls, index, stand_in.images_per_class)
                stand_in.save(stand_in.draw(label, index), image_root / rel)
        if readme:  # ImageNet-A ships a README.txt beside the folders
            (image_root / "README.txt").write_text("stand-in written by vlprompt\n", encoding="utf-8")

    return write


IMAGENET = Layout(
    description="ImageNet: images/{train,val}/<wnid>/ and classnames.txt",
    read=read_imagenet,
    write=_writer(_imagenet_path),
)
IMAGENET_V2 = Layout(
    description="ImageNetV2: class-number folders 0..999 and classnames.txt",
    read=read_imagenet_v2,
    write=_writer(_test_only_path),
)
IMAGENET_FOLDERS = Layout(
    description="ImageNet-Sketch/-A/-R: wnid folders (test only) and classnames.txt",
    read=read_imagenet_folders,
    write=_writer(_test_only_path, readme=True),
)

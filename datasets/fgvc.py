"""The FGVC-Aircraft layout: the official text lists, no split JSON (CoOp ``datasets/fgvc_aircraft.py``).

``variants.txt`` (label = line order) and ``images_variant_{train,val,test}.txt`` ("<image id>
<variant name with spaces>"), images ``images/<id>.jpg`` — the ``data/`` folder of
fgvc-aircraft-2013b. The official lists *are* the split, so there is no rule to make one.
The stand-in numbers images by class and writes the lists 50/20/30 per class.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlprompt.datasets.cuts import split_of
from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.files import check_images_exist, check_relative, require
from vlprompt.datasets.layout import Layout, StandIn
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits, Datum


def _variants(entry: CatalogEntry, variants_file: Path) -> list[str]:
    require(entry, variants_file, "class list")
    text = variants_file.read_text(encoding="utf-8")
    variants = [line.strip() for line in text.splitlines() if line.strip()]
    if not variants:
        raise ValueError(f"dataset {entry.name!r}: {variants_file} lists no variants")
    if len(set(variants)) != len(variants):
        raise ValueError(f"dataset {entry.name!r}: {variants_file} lists a variant twice")
    return variants


def _read_list(
    entry: CatalogEntry, list_file: Path, split: str, label_of: dict[str, int], image_root: Path
) -> tuple[Datum, ...]:
    """One ``images_variant_<split>.txt``: its images, each of which must exist."""
    variants_file = list_file.parent / "variants.txt"
    rows: list[Datum] = []
    rels: list[str] = []
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
        rels.append(f"{image_id}.jpg")
        check_relative(f"dataset {entry.name!r}: {list_file} line {n}", rels[-1])
        rows.append(
            Datum(os.path.abspath(image_root / rels[-1]), label_of[variant], variant.replace("_", " "))
        )
    where = f"dataset {entry.name!r}: {list_file}"
    check_images_exist(
        where, image_root, {split: rels}, at_row=False, note=f". Expected layout: {entry.layout}."
    )
    return tuple(rows)


def read(entry: CatalogEntry, root: Path, make_missing_split: bool) -> DatasetSplits:
    """Every split from its official list; labels follow ``variants.txt``'s line order."""
    folder = root / entry.folder
    variants = _variants(entry, folder / "variants.txt")
    label_of = {v: i for i, v in enumerate(variants)}
    image_root = folder / entry.image_dir
    require(entry, image_root, "image folder", is_dir=True)
    items: dict[str, tuple[Datum, ...]] = {}
    for split in SPLIT_NAMES:
        list_file = folder / f"images_variant_{split}.txt"
        require(entry, list_file, f"{split} list")
        items[split] = _read_list(entry, list_file, split, label_of, image_root)
    classnames = tuple(v.replace("_", " ") for v in variants)
    return DatasetSplits(
        entry.name, classnames, entry.template, image_root=os.path.abspath(image_root), **items
    )


def write(entry: CatalogEntry, folder: Path, stand_in: StandIn) -> None:
    """Images ``<label * 10000 + n>.jpg``, ``variants.txt`` and the three lists, 50/20/30 per class."""
    variants = entry.class_folders[: stand_in.num_classes]
    per_class = stand_in.images_per_class
    lists: dict[str, list[str]] = {split: [] for split in SPLIT_NAMES}
    for label, variant in enumerate(variants):
        for index in range(per_class):
            image_id = f"{label * 10000 + index + 1:07d}"
            stand_in.save(stand_in.draw(label, index), folder / entry.image_dir / f"{image_id}.jpg")
            lists[split_of(index, per_class)].append(f"{image_id} {variant}\n")
    (folder / "variants.txt").write_text("".join(f"{v}\n" for v in variants), encoding="utf-8")
    for split, lines in lists.items():
        (folder / f"images_variant_{split}.txt").write_text("".join(lines), encoding="utf-8")


LAYOUT = Layout(
    description="FGVC-Aircraft's variants.txt and images_variant_<split>.txt lists",
    read=read,
    write=write,
)

"""The CoOp split-JSON layout: a split file beside an image folder.

A split file is JSON: ``{"train" | "val" | "test": [[relative_path, label, classname], ...]}``
with paths relative to ``<root>/<folder>/<image_dir>`` (CoOp ``datasets/oxford_pets.py``
``read_split``/``save_split``). Reading the published files instead of re-splitting the
images is what makes results comparable with the papers, so vlprompt never re-splits a
dataset silently: a missing split file is an error that says which file to fetch, unless
the caller asks for a regenerated one (``load_dataset(..., make_missing_split=True)``), which
is announced on stderr. Regenerating follows the entry's official-files rule
(``official.RULES``): the file is written next to the data under the entry's split-file
name, so every machine sharing the folder reads the same split. A regenerated file is not
the published one: CoOp regenerates with the unseeded global ``random`` over unsorted
listings, so not even its own regenerated files agree across machines, and neither will
ours agree with them.

Everything is validated up front, with messages that name the file, split and row, because
a bad row otherwise surfaces as a crash in a data-loader worker hours into a sweep. Only
JSON is read from the data folder: nothing is unpickled or executed (CoOp caches few-shot
subsets as pickles; vlprompt recomputes them, which is cheap and seeded).

The stand-in: images at the entry's ``path_pattern`` (or where its rule's ``image_path``
puts them), split 50/20/30 per class, the split file, and the rule's official files
written from the same rows.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlprompt.datasets.cuts import DEFAULT_SEED, split_of
from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.files import (
    check_images_exist,
    check_relative,
    image_path,
    read_split_object,
    require,
    write_atomically,
)
from vlprompt.datasets.layout import Layout, StandIn
from vlprompt.datasets.official import RULES
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits, Datum, Row, Rows

# --- the file ----------------------------------------------------------------------------------


def read_split_file(path: str | Path) -> dict[str, list[Row]]:
    """Parse and check the structure of a split file; class names come back prompt-ready."""
    path = Path(path)
    data = read_split_object(path)
    return {
        split: [_parse_row(path, split, i, row) for i, row in enumerate(data[split])] for split in SPLIT_NAMES
    }


def _parse_row(path: Path, split: str, index: int, row: Any) -> Row:
    where = f"split file {path}: split {split!r} row {index}"
    ok = (
        isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], str)
        and isinstance(row[1], int)
        and not isinstance(row[1], bool)
        and isinstance(row[2], str)
    )
    if not ok:
        raise ValueError(f"{where}: expected [relative_path, label, classname], got {row!r:.200}")
    rel, label, classname = row
    check_relative(where, rel)
    if label < 0:
        raise ValueError(f"{where}: negative label {label}")
    if not classname.strip():
        raise ValueError(f"{where}: empty class name")
    return rel, label, classname.replace("_", " ")


def check_labels(where: str, rows: Mapping[str, Sequence[Row]]) -> tuple[str, ...]:
    """Labels must be 0..n-1, each with one class name, each name with one label.

    Returns the class names by label; errors start with ``where`` (e.g. "split file PATH").
    """
    if not any(rows[split] for split in SPLIT_NAMES):
        raise ValueError(f"{where}: no rows in train, val or test")
    names: dict[int, str] = {}
    for split in SPLIT_NAMES:
        for i, (_, label, classname) in enumerate(rows[split]):
            known = names.setdefault(label, classname)
            if known != classname:
                raise ValueError(
                    f"{where}: split {split!r} row {i}: label {label} is named "
                    f"{classname!r} here but {known!r} earlier"
                )
    absent = sorted(set(range(max(names) + 1)) - set(names))
    if absent:
        raise ValueError(
            f"{where}: labels must be 0..n-1 without gaps; found {len(names)} labels "
            f"up to {max(names)}, missing {absent[:10]}"
        )
    classnames = tuple(names[y] for y in range(len(names)))
    if len(set(classnames)) != len(classnames):
        dup = sorted({c for c in classnames if classnames.count(c) > 1})
        raise ValueError(f"{where}: class names used by more than one label: {dup[:10]}")
    return classnames


def split_file_text(rows: Mapping[str, Sequence[Row]]) -> str:
    """A split file's text in CoOp's format (``json.dump(indent=4)``), byte-stable for the same rows."""
    data = {split: [[rel, int(label), cname] for rel, label, cname in rows[split]] for split in SPLIT_NAMES}
    return json.dumps(data, indent=4, separators=(",", ": "), ensure_ascii=False) + "\n"


def write_split_file(path: str | Path, rows: Mapping[str, Sequence[Row]]) -> None:
    """Write :func:`split_file_text` to ``path``."""
    Path(path).write_text(split_file_text(rows), encoding="utf-8")


def _listed(rows: Mapping[str, Sequence[Row]]) -> dict[str, list[str]]:
    return {split: [rel for rel, _, _ in rows[split]] for split in SPLIT_NAMES}


# --- reading -----------------------------------------------------------------------------------


def read(entry: CatalogEntry, root: Path, make_missing_split: bool) -> DatasetSplits:
    """Read ``entry`` from ``root`` through its CoOp split file.

    Class names and labels come from the split file (all three splits), as in CoOp; the
    catalog contributes the layout and the template. Class names get CoOp's prompt-time
    ``replace("_", " ")`` so that ``Datum.classname`` is ready for a prompt. A missing split
    file is made first when ``make_missing_split`` is true and the entry has a rule.
    """
    folder = root / entry.folder
    split_path = folder / entry.split_file
    image_root = folder / entry.image_dir
    if not split_path.is_file() and make_missing_split and entry.split_rule:
        _make_missing(entry, root, split_path)
    if not split_path.is_file():
        raise FileNotFoundError(_missing_split_message(entry, root, split_path))
    note = f"; the paths in {split_path} are relative to it"
    require(entry, image_root, "image folder", is_dir=True, note=note)
    rows = read_split_file(split_path)
    classnames = check_labels(f"split file {split_path}", rows)
    relative = f". Paths in the split file are relative to {image_root}."
    check_images_exist(f"split file {split_path}", image_root, _listed(rows), at_row=True, note=relative)
    base = os.path.abspath(image_root)
    items = {
        split: tuple(Datum(image_path(base, rel), label, cname) for rel, label, cname in rows[split])
        for split in SPLIT_NAMES
    }
    return DatasetSplits(entry.name, classnames, entry.template, image_root=base, **items)


def _make_missing(entry: CatalogEntry, root: Path, split_path: Path) -> None:
    try:
        make_split(entry, root, DEFAULT_SEED, False)
    except FileExistsError:  # another process wrote it meanwhile; read theirs
        return
    print(
        f"vlprompt: {split_path} was missing; generated {describe_rule(entry)} (seed {DEFAULT_SEED}). "
        f"This is NOT the published CoOp split file: results are not comparable with the papers'.",
        file=sys.stderr,
    )


def _missing_split_message(entry: CatalogEntry, root: Path, split_path: Path) -> str:
    message = (
        f"dataset {entry.name!r}: split file {split_path} not found. vlprompt reads the CoOp "
        f"split files (CoOp DATASETS.md) and does not re-split the images: put "
        f"{entry.split_file} in {split_path.parent}. Expected layout: {entry.layout}."
    )
    if not entry.split_rule:
        return message
    return message + (
        f" Without the published file, `python -m vlprompt.datasets make-split {entry.name} "
        f"--root {root}` (or load_dataset(..., make_missing_split=True)) writes a "
        f"deterministic split there: {describe_rule(entry)} (not the papers' split)."
    )


# --- making a missing split file -----------------------------------------------------------------


def describe_rule(entry: CatalogEntry) -> str:
    """What the entry's official-files rule reads and how it cuts ("" without one)."""
    return RULES[entry.split_rule].describe() if entry.split_rule else ""


def make_split(entry: CatalogEntry, root: Path, seed: int, overwrite: bool) -> Path:
    """Write ``<root>/<folder>/<split_file>`` from the entry's official files; return its path.

    Labels are checked and every listed image must exist before anything is written; the file
    is written beside the target and moved into place, so a reader never sees half of it.
    """
    rule = RULES[entry.split_rule]
    folder = root / entry.folder
    target = folder / entry.split_file
    rows = rule.read(entry, folder, random.Random(seed))
    where = f"dataset {entry.name!r}: split regenerated from {rule.files}"
    check_labels(where, rows)
    not_written = "; the split file was not written"
    check_images_exist(where, folder / entry.image_dir, _listed(rows), at_row=False, note=not_written)
    write_atomically(target, split_file_text(rows), overwrite=overwrite)
    return target


# --- the stand-in --------------------------------------------------------------------------------


def write(entry: CatalogEntry, folder: Path, stand_in: StandIn) -> None:
    """Images split 50/20/30 per class, the split file, and the rule's official files from the same rows."""
    rule = RULES.get(entry.split_rule)
    name_image = rule.image_path if rule else None
    per_class = stand_in.images_per_class
    rows: Rows = {split: [] for split in SPLIT_NAMES}
    for label in range(stand_in.num_classes):
        for index in range(per_class):
            split = split_of(index, per_class)
            if name_image is not None:
                rel = name_image(entry, label, index, split, per_class)
            else:
                rel = entry.path_pattern.format(cls=entry.class_folders[label], n=index + 1)
            stand_in.save(stand_in.draw(label, index), folder / entry.image_dir / rel)
            rows[split].append((rel, label, entry.classnames[label]))
    write_split_file(folder / entry.split_file, rows)
    if rule is not None and rule.write is not None:  # the files the real dataset ships with
        rule.write(entry, folder, rows, stand_in)


def check(entry: CatalogEntry) -> None:
    """An entry in this layout needs a split file, an image path pattern and a known rule (or none)."""
    where = f"catalog entry {entry.name!r}"
    if not entry.split_file:
        raise ValueError(f"{where}: the split_json layout needs a split_file")
    if not entry.path_pattern:  # its '{cls}' and '{n}' are checked by CatalogEntry itself
        raise ValueError(f"{where}: the split_json layout needs a path_pattern with '{{cls}}' and '{{n}}'")
    if entry.split_rule and entry.split_rule not in RULES:
        raise ValueError(f"{where}: unknown split rule {entry.split_rule!r}; known: {sorted(RULES)}")


LAYOUT = Layout(
    description="CoOp split JSON beside the image folder (relative paths, labels, class names)",
    read=read,
    write=write,
    make_split=make_split,
    split_rule=describe_rule,
    check=check,
)

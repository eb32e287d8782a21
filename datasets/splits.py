"""Read and write CoOp split files, and fingerprint a split.

A split file is JSON: ``{"train" | "val" | "test": [[relative_path, label, classname], ...]}``
with paths relative to ``<root>/<folder>/<image_dir>`` (CoOp ``datasets/oxford_pets.py``
``read_split``/``save_split``). Reading the published files instead of re-splitting the
images is what makes results comparable with the papers, so vlprompt never re-splits a
dataset silently: a missing split file is an error that says which file to fetch, unless
the caller asks for a regenerated one (``load_dataset(..., make_missing_split=True)``,
``makesplit.py``), which is announced on stderr.

Everything is validated up front, with messages that name the file, split and row, because
a bad row otherwise surfaces as a crash in a data-loader worker hours into a sweep. Only
JSON is read from the data folder: nothing is unpickled or executed (CoOp caches few-shot
subsets as pickles; vlprompt recomputes them, which is cheap and seeded).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from vlprompt.datasets.catalog import get_entry
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits, Datum

Row = tuple[str, int, str]


def dataset_folder(name: str, root: str | Path) -> Path:
    """``<root>/<folder>`` for a catalog entry, the folder ``generate_dataset`` writes."""
    return Path(root) / get_entry(name).folder


def load_dataset(name: str, root: str | Path, *, make_missing_split: bool = False) -> DatasetSplits:
    """Read dataset ``name`` from ``root`` through its CoOp split file.

    Class names and labels come from the split file (all three splits), as in CoOp; the
    catalog contributes the layout and the template. Class names get CoOp's prompt-time
    ``replace("_", " ")`` so that ``Datum.classname`` is ready for a prompt.

    A missing split file is an error, unless ``make_missing_split`` is true and the entry has
    a split rule (``makesplit.RULES``): then the file is regenerated deterministically from
    the files the dataset ships with, written next to the data (``make_split``, seed 1); one
    line on stderr says so, and it is read like a published one. It is *not* the published
    split, so results on it are not comparable with the papers'. Entries without a split
    file (FGVC-Aircraft, the ImageNet family) ignore the option.
    """
    entry = get_entry(name)
    if entry.reader != "split_json":  # FGVC-Aircraft's lists, the ImageNet family: readers.py
        from vlprompt.datasets.readers import read_dataset

        return read_dataset(entry, Path(root))
    folder = Path(root) / entry.folder
    split_path = folder / entry.split_file
    image_root = folder / entry.image_dir
    hint = (
        f"For a procedural stand-in with the same layout run "
        f"`python -m vlprompt.datasets generate {entry.name} --root {root}`."
    )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset {entry.name!r} ({entry.description}): folder {folder} does not exist. "
            f"Expected layout under {root}: {entry.layout}. {hint}"
        )
    from vlprompt.datasets.makesplit import DEFAULT_SEED, describe_rule, make_split  # local: it imports us

    rule = describe_rule(entry)
    if not split_path.is_file() and make_missing_split and rule:
        try:
            make_split(entry.name, root)
        except FileExistsError:  # another process wrote it meanwhile; read theirs
            pass
        else:
            print(
                f"vlprompt: {split_path} was missing; generated {rule} (seed {DEFAULT_SEED}). This is "
                f"NOT the published CoOp split file: results are not comparable with the papers'.",
                file=sys.stderr,
            )
    if not split_path.is_file():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: split file {split_path} not found. vlprompt reads the CoOp "
            f"split files (CoOp DATASETS.md) and does not re-split the images: put "
            f"{entry.split_file} in {folder}. Expected layout: {entry.layout}."
            + (
                f" Without the published file, `python -m vlprompt.datasets make-split {entry.name} "
                f"--root {root}` (or load_dataset(..., make_missing_split=True)) writes a "
                f"deterministic split there: {rule} (not the papers' split)."
                if rule
                else ""
            )
        )
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: image folder {image_root} not found; the paths in "
            f"{split_path} are relative to it. Expected layout: {entry.layout}."
        )
    rows = read_split_file(split_path)
    classnames = check_labels(f"split file {split_path}", rows)
    _check_images_exist(split_path, image_root, rows)
    base = os.path.abspath(image_root)
    items = {
        split: tuple(
            Datum(path=os.path.join(base, *PurePosixPath(rel).parts), label=label, classname=cname)
            for rel, label, cname in rows[split]
        )
        for split in SPLIT_NAMES
    }
    return DatasetSplits(
        name=entry.name,
        classnames=classnames,
        template=entry.template,
        train=items["train"],
        val=items["val"],
        test=items["test"],
        image_root=base,
    )


def read_split_file(path: str | Path) -> dict[str, list[Row]]:
    """Parse and check the structure of a split file; class names come back prompt-ready."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"split file {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"split file {path}: expected a JSON object with keys train/val/test")
    missing = [s for s in SPLIT_NAMES if s not in data]
    extra = sorted(set(data) - set(SPLIT_NAMES))
    if missing or extra:
        raise ValueError(f"split file {path}: missing keys {missing}, unexpected keys {extra}")
    rows: dict[str, list[Row]] = {}
    for split in SPLIT_NAMES:
        if not isinstance(data[split], list):
            raise ValueError(f"split file {path}: split {split!r} is not a list of rows")
        rows[split] = [_parse_row(path, split, i, row) for i, row in enumerate(data[split])]
    return rows


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
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive or ".." in parts:
        raise ValueError(f"{where}: image path {rel!r} must be relative and stay inside the image folder")
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


def _check_images_exist(path: Path, image_root: Path, rows: Mapping[str, Sequence[Row]]) -> None:
    missing: list[tuple[str, int, Path]] = []
    total = 0
    for split in SPLIT_NAMES:
        for i, (rel, _, _) in enumerate(rows[split]):
            total += 1
            image = image_root / rel
            if not image.is_file():
                missing.append((split, i, image))
    if missing:
        split, i, image = missing[0]
        raise FileNotFoundError(
            f"split file {path}: {len(missing)} of {total} listed images are missing, the first "
            f"at split {split!r} row {i}: {image}. Paths in the split file are relative to {image_root}."
        )


def split_file_text(rows: Mapping[str, Sequence[Row]]) -> str:
    """A split file's text in CoOp's format (``json.dump(indent=4)``), byte-stable for the same rows."""
    data = {split: [[rel, int(label), cname] for rel, label, cname in rows[split]] for split in SPLIT_NAMES}
    return json.dumps(data, indent=4, separators=(",", ": "), ensure_ascii=False) + "\n"


def write_split_file(path: str | Path, rows: Mapping[str, Sequence[Row]]) -> None:
    """Write :func:`split_file_text` to ``path``."""
    Path(path).write_text(split_file_text(rows), encoding="utf-8")


def split_fingerprint(splits: DatasetSplits) -> str:
    """SHA-256 over (split name, path, label) of every train/val/test item, in order.

    Paths are taken relative to ``splits.image_root`` (POSIX separators) when the item lies
    under it, so the same split read from another mount point hashes the same; otherwise
    the absolute path is used. Class names and the template are not hashed: the fingerprint
    identifies *which images with which labels*, which is what few-shot seeds and base/novel
    selection change. Order matters, because it is the order samplers see.
    """
    digest = hashlib.sha256()
    prefix = splits.image_root.rstrip(os.sep) + os.sep if splits.image_root else None
    for split in SPLIT_NAMES:
        for item in splits.split(split):
            path = item.path
            if prefix and path.startswith(prefix):
                path = path[len(prefix) :].replace(os.sep, "/")
            digest.update(json.dumps([split, path, item.label]).encode("utf-8") + b"\n")
    return digest.hexdigest()

"""Reading a dataset by name, whatever its layout, and fingerprinting a split.

``load_dataset`` is the one way in for a single-task dataset: it looks the entry up in the
catalog, checks that its folder exists (one message for every layout: the path, the expected
layout and the generator command), and hands the folder to the entry's layout
(``layouts.LAYOUTS``): CoOp's split JSON (``splitjson.py``), FGVC-Aircraft's lists
(``fgvc.py``), the ImageNet family (``imagenet.py``). A multi-task layout (Fashion-20) has no
single ``DatasetSplits``: ``load_dataset`` says to use ``tasks.load_tasks``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vlprompt.datasets.catalog import get_entry
from vlprompt.datasets.files import require_folder
from vlprompt.datasets.layouts import layout_of
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits


def dataset_folder(name: str, root: str | Path) -> Path:
    """``<root>/<folder>`` for a catalog entry, the folder ``generate_dataset`` writes."""
    return Path(root) / get_entry(name).folder


def load_dataset(name: str, root: str | Path, *, make_missing_split: bool = False) -> DatasetSplits:
    """Read dataset ``name`` from ``root`` as its layout lays it out.

    A missing split file is an error, unless ``make_missing_split`` is true and the layout has
    a rule for the entry (``python -m vlprompt.datasets make-split`` lists them): then the file
    is regenerated deterministically from the files the dataset ships with, written next to
    the data (seed 1); one line on stderr says so, and it is read like a published one. It is
    *not* the published split, so results on it are not comparable with the papers'. Layouts
    without a split file (FGVC-Aircraft, the ImageNet family) ignore the option.
    """
    entry = get_entry(name)
    layout = layout_of(entry)
    if layout.read is None:  # an error whether or not the data is there
        raise ValueError(
            f"{entry.name} is a multi-task dataset: use load_tasks / data.protocol=multi_task "
            f"(vlprompt.datasets.load_tasks({entry.name!r}, root) gives one DatasetSplits per task; "
            f"its tasks reuse class names, so they cannot be one {entry.name!r} classification)"
        )
    root = Path(root)
    require_folder(entry, root)
    return layout.read(entry, root, make_missing_split)


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

"""Write a missing split file for a folder-per-class dataset — only when the user asks for it.

``load_dataset`` never re-splits: a missing CoOp split file is an error, because results
are only comparable with the papers on the published splits. When those files cannot be
had (dead links, CoOp #90, #29), ``make_split`` (CLI: ``python -m vlprompt.datasets
make-split NAME --root R``) writes one, in CoOp's format, *next to the data* under the
entry's split-file name, so every machine sharing the folder reads the same split.

Rule ``"folders"`` (Dassl ``read_and_split_data``, used by CoOp for Caltech101, DTD, Food101,
EuroSAT and Flowers when their JSON is missing): class folders in Python's sorted order
(case-sensitive, so Caltech's "Faces" precedes "accordion"), the entry's
``ignored_folders`` skipped; label = index in that order; per class the images, sorted by
file name, are shuffled by one ``random.Random(seed)`` (seed 1 by default, CoOp's default
seed) consumed class after class in label order, then cut ``round(0.5 n)`` train,
``round(0.2 n)`` val, the rest test. Sorting first makes the result independent of the
file system's listing order, so the same images give the same file on every machine (the
reference shuffles the unsorted listing with the global ``random``, which is why its
regenerated splits do not match across machines). Class names are the folder names, renamed
where the catalog's prompt name differs (Caltech "airplanes" → "airplane", EuroSAT
"AnnualCrop" → "Annual Crop Land").
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from vlprompt.datasets.catalog import CatalogEntry, get_entry
from vlprompt.datasets.generate import TRAIN_FRACTION, VAL_FRACTION
from vlprompt.datasets.readers import list_images
from vlprompt.datasets.splits import Row, write_split_file

DEFAULT_SEED = 1


def renames(entry: CatalogEntry) -> dict[str, str]:
    """Folder → class name where the catalog's prompt name is not just the folder name."""
    return {
        folder: name
        for folder, name in zip(entry.class_folders, entry.classnames, strict=True)
        if name != folder.replace("_", " ")
    }


def make_split(name: str, root: str | Path, *, seed: int = DEFAULT_SEED, overwrite: bool = False) -> Path:
    """Write ``<root>/<folder>/<split_file>`` from the class folders; return its path."""
    entry = get_entry(name)
    if entry.split_rule != "folders":
        raise ValueError(
            f"dataset {entry.name!r} has no folder-per-class split rule; vlprompt reads its official "
            f"files only. Expected layout: {entry.layout}."
        )
    folder = Path(root) / entry.folder
    image_root = folder / entry.image_dir
    target = folder / entry.split_file
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"dataset {entry.name!r}: image folder {image_root} not found; make-split needs one "
            f"folder per class there. Expected layout: {entry.layout}."
        )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    classes = sorted(p.name for p in image_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [c for c in classes if c not in entry.ignored_folders]
    if not classes:
        raise FileNotFoundError(f"dataset {entry.name!r}: no class folders in {image_root}")
    new_names = renames(entry)
    rng = random.Random(seed)
    rows: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        images = [p.name for p in list_images(image_root / cls)]
        rng.shuffle(images)
        n = len(images)
        n_train, n_val = round(n * TRAIN_FRACTION), round(n * VAL_FRACTION)
        if n_train == 0 or n_val == 0 or n - n_train - n_val == 0:
            raise ValueError(
                f"dataset {entry.name!r}: class folder {image_root / cls} has {n} images, too few "
                f"for a 50/20/30 split with every split non-empty"
            )
        classname = new_names.get(cls, cls)
        for i, image in enumerate(images):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            rows[split].append((f"{cls}/{image}", label, classname))
    # Write beside the target and rename, so a reader on another machine never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.split_file}.", dir=folder)
    os.close(fd)
    try:
        write_split_file(tmp, rows)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target

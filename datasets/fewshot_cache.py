"""A readable cache of few-shot subsets: ``split_fewshot/shot_{K}-seed_{S}.json``.

CoOp caches each (K, seed) subset as a pickle beside the data so that every run with that
pair sees the same images. vlprompt keeps the idea with a safe, readable format: a JSON file
that lists the chosen images (paths relative to the image folder, labels, class names), the
fingerprint of the full split it was drawn from and its own fingerprint. A cached subset is
used only while the full split's fingerprint still matches; otherwise it is redrawn and
rewritten. Nothing is unpickled or executed.

The sampler is cheap, so the cache is about *identity*, not speed: the file is a record any
later run (or another machine sharing the folder) reuses verbatim, and its ``fingerprint`` is
the one the orchestrator logs to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from vlprompt.datasets.fewshot import sample_fewshot
from vlprompt.datasets.files import UnsafePathError, check_relative
from vlprompt.datasets.splits import split_fingerprint
from vlprompt.datasets.types import DatasetSplits, Datum

CACHE_DIR = "split_fewshot"
FORMAT = 1


def cache_path(folder: str | Path, shots: int, seed: int) -> Path:
    return Path(folder) / CACHE_DIR / f"shot_{shots}-seed_{seed}.json"


def cached_fewshot(splits: DatasetSplits, shots: int, seed: int, folder: str | Path) -> DatasetSplits:
    """``sample_fewshot(splits, shots, seed)``, read from / written to ``folder``'s cache.

    ``folder`` is the dataset folder (``<root>/<entry.folder>``). A read-only folder is not an
    error: the subset is then drawn and returned without writing (the same seed gives the same
    images anyway). ``shots <= 0`` (every image) is never cached.
    """
    if shots <= 0:
        return sample_fewshot(splits, shots, seed)
    path = cache_path(folder, shots, seed)
    source = split_fingerprint(splits)
    cached = _read(path, splits, source)
    if cached is not None:
        return cached
    subset = sample_fewshot(splits, shots, seed)
    _write(path, subset, shots, seed, source)
    return subset


def _relative(splits: DatasetSplits, item: Datum) -> str:
    return Path(os.path.relpath(item.path, splits.image_root)).as_posix()


def _read(path: Path, splits: DatasetSplits, source: str) -> DatasetSplits | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or unreadable: redraw
    if data.get("format") != FORMAT or data.get("source_fingerprint") != source:
        return None
    try:
        picked = {split: _listed(path, split, data[split], splits.image_root) for split in ("train", "val")}
    except UnsafePathError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"few-shot cache {path} is malformed ({err}); delete it to redraw") from None
    subset = replace(splits, train=picked["train"], val=picked["val"])
    if split_fingerprint(subset) != data.get("fingerprint"):
        raise ValueError(
            f"few-shot cache {path} does not match its recorded fingerprint; delete it to redraw"
        )
    return subset


def _listed(path: Path, split: str, rows: list, image_root: str) -> tuple[Datum, ...]:
    """One split of a cache file; its paths pass the readers' one path check (``check_relative``),
    since the cache lies in the data folder, where anyone who can write a split file can write it."""
    items = []
    for i, (rel, label, name) in enumerate(rows):
        check_relative(f"few-shot cache {path}: split {split!r} row {i} (delete the file to redraw)", rel)
        items.append(Datum(str(Path(image_root) / rel), int(label), str(name)))
    return tuple(items)


def _write(path: Path, subset: DatasetSplits, shots: int, seed: int, source: str) -> None:
    record = {
        "format": FORMAT,
        "dataset": subset.name,
        "shots": shots,
        "seed": seed,
        "source_fingerprint": source,
        "fingerprint": split_fingerprint(subset),
        **{
            split: [[_relative(subset, d), d.label, d.classname] for d in subset.split(split)]
            for split in ("train", "val")
        },
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
        ) as tmp:
            json.dump(record, tmp, indent=1)
        os.replace(tmp.name, path)  # atomic: concurrent trials never read half a file
    except OSError:
        return  # read-only data folder: the seeded draw is reproducible without the file

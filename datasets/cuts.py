"""The two ways CoOp cuts images into train/val/test, each written once.

* 50/20/30 (Dassl/CoOp ``read_and_split_data``, ``datasets/dtd.py``, CoOp
  ``oxford_flowers.py``, SoftCPT per task): ``round(0.5 n)`` train, ``round(0.2 n)`` val, the
  rest test; every split must get at least one image (CoOp asserts it). The generator cuts
  its stand-ins the same way, per class, so a regenerated split has the published shape.
* trainval 80/20 (CoOp ``OxfordPets.split_trainval(p_val=0.2)``): the official train(val)
  list is cut per class into ``n_val = round(0.2 n)`` val (the first ``n_val`` after the
  shuffle, as CoOp) and the rest train; the official test list is the test split.
  *Deviation:* CoOp asserts ``n_val > 0``; here ``n_val`` is at least 1 (a class needs 2
  trainval images), which only matters for classes smaller than real ones.

Both are deterministic: items are sorted before they are shuffled, and one
``random.Random(seed)`` (seed 1 by default, CoOp's default seed) is consumed class after
class in label order, so the same files give the same split on every machine.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

from vlprompt.datasets.types import Row, Rows

TRAIN_FRACTION = 0.5
VAL_FRACTION = 0.2
TRAINVAL_VAL_FRACTION = 0.2  # CoOp OxfordPets.split_trainval(p_val=0.2)
DEFAULT_SEED = 1
"""The seed a missing split file is regenerated with (CoOp's default seed)."""

T = TypeVar("T")


def split_counts(n: int) -> tuple[int, int, int]:
    """(train, val, test) counts of the 50/20/30 cut of ``n`` images."""
    n_train = round(n * TRAIN_FRACTION)
    n_val = round(n * VAL_FRACTION)
    return n_train, n_val, n - n_train - n_val


def split_of(index: int, n: int) -> str:
    """The split the ``index``-th of ``n`` items falls in under the 50/20/30 cut (in that order)."""
    n_train, n_val, _ = split_counts(n)
    return "train" if index < n_train else "val" if index < n_train + n_val else "test"


def cut_50_20_30(items: Sequence[T], rng: random.Random, what: str) -> tuple[list[T], list[T], list[T]]:
    """Shuffle ``items`` with ``rng`` and cut them 50/20/30; ``ValueError`` if a split would be empty.

    ``what`` starts the error ("class 'x' (label 3) has 2 images"), the cut's name ends it.
    """
    shuffled = list(items)
    rng.shuffle(shuffled)
    n_train, n_val, n_test = split_counts(len(shuffled))
    if 0 in (n_train, n_val, n_test):
        raise ValueError(f"{what}, too few for a 50/20/30 split with every split non-empty")
    return shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]


def cut_per_class(where: str, by_label: dict[int, list[Row]], rng: random.Random) -> Rows:
    """Dassl ``read_and_split_data``'s cut per class, classes in label order, rows sorted first."""
    rows: Rows = {"train": [], "val": [], "test": []}
    for label in sorted(by_label):
        items = sorted(by_label[label])
        what = f"{where}: class {items[0][2]!r} (label {label}) has {len(items)} images"
        train, val, test = cut_50_20_30(items, rng, what)
        rows["train"] += train
        rows["val"] += val
        rows["test"] += test
    return rows


def cut_trainval(where: str, trainval: list[Row], test: list[Row], rng: random.Random) -> Rows:
    """CoOp ``OxfordPets.split_trainval``: per class, the first ``round(0.2 n)`` shuffled are val."""
    by_label: dict[int, list[Row]] = defaultdict(list)
    for row in trainval:
        by_label[row[1]].append(row)
    rows: Rows = {"train": [], "val": [], "test": list(test)}
    for label in sorted(by_label):
        items = sorted(by_label[label])
        n_val = max(1, round(len(items) * TRAINVAL_VAL_FRACTION))
        if len(items) - n_val < 1:
            raise ValueError(
                f"{where}: class {items[0][2]!r} (label {label}) has {len(items)} trainval images, "
                f"too few for an 80/20 train/val cut with both non-empty"
            )
        rng.shuffle(items)
        rows["val"] += items[:n_val]
        rows["train"] += items[n_val:]
    return rows

"""The few-shot protocol: seeded K-shot subsets and the base/novel class split.

Both follow the reference code exactly so that a (split file, K, seed) triple names the
same images here as in the CoOp papers (Dassl ``data/datasets/base_dataset.py``
``generate_fewshot_dataset``; CoOp ``datasets/oxford_pets.py`` ``subsample_classes``). Apply
them in the reference order: ``sample_fewshot`` on the full dataset first, then
``subsample_classes``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import replace

from vlprompt.datasets.types import DatasetSplits, Datum

VAL_SHOTS_CAP = 4
"""CoOp samples ``min(K, 4)`` validation images per class."""

SUBSAMPLE_CHOICES: tuple[str, ...] = ("all", "base", "new")


def _group_by_label(items: Iterable[Datum]) -> dict[int, list[Datum]]:
    """Items per label, labels in order of first appearance (Dassl ``split_dataset_by_label``)."""
    groups: dict[int, list[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def sample_fewshot(splits: DatasetSplits, shots: int, seed: int) -> DatasetSplits:
    """K images per class for train and ``min(K, 4)`` per class for val; test untouched.

    Dassl ``generate_fewshot_dataset`` semantics: items are grouped by label in order of
    first appearance and each group is reduced with ``rng.sample(items, K)``; one
    ``random.Random(seed)`` is used for train and then, continuing the same stream, for val
    (the reference seeds the global ``random`` once and samples train before val). The
    sampled items keep ``rng.sample``'s order, classes follow one another.

    ``shots <= 0`` means "all images": the splits are returned unchanged.

    Deliberate deviation from the reference: a class with fewer than K *training* images
    raises ``ValueError`` (the reference silently keeps them all, so a "16-shot" run could
    train on fewer shots without anyone noticing). For val, a class with fewer than
    ``min(K, 4)`` images keeps them all, as in the reference, without drawing from the rng.
    """
    if shots <= 0:
        return splits
    rng = random.Random(seed)
    train: list[Datum] = []
    for label, items in _group_by_label(splits.train).items():
        if len(items) < shots:
            raise ValueError(
                f"dataset {splits.name!r}: class {items[0].classname!r} (label {label}) has "
                f"{len(items)} training images, fewer than shots={shots}; pick fewer shots or "
                f"a dataset with more training images per class"
            )
        train.extend(rng.sample(items, shots))
    val_shots = min(shots, VAL_SHOTS_CAP)
    val: list[Datum] = []
    for items in _group_by_label(splits.val).values():
        val.extend(rng.sample(items, val_shots) if len(items) >= val_shots else items)
    return replace(splits, train=tuple(train), val=tuple(val))


def base_novel_labels(train: Iterable[Datum]) -> tuple[list[int], list[int]]:
    """(base, new) labels: the sorted training labels cut at ``ceil(n / 2)``."""
    labels = sorted({item.label for item in train})
    m = math.ceil(len(labels) / 2)
    return labels[:m], labels[m:]


def subsample_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Keep the base or the new (novel) half of the classes, relabelled 0..len-1.

    CoOp ``subsample_classes``: the labels present in *train* are sorted and cut at
    ``m = ceil(n / 2)``; ``"base"`` keeps the first m, ``"new"`` the rest, in train, val
    and test alike, relabelled in that order; ``classnames`` follow, so a prompt learner
    built on the result sees only the selected classes. ``"all"`` returns the splits
    unchanged. With an odd number of classes base gets the extra one (37 → 19 + 18).
    """
    if which not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}, got {which!r}")
    if which == "all":
        return splits
    if not splits.train:
        raise ValueError(f"dataset {splits.name!r}: no training items to choose base/new classes from")
    base, new = base_novel_labels(splits.train)
    selected = base if which == "base" else new
    relabel = {old: i for i, old in enumerate(selected)}

    def keep(items: tuple[Datum, ...]) -> tuple[Datum, ...]:
        return tuple(replace(d, label=relabel[d.label]) for d in items if d.label in relabel)

    return replace(
        splits,
        classnames=tuple(splits.classnames[y] for y in selected),
        wnids=tuple(splits.wnids[y] for y in selected) if splits.wnids else (),
        imagenet_labels=tuple(splits.imagenet_labels[y] for y in selected) if splits.imagenet_labels else (),
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
    )

"""The values every other layer receives from ``vlprompt.datasets``, and the split-file row.

``Datum`` and ``DatasetSplits`` are frozen dataclasses of tuples so that a split, once read,
cannot be changed behind the back of the code that fingerprinted it (``split_fingerprint``):
few-shot sampling and the base/novel class split return *new* values instead of editing
lists in place, which is how Dassl's ``DatasetBase`` lets a cached split and the trained-on
split drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""The splits a CoOp split file holds, in the order they are written, read and hashed."""

Row = tuple[str, int, str]
"""One row of a CoOp split file: (path relative to the image folder, label, class name)."""
Rows = dict[str, list[Row]]
"""A split file's rows by split name (the keys of ``SPLIT_NAMES``)."""


@dataclass(frozen=True)
class Datum:
    """One labelled image.

    ``classname`` is the name as it goes into a prompt (CoOp's ``name.replace("_", " ")``
    already applied, EuroSAT's renamed classes such as "Annual Crop Land"), so methods
    never have to know a dataset's naming quirks.
    """

    path: str  # absolute path on disk
    label: int  # 0-based
    classname: str


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train/val/test items plus what prompts need: class names and a template.

    ``image_root`` is the folder the split file's relative paths hang from. It lets
    ``split_fingerprint`` hash paths relative to it, so the fingerprint of a split does not
    change when the data root is moved or mounted elsewhere on another machine. It is
    optional (``""``) for splits built by hand; their absolute paths are hashed instead.
    """

    name: str  # catalog key, e.g. "eurosat"
    classnames: tuple[str, ...]  # index = label
    template: str  # hand-crafted zero-shot template with one "{}"
    train: tuple[Datum, ...]
    val: tuple[Datum, ...]
    test: tuple[Datum, ...]
    image_root: str = ""
    # ImageNet family only: each label's wnid and its index among ImageNet's 1000 classes
    # (the lines of classnames.txt), so a 1000-way classifier's predictions can be scored
    # on ImageNet-A/R's 200 classes (``logits[:, splits.imagenet_labels]``).
    wnids: tuple[str, ...] = ()
    imagenet_labels: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, which: str) -> tuple[Datum, ...]:
        """The items of one split by name (``"train"``, ``"val"`` or ``"test"``)."""
        if which not in SPLIT_NAMES:
            raise ValueError(f"unknown split {which!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, which)


@dataclass(frozen=True)
class TaskData:
    """One task of a task source (``tasks.load_tasks``): its splits and the folder for its few-shot cache."""

    splits: DatasetSplits
    cache_dir: Path

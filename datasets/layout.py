"""``Layout``: everything one on-disk layout needs, in one value — the unit a new layout adds.

A layout is how a dataset's files sit in its folder (CoOp's split JSON, FGVC-Aircraft's text
lists, the ImageNet family's wnid folders, Fashion-20's task folders). The package needs four
things from each, and a ``Layout`` bundles them so that no code elsewhere asks *which* layout
it holds:

* ``read`` the folder into one ``DatasetSplits`` — or, for a multi-task layout, ``read_tasks``
  into one ``TaskData`` per task (exactly one of the two; ``multitask`` says which);
* ``write`` a procedural stand-in in the layout, for ``generate_dataset``;
* ``make_split``: write a missing split file by the layout's rule, when it has one, with
  ``split_rule`` saying in words what that rule reads and how it cuts ("" for an entry the
  layout cannot make a split file for);
* ``check`` a catalog entry that names the layout (the catalog runs it when it is built).

Layouts are registered by name in ``layouts.LAYOUTS``; catalog entries name theirs in
``CatalogEntry.layout_name``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.types import DatasetSplits, TaskData


@dataclass(frozen=True)
class StandIn:
    """What a layout's writer is asked to write: how much, and how each image is drawn.

    ``num_classes`` counts the entry's stand-in classes (for a multi-task layout: tasks), the
    first ones in label order. ``draw(style, index)`` draws image ``index`` of the class with
    style ``entry.styles[style]``, seeded by both, so the same arguments give the same bytes;
    ``save`` writes it at a path, choosing the format from the suffix.
    """

    num_classes: int
    images_per_class: int
    image_size: int
    draw: Callable[[int, int], Image.Image]
    save: Callable[[Image.Image, Path], None]


Read = Callable[[CatalogEntry, Path, bool], DatasetSplits]
"""(entry, data root, make_missing_split) -> the splits; ``<root>/<entry.folder>`` exists."""
ReadTasks = Callable[[CatalogEntry, Path, bool], tuple[TaskData, ...]]
"""(entry, data root, make_missing_split) -> one ``TaskData`` per task, in task order."""
Write = Callable[[CatalogEntry, Path, StandIn], None]
"""(entry, the folder to fill, what to write)."""
MakeSplit = Callable[[CatalogEntry, Path, int, bool], Path]
"""(entry, data root, seed, overwrite) -> the split file written; the folder exists."""


@dataclass(frozen=True)
class Layout:
    """One on-disk layout: how it is read, written as a stand-in, and (maybe) re-split."""

    description: str  # one line naming the layout, for messages and readers of LAYOUTS
    write: Write
    read: Read | None = None
    read_tasks: ReadTasks | None = None
    make_split: MakeSplit | None = None
    split_rule: Callable[[CatalogEntry], str] | None = None
    check: Callable[[CatalogEntry], None] | None = None

    def __post_init__(self) -> None:
        if (self.read is None) == (self.read_tasks is None):
            raise ValueError(f"layout {self.description!r}: give exactly one of read and read_tasks")
        if (self.make_split is None) != (self.split_rule is None):
            raise ValueError(f"layout {self.description!r}: make_split and split_rule go together")

    @property
    def multitask(self) -> bool:
        """Whether a folder in this layout holds several tasks (read with ``tasks.load_tasks``)."""
        return self.read_tasks is not None

    def rule_for(self, entry: CatalogEntry) -> str:
        """What this layout's split rule reads and how it cuts, for ``entry`` ("" when it has none)."""
        return self.split_rule(entry) if self.split_rule else ""

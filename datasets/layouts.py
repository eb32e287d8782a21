"""``LAYOUTS``: every on-disk layout vlprompt reads, by the name catalog entries give in ``layout_name``.

One explicit dict, one line per layout (no registration by import side effects, CoOp #38).
Adding a layout is a module with its ``Layout`` (``layout.py`` says what one holds) and one
line here; ``load_dataset``, ``load_tasks``, ``generate_dataset``, ``make_split`` and the data
doctor then handle it without knowing its name.
"""

from __future__ import annotations

from vlprompt.datasets import fashion20, fgvc, imagenet, splitjson
from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.layout import Layout

LAYOUTS: dict[str, Layout] = {
    "split_json": splitjson.LAYOUT,
    "fgvc_aircraft": fgvc.LAYOUT,
    "imagenet": imagenet.IMAGENET,
    "imagenet_v2": imagenet.IMAGENET_V2,
    "imagenet_folders": imagenet.IMAGENET_FOLDERS,
    "fashion20": fashion20.LAYOUT,
}


def layout_of(entry: CatalogEntry) -> Layout:
    """The layout ``entry`` names; an unknown name lists the known ones."""
    try:
        return LAYOUTS[entry.layout_name]
    except KeyError:
        raise ValueError(
            f"catalog entry {entry.name!r}: unknown layout {entry.layout_name!r}; "
            f"known: {', '.join(sorted(LAYOUTS))}"
        ) from None

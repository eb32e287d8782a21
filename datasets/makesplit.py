"""Regenerate a missing split file the way the reference does — only when asked.

``load_dataset`` reads the published split files, because results are only comparable with
the papers on those splits. When a file cannot be had (dead links, CoOp #90, #29),
``make_split`` (CLI: ``python -m vlprompt.datasets make-split NAME --root R``, or
``load_dataset(..., make_missing_split=True)``) writes one *next to the data* under the
entry's split-file name, so every machine sharing the folder reads the same split. The rule
is the layout's (``Layout.make_split``): for CoOp's split JSON the entry's official-files
rule (``official.py``), for Fashion-20 SoftCPT's per-task cut (``fashion20.py``); the cuts
themselves are ``cuts.py``'s, deterministic for a seed (1 by default, CoOp's).
"""

from __future__ import annotations

from pathlib import Path

from vlprompt.datasets.catalog import CATALOG, CatalogEntry, get_entry
from vlprompt.datasets.cuts import DEFAULT_SEED
from vlprompt.datasets.files import require_folder
from vlprompt.datasets.layouts import layout_of

__all__ = ["DEFAULT_SEED", "datasets_with_rules", "describe_rule", "make_split"]


def describe_rule(entry: CatalogEntry) -> str:
    """One phrase for messages: what the entry's split rule reads and how it cuts ("" without one)."""
    return layout_of(entry).rule_for(entry)


def datasets_with_rules() -> tuple[str, ...]:
    """Catalog keys whose split file ``make_split`` can write, sorted."""
    return tuple(sorted(name for name, entry in CATALOG.items() if describe_rule(entry)))


def make_split(name: str, root: str | Path, *, seed: int = DEFAULT_SEED, overwrite: bool = False) -> Path:
    """Write ``<root>/<folder>/<split_file>`` by the entry's rule; return its path.

    Raises ``ValueError`` for an entry without a rule or bad official files,
    ``FileNotFoundError`` when the files the rule reads (or listed images) are missing, and
    ``FileExistsError`` when the split file exists and ``overwrite`` is false. The file is
    written beside the target and moved into place, so a reader never sees half of it.
    """
    entry = get_entry(name)
    layout = layout_of(entry)
    rule = layout.rule_for(entry)
    if layout.make_split is None or not rule:
        raise ValueError(
            f"dataset {entry.name!r} has no split rule; vlprompt reads its official files only. "
            f"Expected layout: {entry.layout}. Datasets with a rule: {', '.join(datasets_with_rules())}."
        )
    root = Path(root)
    folder = require_folder(entry, root, purpose=f"make-split needs it for {rule}")
    target = folder / entry.split_file
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    return layout.make_split(entry, root, seed, overwrite)

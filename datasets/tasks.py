"""Task sources for the multi-task protocol: task groups, multi-task datasets, single datasets.

A *task source* is what ``data.dataset`` names under ``data.protocol=multi_task``:

* a **group** of catalog datasets (``GROUPS``): SoftCPT's General-10 (CoOp's 11 minus
  ImageNet, ``kding1225/softcpt`` ``datasets/general10.py``) and the five small-world tasks;
  each member is one task, read with ``load_dataset`` and keyed by its dataset name;
* a **multi-task dataset**: one whose layout holds several tasks in one folder
  (``Layout.multitask``; ``fashion20``, each task keyed ``"fashion20/<task name>"``);
* any other **catalog dataset**: one task, keyed by its name.

``load_tasks`` returns, per task, its ``DatasetSplits`` (whose ``name`` is the key and whose
labels are 0..n_t-1 over that task's own classes) and the folder its few-shot cache uses
(``fewshot_cache.cached_fewshot(splits, shots, seed, task.cache_dir)``): the dataset folder for
a dataset, ``<root>/fashion20/split_fewshot_mt/<task id>`` for a Fashion-20 task (its cache is
then ``.../split_fewshot_mt/<task id>/split_fewshot/shot_K-seed_S.json``).

``task_names``, ``is_multitask`` and ``check_task_source`` read no data, so configs can be
checked before anything starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from vlprompt.datasets.catalog import CATALOG, SMALLWORLD_TASKS, get_entry
from vlprompt.datasets.files import require_folder
from vlprompt.datasets.layouts import layout_of
from vlprompt.datasets.splits import load_dataset
from vlprompt.datasets.types import TaskData

__all__ = ["GROUPS", "TaskData", "check_task_source", "is_multitask", "load_tasks", "task_names"]

GROUPS: dict[str, tuple[str, ...]] = {
    # SoftCPT General-10, in its datasets/general10.py order
    "general10": (
        "caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101",
        "oxford_flowers", "oxford_pets", "stanford_cars", "sun397", "ucf101",
    ),
    "sw_all": SMALLWORLD_TASKS,
}  # fmt: skip
"""Task groups by name: each member a catalog dataset, one task each, in this order."""


def check_task_source(name: str) -> None:
    """``ValueError`` unless ``name`` is a group (of catalog datasets) or a catalog dataset."""
    if name in GROUPS:
        for member in GROUPS[name]:
            try:
                get_entry(member)
            except ValueError as err:
                raise ValueError(f"task group {name!r}: {err}") from None
        return
    if name in CATALOG:
        return
    known = sorted(GROUPS) + sorted(CATALOG)
    close = difflib.get_close_matches(str(name).lower(), known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown dataset or task group {name!r}.{hint} Task groups: {', '.join(sorted(GROUPS))}; "
        f"datasets: {', '.join(sorted(CATALOG))}"
    )


def task_names(name: str) -> tuple[str, ...]:
    """The catalog datasets behind ``name``: a group's members, else ``(name,)`` (no data read)."""
    check_task_source(name)
    return tuple(GROUPS[name]) if name in GROUPS else (name,)


def is_multitask(name: str) -> bool:
    """Whether ``name`` holds several tasks: a group, or a multi-task dataset such as fashion20."""
    check_task_source(name)
    return name in GROUPS or layout_of(get_entry(name)).multitask


def load_tasks(name: str, root: str | Path, *, make_missing_split: bool = False) -> dict[str, TaskData]:
    """Every task of ``name`` under ``root``, keyed as in the module docstring, in order.

    ``make_missing_split`` is ``load_dataset``'s option, for every member: a missing split file
    is made by the dataset's rule (Fashion-20: SoftCPT's 50/20/30 per task) instead of being an
    error. A group member's error is re-raised with the group's name in front.
    """
    root = Path(root)
    tasks: dict[str, TaskData] = {}
    for member in task_names(name):
        try:
            loaded = _load_source(member, root, make_missing_split)
        except (FileNotFoundError, ValueError) as err:
            if member == name:
                raise
            raise type(err)(f"task group {name!r}, member {member!r}: {err}") from err
        clash = sorted(set(loaded) & set(tasks))
        if clash:
            raise ValueError(f"task source {name!r}: task {clash[0]!r} appears twice")
        tasks.update(loaded)
    return tasks


def _load_source(name: str, root: Path, make_missing_split: bool) -> dict[str, TaskData]:
    entry = get_entry(name)
    layout = layout_of(entry)
    if layout.read_tasks is None:
        splits = load_dataset(name, root, make_missing_split=make_missing_split)
        return {name: TaskData(splits, root / entry.folder)}
    require_folder(entry, root)
    return {task.splits.name: task for task in layout.read_tasks(entry, root, make_missing_split)}

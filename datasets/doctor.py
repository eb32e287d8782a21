"""The data doctor: walk a data root and say, per catalog entry, what is there and what is not.

``python -m vlprompt.datasets doctor --root DATA [NAME ...] [--verify-images]`` reads every
dataset exactly as a run would (``load_dataset``, or ``load_tasks`` for a multi-task one)
and prints one line per entry:

* ``found``   — classes, images and split sizes (and "k of N classes" for a partial copy;
  for a multi-task dataset such as fashion20 also its tasks, "20 tasks, 78 classes");
* ``missing`` — the dataset folder is absent: the exact paths expected under the root;
* ``broken``  — the folder is there but cannot be read: ``load_dataset``'s error, which names
  the missing file or the bad row, plus a make-split hint where one applies. With
  ``--verify-images`` every listed image is also decoded, and unreadable ones make the entry
  broken and are listed. The doctor writes nothing: fashion20 without its split file is
  broken, with the hint that says how the file is made.

The exit code is 1 when an entry is broken, when a dataset asked for by name is missing, and
when a survey of the whole catalog (no names) finds nothing at all -- most likely a wrong
``--root``; a missing dataset nobody asked for is not an error (few people keep all of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vlprompt.datasets.catalog import CATALOG, get_entry
from vlprompt.datasets.decode import load_image
from vlprompt.datasets.splits import load_dataset
from vlprompt.datasets.tasks import is_multitask, load_tasks
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # "found" | "missing" | "broken"
    summary: str
    details: tuple[str, ...] = field(default=())


def examine(name: str, root: Path, *, verify_images: bool = False) -> Finding:
    """The doctor's finding for one catalog entry under ``root``."""
    entry = get_entry(name)
    folder = root / entry.folder
    if not folder.exists():
        return Finding(name, "missing", f"{folder} absent; expected under {root}: {entry.layout}")
    several = is_multitask(name)
    try:
        parts = _read(name, root, several)
    except (FileNotFoundError, ValueError, OSError) as exc:  # its message names the path (and make-split)
        return Finding(name, "broken", str(exc))
    paths = {d.path for splits in parts for s in SPLIT_NAMES for d in splits.split(s)}
    sizes = " / ".join(f"{s} {sum(len(splits.split(s)) for splits in parts)}" for s in SPLIT_NAMES)
    n_classes = sum(splits.num_classes for splits in parts)
    classes = f"{n_classes} classes"
    if n_classes != entry.num_classes:
        classes = f"{n_classes} of {entry.num_classes} classes"
    if several:  # the entry's class lists are its tasks
        n_tasks = len(entry.class_folders)
        tasks = f"{len(parts)} tasks" if len(parts) == n_tasks else f"{len(parts)} of {n_tasks} tasks"
        classes = f"{tasks}, {classes}"
    summary = f"{classes}, {len(paths)} images ({sizes})"
    if not verify_images:
        return Finding(name, "found", summary)
    bad = _unreadable(paths)
    if bad:
        lines = tuple(f"unreadable: {p}" for p in bad[:20]) + (
            (f"... and {len(bad) - 20} more",) if len(bad) > 20 else ()
        )
        return Finding(name, "broken", f"{summary}; {len(bad)} unreadable images", lines)
    return Finding(name, "found", summary + ", all images readable")


def _read(name: str, root: Path, several: bool) -> tuple[DatasetSplits, ...]:
    """Every task's splits (one for a single-task dataset); the doctor never writes a split file."""
    if several:
        return tuple(task.splits for task in load_tasks(name, root).values())
    return (load_dataset(name, root),)


def _unreadable(paths: Iterable[str]) -> list[str]:
    bad = []
    for path in sorted(paths):
        try:
            load_image(path)
        except OSError:
            bad.append(path)
    return bad


def diagnose(
    root: str | Path, names: Iterable[str] | None = None, *, verify_images: bool = False
) -> list[Finding]:
    """Findings for ``names`` (default: every catalog entry, sorted)."""
    return [examine(n, Path(root), verify_images=verify_images) for n in (names or sorted(CATALOG))]


def report(findings: list[Finding], root: str | Path, *, requested: bool = False) -> tuple[str, int]:
    """The printed report and the exit code: 1 if any entry is broken, if any is missing when
    the entries were ``requested`` by name, or if a whole-catalog survey found none."""
    lines = [f"vlprompt data doctor: {root}"]
    for f in findings:
        lines.append(f"{f.status:<8} {f.name:<20} {f.summary}")
        lines.extend(f"{'':<29} {d}" for d in f.details)
    counts = {s: sum(f.status == s for f in findings) for s in ("found", "missing", "broken")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    if not requested and findings and counts["found"] == counts["broken"] == 0:
        lines.append(f"no dataset under {root}: is --root the folder that holds the dataset folders?")
    failed = counts["broken"] > 0 or (counts["missing"] > 0 and (requested or counts["found"] == 0))
    return "\n".join(lines), int(failed)

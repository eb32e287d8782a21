"""The file helpers every layout shares, each written once: listing, atomic writes, checks.

A layout reads a folder someone else laid out, so most of its code is checking: is the folder
there, is this file there, does every listed image exist, is a split file's JSON shaped right.
Each check lives here with one wording, so every layout's message says the same things —
which file, what layout was expected (``CatalogEntry.layout``) and, where it helps, the command
that writes a stand-in (``python -m vlprompt.datasets generate NAME --root R``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from vlprompt.datasets.entry import CatalogEntry
from vlprompt.datasets.types import SPLIT_NAMES

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

MARKER_FILE = "vlprompt_generated.json"
"""Written last into a generated dataset folder; records the arguments that produced it."""


# --- listing ------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (no hidden files), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def subfolders(folder: Path) -> list[str]:
    """The names of the folders directly in ``folder`` (no hidden ones), in Python's sorted order."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def generated_count(folder: Path) -> int | None:
    """The class count a ``generate_dataset`` marker declares for ``folder``, if any.

    Readers that check a folder's class count against the real dataset's accept this count
    instead, so a generated subset reads exactly as the real data would.
    """
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8")).get("num_classes")


def image_path(image_root: str, rel: str) -> str:
    """The absolute path of split-file path ``rel`` (POSIX separators) under ``image_root``."""
    return os.path.join(image_root, *PurePosixPath(rel).parts)


# --- writing ------------------------------------------------------------------------------------


def write_atomically(target: Path, text: str, *, overwrite: bool) -> None:
    """Write a split file beside the data so no reader ever sees half of it: a temporary file,
    then a hard link (never replaces a file another process wrote meanwhile) or, with
    ``overwrite``, a rename. Every layout's split file is written this way."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot write {target}: {exc}. Regenerate it where the data folder is writable "
            f"(`python -m vlprompt.datasets make-split`) or put the published file there."
        ) from exc
    os.close(fd)
    try:
        Path(tmp).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic, and never replaces a file another process wrote
            except FileExistsError:
                raise FileExistsError(f"{target} was written meanwhile by another process; kept") from None
            except OSError:  # a file system without hard links
                os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- what must be there -------------------------------------------------------------------------


def generate_hint(entry: CatalogEntry, root: Path | str) -> str:
    """The sentence that says how to get a procedural stand-in of ``entry`` under ``root``."""
    return (
        f"For a procedural stand-in with the same layout run "
        f"`python -m vlprompt.datasets generate {entry.name} --root {root}`."
    )


def require_folder(entry: CatalogEntry, root: Path, *, purpose: str = "") -> Path:
    """``<root>/<entry.folder>``, or ``FileNotFoundError`` naming it, the expected layout and the
    generator command (``purpose``, e.g. what make-split reads there, is added after the path)."""
    folder = root / entry.folder
    if folder.is_dir():
        return folder
    why = f"; {purpose}" if purpose else ""
    raise FileNotFoundError(
        f"dataset {entry.name!r} ({entry.description}): folder {folder} does not exist{why}. "
        f"Expected layout under {root}: {entry.layout}. {generate_hint(entry, root)}"
    )


def require(entry: CatalogEntry, path: Path, what: str = "", *, is_dir: bool = False, note: str = "") -> None:
    """``FileNotFoundError`` unless ``path`` is a file (a folder with ``is_dir``) of ``entry``'s layout.

    The message reads "dataset NAME: WHAT PATH not found NOTE. Expected layout: ...", ``note``
    saying what needs the file where that helps.
    """
    if path.is_dir() if is_dir else path.is_file():
        return
    named = f"{what} {path}" if what else str(path)
    raise FileNotFoundError(
        f"dataset {entry.name!r}: {named} not found{note}. Expected layout: {entry.layout}."
    )


def check_images_exist(
    where: str, image_root: Path, listed: Mapping[str, Sequence[str]], *, at_row: bool, note: str
) -> None:
    """``FileNotFoundError`` unless every listed image (split → relative paths) is a file.

    The message counts the missing images and names the first: with ``at_row`` by its split and
    row (the rows of a split file), else by its path alone; ``note`` ends it (what the paths are
    relative to, or that nothing was written). Every path passes :func:`check_relative` first, so
    no listed path is probed outside ``image_root`` (the official files a split is regenerated
    from reach the folder only through here).
    """
    for split in SPLIT_NAMES:
        for i, rel in enumerate(listed.get(split, ())):
            check_relative(f"{where}: split {split!r} row {i}" if at_row else where, rel)
    missing = [
        (split, i, image_root / rel)
        for split in SPLIT_NAMES
        for i, rel in enumerate(listed.get(split, ()))
        if not (image_root / rel).is_file()
    ]
    if not missing:
        return
    split, i, image = missing[0]
    first = f"at split {split!r} row {i}: {image}" if at_row else str(image)
    total = sum(len(rels) for rels in listed.values())
    raise FileNotFoundError(
        f"{where}: {len(missing)} of {total} listed images are missing, the first {first}{note}"
    )


# --- split files --------------------------------------------------------------------------------


def read_json(path: Path, where: str) -> Any:
    """The JSON in ``path``; ``ValueError`` starting with ``where`` when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc


def read_split_object(path: Path, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A split file's JSON object, checked to hold a list per split (and only ``extra_keys`` besides).

    Both split-file formats (CoOp's, SoftCPT's with its ``meta``) are this shape; their rows
    are then checked by the layout that reads them.
    """
    where = f"split file {path}"
    data = read_json(path, where)
    if not isinstance(data, dict):
        also = f" (and {', '.join(extra_keys)})" if extra_keys else ""
        raise ValueError(f"{where}: expected a JSON object with keys train/val/test{also}")
    missing = [s for s in SPLIT_NAMES if s not in data]
    extra = sorted(set(data) - {*SPLIT_NAMES, *extra_keys})
    if missing or extra:
        raise ValueError(f"{where}: missing keys {missing}, unexpected keys {extra}")
    for split in SPLIT_NAMES:
        if not isinstance(data[split], list):
            raise ValueError(f"{where}: split {split!r} is not a list of rows")
    return data


class UnsafePathError(ValueError):
    """A path read from a data file (split, list, annotation, cache) that would leave its folder.

    A ``ValueError`` like every other bad data file, so the driver's checks before Ray starts
    (``orchestrator/preflight.py``) turn it into the one-line config error; a class of its own
    so that callers and tests can tell a refused path from a merely malformed row.
    """


def check_relative(where: str, rel: str) -> None:
    """``UnsafePathError`` unless ``rel``, a path read from a data file, stays inside its folder.

    The one check every reader applies to every path it takes from a file, before the path is
    joined to a folder or touched (CoOp split JSON and Fashion-20 rows, FGVC-Aircraft's lists,
    the official files a split is regenerated from, few-shot caches): a split file copied from
    elsewhere must not make a sweep read, or probe for, files outside the dataset folder.

    The check is lexical, on the text: no empty path, no NUL byte, nothing absolute (``/x``,
    ``C:\\x``, ``\\\\host\\share``), and no ``..`` component at all — not even one that
    normalises away (``a/../b``): ``os.path.normpath`` drops ``a/..`` on paper, but the OS
    follows ``a`` first, and through a symlinked ``a`` that lands outside. Backslashes count as
    separators, so a file written on Windows (``..\\x``) is refused the same way everywhere.
    Symlinks are *not* resolved: a symlinked image folder inside the dataset folder (data kept on
    another disk) is the owner's choice and keeps working; only the file's text is distrusted.
    ``where`` ("split file PATH: split 'train' row 3") starts the message.
    """
    problem = _path_problem(rel)
    if problem:
        raise UnsafePathError(
            f"{where}: image path {rel!r} refused: {problem}. Paths listed in a data file must be "
            f"relative to its image folder and stay inside it (no absolute path, no '..' component); "
            f"fix or remove that entry"
        )


def _path_problem(rel: str) -> str | None:
    """Why ``rel`` would leave its folder (see :func:`check_relative`), or ``None``.

    Plain string operations, not ``pathlib`` (a SUN397 split file has 40,000 rows, read by every
    trial): a leading ``/`` or ``\\`` is absolute or UNC, a second character ``:`` a drive (as
    ``ntpath`` reads it), and ``..`` is looked for among the parts split on both separators.
    """
    if not rel:
        return "it is empty"
    if "\0" in rel:
        return "it contains a NUL byte"
    if rel.startswith(("/", "\\")) or rel[1:2] == ":":
        return "it is absolute"
    if ".." in rel.replace("\\", "/").split("/"):
        return "it has a '..' component"
    return None

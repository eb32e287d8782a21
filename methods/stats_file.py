"""The source-statistics file: its format, its metadata and their checks, readable without torch.

``methods/source_stats.py`` makes and loads these files (torch); this module only reads the
safetensors header -- an 8-byte little-endian length, then that many bytes of JSON naming every
tensor (dtype, shape, byte range) plus a ``__metadata__`` map of strings -- so the experiment
driver can refuse a missing, corrupt or foreign file before Ray or torch start
(``orchestrator/preflight.py``), with the same messages the method gives when it loads one.

The metadata records what made the file:

* the **fingerprint** of the model -- four parts, each a string, and their digest:
  ``backbone`` (architecture name and a digest of the image tower's weights), ``init_state`` (a
  digest of the prompts the statistics were taken with), ``blocks`` (the image blocks summarised)
  and ``transform`` (the preprocessing, a function of the backbone's input size, mean and std);
* the **source**: catalog dataset, split, images per class (0: all) -- or, for a folder of
  images labelled by class name (``method.source_folder``), that folder's absolute path with
  an empty dataset and split (a file written before folders existed has no ``source_folder``:
  read as none);
* the **classes** (a JSON list, label order of the file's per-class rows) and the image count.

Every error names the file and the command that makes one (:data:`MAKE_COMMAND`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

#: ``format`` of the files this version writes and reads.
FORMAT = "vlprompt-source-stats/1"
#: How to make a file (the error messages say it).
MAKE_COMMAND = "python experiments/source_stats.py --config CONFIG [overrides]"
#: The parts of a model's fingerprint, in order.
FINGERPRINT_PARTS = ("backbone", "init_state", "blocks", "transform")
#: The source a file was made from: metadata key → the ``SourceStatsSpec`` field it records.
SOURCE_KEYS = {
    "source_dataset": "dataset",
    "source_split": "split",
    "source_images_per_class": "images_per_class",
    "source_folder": "folder",
}
#: A header longer than this is not one (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def fingerprint_digest(parts: Mapping[str, str]) -> str:
    """sha256 of the fingerprint's parts (:data:`FINGERPRINT_PARTS`), as hex."""
    canonical = json.dumps({k: str(parts[k]) for k in FINGERPRINT_PARTS}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def blocks_text(blocks: Sequence[int]) -> str:
    """The ``blocks`` part: ``"0,1"``."""
    return ",".join(str(int(b)) for b in blocks)


def remake(file: str | Path) -> str:
    """The end of every error: how to make the file."""
    return f"make it with `{MAKE_COMMAND}` (it prints the method.source_stats=... to use) [{file}]"


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """``(metadata, tensors)`` of the safetensors file at ``path``, checked for its shape.

    ``FileNotFoundError`` for a missing file, ``ValueError`` for anything that is not a whole
    source-statistics file of this :data:`FORMAT` (truncated, another kind of file, a header
    whose byte ranges run past the end).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"source statistics {file} do not exist: {remake(file)}")
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"source statistics {file} are corrupt or not a safetensors file ({err}): {remake(file)}"
        ) from None
    if end > size - 8 - length:
        raise ValueError(
            f"source statistics {file} are truncated ({size} bytes, the header needs "
            f"{8 + length + end}): {remake(file)}"
        )
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{file} is not a source statistics file of format {FORMAT} (its format: "
            f"{metadata.get('format')!r}): {remake(file)}"
        )
    return dict(metadata), header


def check_made_by(
    metadata: Mapping[str, str],
    file: str | Path,
    parts: Mapping[str, str],
    source: Mapping[str, object] | None = None,
) -> None:
    """``ValueError`` unless the file's fingerprint parts equal ``parts`` (those given: a subset
    is checked, e.g. without the weights' digest before torch starts) and its source is
    ``source`` (``SOURCE_KEYS``' fields); the message names each part that differs."""
    wrong = [
        f"{key} is {metadata.get(key)!r}, this model's {value!r}"
        for key, value in parts.items()
        if metadata.get(key) != value
    ]
    for key, field in SOURCE_KEYS.items():
        recorded = metadata.get(key, "" if key == "source_folder" else None)
        if source is not None and field in source and recorded != str(source[field]):
            wrong.append(f"{key} is {recorded!r}, the config's {str(source[field])!r}")
    if wrong:
        raise ValueError(
            f"source statistics {file} were made by another model or from another source: "
            f"{'; '.join(wrong)}. Remake them for this configuration: {remake(file)}"
        )


def file_classes(metadata: Mapping[str, str], file: str | Path) -> tuple[str, ...]:
    """The class names the file has rows for, in its order."""
    try:
        classes = json.loads(metadata["classes"])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("not a list of names")
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"source statistics {file} have no readable class list ({err}): {remake(file)}"
        ) from None
    return tuple(classes)


def check_classes(metadata: Mapping[str, str], file: str | Path, needed: Sequence[str]) -> tuple[str, ...]:
    """The file's classes, after checking that every one of ``needed`` is among them (the
    message names those that are not)."""
    classes = file_classes(metadata, file)
    have = set(classes)
    missing = [name for name in dict.fromkeys(needed) if name not in have]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise ValueError(
            f"source statistics {file} have no images of {len(missing)} of the {len(set(needed))} "
            f"classes needed: {shown} (the file covers {len(classes)} classes of "
            f"{source_label(metadata)}){_case_hint(missing, classes)}; make them from a source with "
            f"these classes (method.source_dataset or method.source_folder): {remake(file)}"
        )
    return classes


def source_label(metadata: Mapping[str, str]) -> str:
    """The file's source for messages: ``'imagenet'`` or ``folder '/data/proxy'``."""
    folder = metadata.get("source_folder", "")
    return f"folder {folder!r}" if folder else repr(metadata.get("source_dataset"))


def _case_hint(missing: Sequence[str], classes: Sequence[str]) -> str:
    """Names the file has that differ from a missing one only in case or underscores: a class
    folder named as the user expected but compared exactly (``datasets/classfolders.py``)."""
    loose = {c.casefold().replace("_", " "): c for c in classes}
    near = [(m, loose[m.casefold()]) for m in missing if m.casefold() in loose][:3]
    if not near:
        return ""
    pairs = ", ".join(f"{have!r} for {want!r}" for want, have in near)
    return f" -- it has {pairs}: class names are compared exactly, rename the class folder"


def check_without_torch(
    metadata: Mapping[str, str],
    file: str | Path,
    model_name: str,
    blocks: Sequence[int],
    source: Mapping[str, object],
) -> None:
    """What the driver can check before torch starts: the architecture named by the
    ``backbone`` part (not the weights' digest), the blocks and the source."""
    made_with = str(metadata.get("backbone", "")).split(" ")[0]
    if made_with != model_name:
        raise ValueError(
            f"source statistics {file} were made with backbone {made_with!r}, this run's model is "
            f"{model_name!r}: {remake(file)}"
        )
    check_made_by(metadata, file, {"blocks": blocks_text(blocks)}, source)

"""Frozen image features cached on disk as Parquet, one entry per image family, shared by every trial.

Methods whose image tower stays frozen (``frozen_image_tower``) classify from the backbone's
image embeddings. Through the deterministic test transform -- or through an augmented view
drawn under a seed of its own (``orchestrator/views.py``) -- an image's embedding depends only
on the model weights, the numeric setup, the transform, the view and the image: not on the
method, the seed of a few-shot subset or the trial. Two seeds' few-shot subsets overlap, the
test split is the same for every trial, so the cache is keyed *per image*, not per split: a
trial reads the images it needs and encodes only those nobody encoded before.

**An entry is a family** -- (backbone identity, precision, device, transform, view) over one
dataset's images (:func:`family_key`; the dataset is the first folder of the image id, see
:func:`image_id`) -- stored as ``<dir>/<sha256 of the key>.parquet`` with columns ``image``
(the id: the path relative to ``data.root``, so a cache folder serves every node whatever its
mount point), ``stat`` (``size:mtime_ns`` of the file when it was encoded: a replaced image no
longer matches and is encoded again, never served stale) and ``feature`` (float32). The file's
metadata holds the key and SHA-256 checksums of the id/stat columns and of each row group's
feature bytes; a reader verifies what it reads, so a partial or corrupt file is reported on
stderr, ignored and recomputed, never trusted. Reads return bit-identical values to the ones
written.

**Writes merge.** A trial (or the sweep's pipeline, ``orchestrator/pipeline.py``) adds the rows
it encoded to the entry: under an advisory lock on ``<entry>.lock`` it reads the rows already
there, adds its own and writes a temporary file that is renamed over the entry (``os.replace``),
so readers see either the old or the new complete file.

**Trials stream their features.** A data-parallel rank reads only the row groups holding the
rows of its own items -- exactly the slices ``batching.epoch_batches`` / ``eval_batches`` give
it. This is the equivalent of Ray Train's ``get_dataset_shard`` for this loop: the exact
data-parallel update needs every rank to see a deterministic slice of one seeded *global* batch
(``orchestrator/worker.py``), which a streaming shard of a Ray Dataset does not guarantee (its
split follows block arrival, not the permutation); reading the rank's rows by id from the
shared Parquet entry gives the same I/O saving with the batches the exactness proof needs.

Torch-free (numpy and pyarrow only): the driver plans and checks the cache without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = 2
ROW_GROUP = 1024  # rows per Parquet row group: the unit a rank reads and a checksum covers

#: The view of the deterministic test transform.
TEST_VIEW: dict[str, Any] = {"kind": "test"}


def seeded_view(seed: int, index: int) -> dict[str, Any]:
    """Augmented view ``index`` (an epoch, or one of K) drawn under the sweep's ``view_seed``."""
    return {"kind": "seeded", "seed": int(seed), "index": int(index)}


def backbone_identity(name: str, pretrained: str | None, seed: int) -> dict[str, Any]:
    """What identifies the backbone's weights without reading them.

    A checkpoint file is named by its absolute path, size and modification time (hashing a
    600 MB file in every trial would cost more than it saves); an open_clip tag or
    ``"bundled"`` by itself; random-init weights by the seed that drew them.
    """
    identity: dict[str, Any] = {"model": name, "pretrained": pretrained}
    if pretrained is None:
        identity["init_seed"] = seed
    elif pretrained != "bundled" and os.path.isfile(os.path.expanduser(pretrained)):
        path = Path(pretrained).expanduser().resolve()
        stat = path.stat()
        identity.update(pretrained=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return identity


def image_id(path: str, root: str | os.PathLike | None) -> str:
    """A stable name for an image: its path relative to ``data.root`` when it lies under it
    (POSIX separators), else its absolute path. The same image has the same id in every trial,
    process and node that mounts the data at ``data.root``."""
    absolute = os.path.abspath(path)
    if root is not None:
        base = os.path.abspath(root)
        if os.path.commonpath([absolute, base]) == base and absolute != base:
            return Path(os.path.relpath(absolute, base)).as_posix()
    return absolute


def dataset_of(image: str) -> str:
    """The dataset an id belongs to: its first folder under the root (else its own folder)."""
    return os.path.dirname(image) if os.path.isabs(image) else image.split("/", 1)[0]


def file_stat(path: str) -> str:
    """``size:mtime_ns`` of an image file (``missing`` when it is not there)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def family_key(
    backbone: Mapping[str, Any],
    precision: str,
    device: str,
    transform: str,
    view: Mapping[str, Any],
    dataset: str,
) -> dict[str, Any]:
    """The inputs every feature of one entry depends on; :func:`digest` of it names the file."""
    return {
        "format": FORMAT,
        "backbone": dict(backbone),
        "precision": precision,
        "device": device,  # CPU and CUDA kernels differ in the last bits
        "transform": transform,
        "view": dict(view),
        "dataset": dataset,
    }


def digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


class MissingPlannedFeatures(RuntimeError):
    """The sweep's pipeline wrote an entry this trial cannot find (a node without the cache)."""


@dataclass
class Entry:
    """What an entry file holds, read without its features: where each id's row is."""

    path: Path
    rows: dict[str, int]  # image id → row
    stats: list[str]  # per row
    width: int
    group_sums: list[str]  # sha256 of each row group's feature bytes


@dataclass
class FeatureStore:
    """A folder of cached feature entries, and counts of what one run found and did there.

    ``hits``/``misses``: lookups that found every requested image / had to encode some;
    ``encoded``: images encoded (by this process) and merged in; ``rejected``: files ignored.
    """

    root: Path
    hits: int = 0
    misses: int = 0
    encoded: int = 0
    rejected: list[str] = field(default_factory=list)

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.root / f"{digest(key)}.parquet"

    # ------------------------------------------------------------------ reading
    def entry(self, key: Mapping[str, Any], report: bool = True) -> Entry | None:
        """The entry's index (ids, stats, checksums), or ``None`` when absent or unreadable
        (counted and said on stderr when ``report``)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            meta = pq.read_schema(path).metadata or {}
            stored = json.loads(meta[b"vlprompt"].decode("utf-8"))
            check = json.loads(meta[b"vlprompt_check"].decode("utf-8"))
            table = pq.read_table(path, columns=["image", "stat"])
            ids, stats = table.column("image").to_pylist(), table.column("stat").to_pylist()
        except (OSError, KeyError, ValueError, TypeError, pa.ArrowException) as err:
            return self._reject(path, f"unreadable ({err})", report)
        if stored != dict(key):
            return self._reject(path, "its recorded inputs differ from this run's", report)
        if check.get("index") != _index_sum(ids, stats) or len(check.get("groups", ())) != _groups(len(ids)):
            return self._reject(
                path, "its image index does not match its checksum (partial or corrupt file)", report
            )
        return Entry(
            path, {image: i for i, image in enumerate(ids)}, stats, int(check["width"]), check["groups"]
        )

    def missing(self, entry: Entry | None, ids: Sequence[str], stats: Sequence[str]) -> list[int]:
        """Positions in ``ids`` whose row is absent or was encoded from another version of the file."""
        if entry is None:
            return list(range(len(ids)))
        return [i for i, (image, stat) in enumerate(zip(ids, stats, strict=True))
                if image not in entry.rows or entry.stats[entry.rows[image]] != stat]  # fmt: skip

    def read(self, entry: Entry, ids: Sequence[str], report: bool = True) -> np.ndarray | None:
        """``(len(ids), D)`` float32 rows of ``ids`` (all present), reading only their row groups;
        ``None`` (reported) when a row group fails its checksum."""
        rows = np.array([entry.rows[image] for image in ids], dtype=np.int64)
        groups = sorted(set((rows // ROW_GROUP).tolist()))
        try:
            handle = pq.ParquetFile(entry.path)
            parts = {}
            for g in groups:
                column = handle.read_row_group(g, columns=["feature"]).column("feature").combine_chunks()
                values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                if hashlib.sha256(values.tobytes()).hexdigest() != entry.group_sums[g]:
                    return self._reject(
                        entry.path, f"row group {g} fails its checksum (corrupt file)", report
                    )
                parts[g] = values.reshape(len(column), entry.width)
        except (OSError, ValueError, IndexError, pa.ArrowException) as err:
            return self._reject(entry.path, f"unreadable ({err})", report)
        out = np.empty((len(ids), entry.width), dtype=np.float32)
        for i, row in enumerate(rows.tolist()):
            out[i] = parts[row // ROW_GROUP][row % ROW_GROUP]
        return out

    def _reject(self, path: Path, why: str, report: bool = True) -> None:
        if not report:  # a merge re-reading what the lookup already reported
            return None
        self.rejected.append(str(path))
        print(f"[vlprompt] feature cache: ignoring {path}: {why}; recomputing", file=sys.stderr, flush=True)
        return None

    # ------------------------------------------------------------------ writing
    def merge(
        self, key: Mapping[str, Any], ids: Sequence[str], stats: Sequence[str], features: np.ndarray
    ) -> None:
        """Add (or replace) the rows of ``ids`` in the entry, atomically; a cache folder that
        cannot be written is not an error (the run continues on what it computed)."""
        path = self.path(key)
        features = np.ascontiguousarray(features, dtype=np.float32)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                old = self.entry(key, report=False)
                keep_ids, keep_stats, keep = _kept_rows(self, old, set(ids))
                all_ids = [*keep_ids, *ids]
                all_stats = [*keep_stats, *stats]
                values = features if keep is None else np.concatenate([keep, features])
                _write_entry(path, key, all_ids, all_stats, values)
        except OSError as err:
            print(
                f"[vlprompt] feature cache: cannot write {path} ({err}); continuing without it",
                file=sys.stderr,
            )

    def stats(self) -> dict[str, float]:
        return {
            "feature_cache_hits": float(self.hits),
            "feature_cache_misses": float(self.misses),
            "feature_cache_rejected": float(len(self.rejected)),
            "feature_images_encoded": float(self.encoded),
        }


def _kept_rows(
    store: FeatureStore, old: Entry | None, replaced: set[str]
) -> tuple[list[str], list[str], np.ndarray | None]:
    """The rows of ``old`` that stay (those not being replaced); nothing if it cannot be read."""
    if old is None:
        return [], [], None
    ids = [image for image in old.rows if image not in replaced]
    if not ids:
        return [], [], None
    values = store.read(old, ids, report=False)
    if values is None:
        return [], [], None
    return ids, [old.stats[old.rows[image]] for image in ids], values


def _write_entry(
    path: Path, key: Mapping[str, Any], ids: list[str], stats: list[str], values: np.ndarray
) -> None:
    width = values.shape[1]
    flat = pa.array(values.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "image": pa.array(ids, type=pa.string()),
            "stat": pa.array(stats, type=pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(flat, width),
        }
    )
    sums = [
        hashlib.sha256(values[i : i + ROW_GROUP].tobytes()).hexdigest() for i in range(0, len(ids), ROW_GROUP)
    ]
    check = {"width": width, "rows": len(ids), "index": _index_sum(ids, stats), "groups": sums}
    table = table.replace_schema_metadata(
        {"vlprompt": json.dumps(dict(key), sort_keys=True), "vlprompt_check": json.dumps(check)}
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _index_sum(ids: Sequence[str], stats: Sequence[str]) -> str:
    return hashlib.sha256(
        "".join(f"{i}\t{s}\n" for i, s in zip(ids, stats, strict=True)).encode()
    ).hexdigest()


def _groups(rows: int) -> int:
    return -(-rows // ROW_GROUP)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An advisory lock that serialises merges into one entry (trials racing on it would
    otherwise each drop the other's new rows); without ``fcntl`` merges simply race."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

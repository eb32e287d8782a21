"""Frozen image features cached on disk as Parquet, shared by every trial that needs them.

Methods whose image tower stays frozen (``frozen_image_tower``) classify from the backbone's
image embeddings; with the deterministic test transform those embeddings depend only on the
model weights, the numeric setup and the images -- not on the method, the seed of a
pretrained model or the trial. A sweep of 18 trials over one dataset would otherwise encode
the same evaluation split 18 times (on ImageNet, 50,000 images per trial).

A cache entry is one Parquet file ``<dir>/<key>.parquet``: one row per image, in item order,
column ``feature`` (a fixed-size list of float32). ``key`` is a SHA-256 over everything the
features depend on (:func:`feature_key`); the inputs are also stored in the file's metadata so
an entry can be inspected (``pyarrow.parquet.read_schema(path).metadata``). Reading returns
bit-identical tensors to the ones written, so a run that hits the cache gets exactly the
numbers it would have computed.

Entries are written to a temporary file and renamed into place: trials racing on one key each
write a complete file and the last rename wins (their content is identical). A file that
cannot be read or has the wrong shape is reported and recomputed, never trusted.

Only deterministic features are cached (one view through the test transform): augmented
training views are random draws that belong to one run's seed and RNG stream.

Deliberately plain ``pyarrow`` on the worker, not Ray Data: the encoding runs on the worker's
own device inside the trial, and a Ray Data actor pool started from inside a trial competes
with the trial's workers for the same CPUs (on a 2-CPU cluster whose CPUs the trials hold, the
pool waits for a CPU that never frees). The files are ordinary Parquet, so
``ray.data.read_parquet`` reads them as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

FORMAT = 1


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


def feature_key(
    backbone: Mapping[str, Any], precision: str, device: str, transform: str, paths: Sequence[str]
) -> dict[str, Any]:
    """The inputs a cached feature depends on; :func:`digest` of it names the file.

    Images are identified by path, size and modification time, so an image replaced in place
    (or a corrupt one) is a new key and gets decoded again, not served from a stale entry.
    """
    files = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            files.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:  # a missing file: the loader reports it by name
            files.update(f"{path}\tmissing\n".encode())
    return {
        "format": FORMAT,
        "backbone": dict(backbone),
        "precision": precision,
        "device": device,  # CPU and CUDA kernels differ in the last bits
        "transform": transform,
        "images": len(paths),
        "files_sha256": files.hexdigest(),
    }


def digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class FeatureStore:
    """A folder of cached feature files, and counts of what one run found there."""

    root: Path
    hits: int = 0
    misses: int = 0
    rejected: list[str] = field(default_factory=list)

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.root / f"{digest(key)}.parquet"

    def get_or_compute(self, key: Mapping[str, Any], compute: Callable[[], Tensor]) -> Tensor:
        """The cached ``(N, D)`` float32 features for ``key``, computing and storing them if absent."""
        path = self.path(key)
        cached = self._read(path, key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        features = compute().float().cpu().contiguous()
        self._write(path, key, features)
        return features

    def _read(self, path: Path, key: Mapping[str, Any]) -> Tensor | None:
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
            stored = json.loads(table.schema.metadata[b"vlprompt"].decode("utf-8"))
            column = table.column("feature").combine_chunks()
            width = column.type.list_size
            values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            features = torch.from_numpy(values.reshape(len(column), width).copy())
        except (OSError, KeyError, ValueError, TypeError, pa.ArrowException) as err:
            return self._reject(path, f"unreadable ({err})")
        if stored != dict(key):
            return self._reject(path, "its recorded inputs differ from this run's")
        if features.shape[0] != key["images"]:
            return self._reject(path, f"{features.shape[0]} rows for {key['images']} images")
        return features

    def _reject(self, path: Path, why: str) -> None:
        self.rejected.append(str(path))
        print(f"[vlprompt] feature cache: ignoring {path}: {why}; recomputing", file=sys.stderr, flush=True)
        return None

    def _write(self, path: Path, key: Mapping[str, Any], features: Tensor) -> None:
        """Write atomically; a cache folder that cannot be written is not an error."""
        width = features.shape[1]
        flat = pa.array(features.numpy().reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, width)
        table = pa.table({"feature": column})
        table = table.replace_schema_metadata({"vlprompt": json.dumps(dict(key), sort_keys=True)})
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".parquet")
            os.close(fd)
            try:
                pq.write_table(table, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
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
        }

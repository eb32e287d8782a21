"""Bundles: the grid points one Tune trial runs in turn, inside one Ray Train run.

A small trial spends most of its wall time starting processes (the Tune trial actor, the Train
controller and workers), importing torch and open_clip and setting up Ray Train; the training
itself may take two seconds. Configurations that share what a Train run sets up -- the model,
the dataset and protocol, the workers -- can share one run: its workers import once, start
once, and read the features the first configuration cached. Each configuration is still its
own MLflow child run and its own Tune result, and is resumed on its own: a configuration whose
child run FINISHED (found by :func:`config_digest`) is never run again.

Only ``sampler: grid`` bundles: an adaptive sampler (TPE) must see each result before it
proposes the next point, so its trials are bundles of one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

#: The keys a bundle's configurations must share (everything a Train run sets up once).
#: ``data.shots`` and every other ``data`` key may differ: the few-shot subset is drawn per run.
SHARED_SECTIONS = ("model", "resources")
SHARED_DATA_KEYS = ("dataset", "root", "protocol", "eval_targets")
SHARED_TRAIN_KEYS = ("device",)


#: Top-level sections a configuration's identity does not depend on.
NOT_DIGESTED = ("sweep", "resources", "tracking")


def config_digest(config: Mapping[str, Any]) -> str:
    """What identifies one configuration across launches of its sweep (a child run's tag).

    Everything that says *what* is computed: not the ``sweep`` section (its name, the space),
    not how and where it runs and is recorded (``resources``, ``tracking``: a resumed sweep may
    run on another cluster), not the private ``_`` keys. A resumed sweep recomputes the same
    digest for the same point.
    """
    kept = {k: v for k, v in config.items() if k not in NOT_DIGESTED and not k.startswith("_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:20]


def bundle_key(config: Mapping[str, Any]) -> str:
    """Configurations with the same key can share one Train run."""
    data, train = config.get("data", {}), config.get("train", {})
    shared = {
        **{s: config.get(s) for s in SHARED_SECTIONS},
        **{f"data.{k}": data.get(k) for k in SHARED_DATA_KEYS},
        **{f"train.{k}": train.get(k) for k in SHARED_TRAIN_KEYS},
    }
    return json.dumps(shared, sort_keys=True, default=str)


def make_bundles(
    configs: Sequence[Mapping[str, Any]], points: Sequence[dict[str, Any]], slots: int, max_size: int
) -> list[list[dict[str, Any]]]:
    """Group grid ``points`` (whose full configs are ``configs``) into bundles, in grid order.

    Points with the same :func:`bundle_key` share bundles of at most ``size`` points, where
    ``size`` is ``max_size`` when positive, else ``ceil(points / slots)`` -- as large as bundles
    can be while every one of the ``slots`` concurrent trials still has one to run. ``max_size
    = 1`` is one configuration per trial.
    """
    size = max_size if max_size > 0 else max(1, math.ceil(len(points) / max(slots, 1)))
    groups: dict[str, list[dict[str, Any]]] = {}
    for config, point in zip(configs, points, strict=True):
        groups.setdefault(bundle_key(config), []).append(point)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def bundle_points(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points of a trial's bundle (an adaptive sampler's trial: its own config, one point)."""
    return list(config.get("_bundle") or [{}])

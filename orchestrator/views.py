"""What a frozen-image-tower run trains on -- images, or encoded augmented views -- and how views are seeded.

``train.view_mode`` (``orchestrator/schema.py``):

* ``images``: batches of images through a ``DataLoader``, random crops from the run's own RNG
  stream, the image tower run on every step;
* ``per_epoch`` (default): a fresh augmented view of every image in every epoch -- the
  reference's statistics (Dassl draws a new crop each time it loads an image) -- but each view
  encoded once and read as a feature;
* ``cycled``: ``train.feature_views`` = K views per image; in each epoch every sample takes one
  of its K views by a seeded draw (``Source.batches``).

**Shared views.** With ``train.view_seed`` set (default 0), view ``v`` of image ``i`` is drawn
under a torch generator seeded from (the image's id, ``v``, ``view_seed``) -- :func:`view_seed`
-- not from the run's stream: it is the same crop and flip in every trial, seed and process,
so its feature is computed once (by the sweep's pipeline, ``orchestrator/pipeline.py``, or the
first trial that needs it) and read from the feature cache by every other. ``view_seed: null``
draws the views from the run's own stream (today's ``feature_views`` behaviour): never shared,
never cached. Methods whose image tower is trained, and full-batch fits (which see each image
once through the test transform), always train on what they did before.

Torch-free: the driver's pipeline plans with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from vlprompt.methods import Capabilities
from vlprompt.orchestrator.protocols import Protocol

MODES = ("images", "per_epoch", "cycled")


@dataclass(frozen=True)
class TrainViews:
    """The augmented views a run trains on."""

    mode: str  # "per_epoch" | "cycled"
    count: int  # views per image: the epochs (per_epoch) or K (cycled)
    seed: int | None  # train.view_seed; None: drawn from the run's stream (not shareable)

    @property
    def shared(self) -> bool:
        return self.seed is not None


def fits_full_batch(caps: Capabilities, protocol: Protocol) -> bool:
    """One full-batch ``fit`` replaces the SGD epochs: a ``fits_features`` method, where training happens."""
    return caps.fits_features and protocol.trains


def train_views(train: Any, caps: Capabilities, protocol: Protocol) -> TrainViews | None:
    """The views SGD reads, or ``None`` when it reads images (or nothing is trained by SGD)."""
    sgd = caps.frozen_image_tower and caps.learns and protocol.trains and not fits_full_batch(caps, protocol)
    if not sgd or train.view_mode == "images":
        return None
    count = train.epochs if train.view_mode == "per_epoch" else train.feature_views
    return TrainViews(train.view_mode, int(count), train.view_seed)


def view_seed(image: str, index: int, seed: int) -> int:
    """The torch seed of view ``index`` of image ``image`` (an id, ``features.image_id``).

    SHA-256, not Python's ``hash`` (salted per process): the same number in every process.
    """
    raw = hashlib.sha256(f"{seed}\x00{index}\x00{image}".encode()).digest()
    return int.from_bytes(raw[:8], "little") & (2**63 - 1)

"""The one interface every prompt-learning method implements.

The training/evaluation loop (``vlprompt.orchestrator.loop``) knows nothing about
individual methods: it hands a :class:`Batch` to :meth:`Method.training_loss` while
training and to :meth:`Method.predict` while evaluating. The shapes were chosen so
that the methods still to come fit without special cases in that loop:

* **multi-task** (SoftCPT): a method is built for a mapping ``task -> class names``;
  every batch names its task, and logits/loss are over that task's classes only.
* **distillation** (PromptKD): ``Batch.labels`` may be ``None`` (unlabelled images);
  the method owns its frozen teacher and builds its own targets in ``training_loss``.
* **test-time adaptation** (TPT, PromptSync): ``predict`` may adapt on each test
  sample (with gradients it enables itself), predict, then reset; the loop never
  wraps ``predict`` in ``torch.no_grad`` -- methods that do not adapt decorate their
  own ``predict`` with it. A method that wants augmented views of each test sample
  declares the ``test_time_views`` capability; the test-time protocol then fills ``Batch.views``.
* **cached features**: methods whose image tower stays frozen declare
  ``frozen_image_tower`` and then accept ``Batch.features`` (the backbone's
  un-normalised image embeddings) in place of ``Batch.images``.
* **full-batch solvers** (linear probe): a method may also implement the optional hook
  :class:`FitsFeatures` -- ``fit(train, val)`` on whole :class:`FeatureSet` s of cached
  features -- and declare ``fits_features``; the loop then calls it once instead of SGD epochs.
* **state kept across epochs** (PromptSRC's prompt aggregation): a method may implement the
  optional hook :class:`EpochHooks` and declare ``epoch_hooks``; the loop then calls
  ``epoch_end(epoch, epochs)`` after every SGD epoch, before the epoch's checkpoint.
* **a fixed text classifier** (:class:`TextClassifier`): methods whose class weights are text
  features that, once trained, no longer change (zero-shot, CoOp, IVLP, ...) expose them, so a
  composite method (PromptKD's teacher) can use any of them.

What a method can do is declared in its registry entry (``vlprompt.methods.METHODS``,
:class:`~vlprompt.methods.Capabilities`), never read off the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One batch of one task.

    Exactly one of ``images`` and ``features`` is set. ``images`` are already
    transformed and normalised for the backbone; ``features`` are the backbone's
    image embeddings (``Backbone.encode_image`` output, not L2-normalised).
    """

    task: str
    images: Tensor | None = None
    features: Tensor | None = None
    labels: Tensor | None = None
    views: Tensor | None = None
    """Test-time protocol only: ``(B, V, C, H, W)`` augmented views of each sample in
    ``images`` (which then holds the originals), for methods that adapt on them (TPT).
    Methods that do not adapt ignore it."""

    def __post_init__(self) -> None:
        if (self.images is None) == (self.features is None):
            raise ValueError("Batch needs exactly one of `images` or `features`")

    def __len__(self) -> int:
        x = self.images if self.images is not None else self.features
        assert x is not None
        return int(x.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(self.task, move(self.images), move(self.features), move(self.labels), move(self.views))


@runtime_checkable
class Method(Protocol):
    """What the loop needs from a method (an ``nn.Module`` holding only its learnable parts
    plus a reference to the frozen backbone)."""

    def training_loss(self, batch: Batch) -> Tensor:
        """Scalar loss for one batch (labels may be ``None`` for unsupervised methods)."""
        ...

    def predict(self, batch: Batch) -> Tensor:
        """Logits ``(B, n_classes_of_task)`` for the batch's task."""
        ...

    def learned_state(self) -> dict[str, Tensor]:
        """The tensors worth saving: everything the method learned, nothing frozen."""
        ...

    def parameters(self, recurse: bool = True) -> Any: ...


@runtime_checkable
class TextClassifier(Protocol):
    """A method whose classifier is a fixed set of text features per task (capability
    ``text_classifier``): the same rows its ``predict`` uses, once training is over."""

    def text_features(self, task: str) -> Tensor:
        """Class weights ``(n_cls, D)`` of ``task`` (not normalised), in its class order."""
        ...


@runtime_checkable
class EpochHooks(Protocol):
    """Optional hook of a :class:`Method` that acts at epoch ends (capability ``epoch_hooks``).

    The loop calls ``epoch_end`` after each SGD epoch's optimiser steps, on every data-parallel
    rank alike, before that epoch's checkpoint is taken: whatever it keeps must be a persistent
    buffer of the module (``orchestrator/checkpoints.py`` saves those with the parameters), so a
    resumed run goes on exactly as an unbroken one.
    """

    def epoch_end(self, epoch: int, epochs: int) -> None:
        """Epoch ``epoch`` of ``epochs`` (1-based: ``epochs`` after the last) has ended."""
        ...


@runtime_checkable
class ReportsInputs(Protocol):
    """Optional hook of a :class:`Method` that reads inputs beyond its options (PromptAlign's
    source statistics file): what it read, logged as params of the run that used it."""

    def run_inputs(self) -> dict[str, str]:
        """Param name → value, e.g. ``{"source_stats.file": path, "source_stats.fingerprint": ...}``."""
        ...


@dataclass
class FeatureSet:
    """A whole split of one task as cached image features: what :meth:`FitsFeatures.fit` solves on."""

    task: str
    features: Tensor
    """``(N, D)`` image embeddings (``Backbone.encode_image`` output, not L2-normalised)."""
    labels: Tensor
    """``(N,)`` class indices within ``task``."""

    def __post_init__(self) -> None:
        if self.features.dim() != 2 or self.labels.shape != (self.features.shape[0],):
            raise ValueError(
                f"FeatureSet needs features (N, D) and labels (N,), got {tuple(self.features.shape)} "
                f"and {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@runtime_checkable
class FitsFeatures(Protocol):
    """Optional hook of a :class:`Method` that solves in closed form / full batch.

    Only for ``frozen_image_tower`` methods (declared ``fits_features``). The loop caches the
    train split's features (test transform, one view) and the val split's, calls ``fit``
    once per task instead of the SGD epochs, and logs the returned numbers as metrics.
    ``fit`` must be deterministic: every data-parallel rank calls it on the same data.
    """

    def fit(self, train: FeatureSet, val: FeatureSet) -> dict[str, float]:
        """Set the learned tensors of ``train.task`` from the whole split; return scalars worth logging."""
        ...


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that receive gradients (the frozen backbone's never do)."""
    return [p for p in module.parameters() if p.requires_grad]


def count_trainable(module: nn.Module) -> int:
    """Exact number of trainable scalars, counted from the built module."""
    return sum(p.numel() for p in trainable_parameters(module))

"""Batches for the loop: the items of a split as images or cached image features, cut per task.

:class:`Source` holds one split of one or several tasks. It hands out batches of images through
a ``DataLoader``, or -- for methods whose image tower is frozen -- of cached image features: the
test transform's features (exact, shared with every trial through the feature cache) or a run's
own augmented training views. :class:`ViewsDataset` gives test-time methods each test image with
its augmented views. :func:`epoch_batches` and :func:`eval_batches` decide which items each
data-parallel rank sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlprompt import datasets as vds
from vlprompt.datasets.images import ImageDataset
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.orchestrator.features import FeatureStore, feature_key
from vlprompt.orchestrator.worker import WorkerContext


@dataclass(frozen=True)
class Encoder:
    """What encodes a source's images, and what identifies the features it makes (cache key)."""

    backbone: Backbone
    device: torch.device
    batch_size: int
    identity: Mapping[str, Any]  # backbone identity (features.backbone_identity), precision, device


class Source:
    """Batches of one split of one or several tasks, as images or as cached frozen image features.

    The items of several tasks are concatenated (task after task) and indexed as one split, so
    a shuffle and a global batch cover every task; each batch is then cut into one
    :class:`Batch` per task present in it (a method computes logits over one task's classes).
    """

    def __init__(self, parts: Mapping[str, Sequence[vds.Datum]], transform: Any, loader_workers: int):
        self.tasks = list(parts)
        self.items = [item for task in self.tasks for item in parts[task]]
        self.task_ids = torch.tensor(
            [i for i, task in enumerate(self.tasks) for _ in parts[task]], dtype=torch.long
        )
        self.dataset = ImageDataset(self.items, transform)
        self.loader_workers = loader_workers
        self.labels = torch.tensor([d.label for d in self.items], dtype=torch.long)
        self.features: Tensor | None = None  # (views, N, D) when cached

    def __len__(self) -> int:
        return len(self.items)

    def _encode(self, encoder: Encoder) -> Tensor:
        """Every image through the transform once, encoded: ``(N, D)`` fp32 on the CPU."""
        size = encoder.batch_size
        index = [list(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]
        with torch.no_grad():
            chunks = [
                encoder.backbone.encode_image(images.to(encoder.device)).float().cpu()
                for images, _ in self._loader(index)
            ]
        return torch.cat(chunks) if chunks else torch.empty(0, encoder.backbone.embed_dim)

    def cache_views(self, encoder: Encoder, views: int) -> None:
        """Encode every image ``views`` times, a fresh random transform draw each time (a run's
        own augmented training views: drawn from the run's RNG stream, never stored)."""
        self.features = torch.stack([self._encode(encoder) for _ in range(views)])

    def cache_test_features(self, encoder: Encoder, store: FeatureStore | None) -> None:
        """Encode every image once through the deterministic test transform, via ``store``.

        Runs under a forked RNG: whether the features come from the disk cache or are
        computed (the data loader draws a seed) must not move the run's random stream.
        """

        def encode() -> Tensor:
            with torch.random.fork_rng(devices=[]):
                return self._encode(encoder)

        if store is None or not len(self):
            self.features = encode().unsqueeze(0)
            return
        identity = encoder.identity
        key = feature_key(
            identity["backbone"],
            identity["precision"],
            identity["device"],
            repr(self.dataset.transform),
            [item.path for item in self.items],
        )
        self.features = store.get_or_compute(key, encode).unsqueeze(0)

    def task_features(self, task: str) -> tuple[Tensor, Tensor]:
        """The first cached view's features and the labels of one task's items."""
        assert self.features is not None
        mask = self.task_ids == self.tasks.index(task)
        return self.features[0][mask], self.labels[mask]

    def _loader(self, batches: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(
            torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.loader_workers)
        )

    def batches(
        self, index_batches: list[list[int]], epoch: int | None = None, seed: int = 0
    ) -> Iterator[list[Batch]]:
        """Per index batch, one :class:`Batch` per task in it (task order).

        ``epoch`` given: each sample takes a seeded random one of its cached views. The view
        is drawn per (epoch, sample), not per batch, so every rank of a data-parallel run
        sees exactly the views a single worker would.
        """
        if self.features is not None:
            views = torch.zeros(len(self), dtype=torch.long)
            if epoch is not None:
                gen = torch.Generator().manual_seed(seed * 7919 + epoch)
                views = torch.randint(len(self.features), (len(self),), generator=gen)
            for idx in index_batches:
                index = torch.tensor(idx, dtype=torch.long)
                yield self._by_task(index, features=self.features[views[index], index])
            return
        for idx, (images, labels) in zip(index_batches, self._loader(index_batches), strict=True):
            yield self._by_task(torch.tensor(idx, dtype=torch.long), images=images, labels=labels)

    def _by_task(
        self,
        index: Tensor,
        images: Tensor | None = None,
        features: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> list[Batch]:
        labels = self.labels[index] if labels is None else labels
        ids = self.task_ids[index]
        if len(self.tasks) == 1:
            return [Batch(self.tasks[0], images=images, features=features, labels=labels)]
        out = []
        for t in ids.unique(sorted=True).tolist():
            mask = ids == t
            out.append(
                Batch(
                    self.tasks[t],
                    images=None if images is None else images[mask],
                    features=None if features is None else features[mask],
                    labels=labels[mask],
                )
            )
        return out


class ViewsDataset(torch.utils.data.Dataset):
    """``(original, views, label)`` per test item for methods that adapt at test time.

    The views of item ``i`` are drawn under a seed of (run seed, ``i``), so they do not
    depend on the order samples are visited, the worker count or the data-parallel rank.
    """

    def __init__(self, items: Sequence[vds.Datum], transform: Any, seed: int):
        self.items, self.transform, self.seed = tuple(items), transform, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        image = vds.load_image(self.items[index].path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            original, views = self.transform(image)
        return original, views, self.items[index].label


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, ctx: WorkerContext) -> list[list[int]]:
    """This rank's share of each global batch of a seeded shuffle (same on every rank).

    ``drop_last`` (Dassl) when the split holds at least one batch.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    drop_last = n >= batch_size
    stop = (n // batch_size) * batch_size if drop_last else n
    return [
        perm[i : min(i + batch_size, stop)][ctx.rank :: ctx.world_size] for i in range(0, stop, batch_size)
    ]


def eval_batches(n: int, batch_size: int, ctx: WorkerContext) -> list[list[int]]:
    """This rank's items in order, in batches (ranks take every ``world_size``-th item)."""
    mine = list(range(ctx.rank, n, ctx.world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

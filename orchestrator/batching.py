"""Batches for the loop: the items of a split as images or image features, cut per task.

:class:`Source` holds one split of one or several tasks. It hands out batches of images through
a ``DataLoader``, or -- for methods whose image tower is frozen -- of image features: the test
transform's, or augmented training views (``orchestrator/views.py``). Features are read lazily
from the feature cache (``orchestrator/features.py``), only the rows the batches asked for
(a data-parallel rank reads its own slice); what the cache lacks is encoded here, the whole
split's missing images in split order and batches of ``train.eval_batch_size`` -- so a run that
finds nothing cached computes exactly the numbers it always did -- and merged into the cache.
Per-epoch views are loaded when their epoch starts, never all epochs at once.
:class:`ViewsDataset` gives test-time methods each test image with its augmented views.
:func:`epoch_batches` and :func:`eval_batches` decide which items each data-parallel rank sees.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlprompt import datasets as vds
from vlprompt.datasets.images import ImageDataset
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.orchestrator.features import (
    TEST_VIEW,
    FeatureStore,
    MissingPlannedFeatures,
    dataset_of,
    family_key,
    file_stat,
    image_id,
    seeded_view,
)
from vlprompt.orchestrator.views import TrainViews, view_seed
from vlprompt.orchestrator.worker import WorkerContext


@dataclass(frozen=True)
class Encoder:
    """What encodes a source's images, what identifies the features it makes, where they are kept.

    ``planned``: the sweep's pipeline wrote every entry this run needs; one that is missing is
    an error (a node that cannot see the cache folder), not a reason to encode again.
    """

    backbone: Backbone
    device: torch.device
    batch_size: int
    identity: Mapping[str, Any]  # backbone identity (features.backbone_identity), precision, device
    store: FeatureStore | None = None
    root: str | None = None  # data.root: image ids are paths relative to it
    planned: bool = False


def seeded_transform(transform: Any, image: Any, seed: int) -> Any:
    """``transform(image)`` drawn under ``seed``, leaving the caller's random stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


class SeededViews(torch.utils.data.Dataset):
    """``(view, label)`` per item: view ``index`` of each image, seeded by (image id, index, seed)."""

    def __init__(self, items: Sequence[vds.Datum], ids: Sequence[str], transform: Any, index: int, seed: int):
        self.items, self.ids, self.transform = tuple(items), tuple(ids), transform
        self.index, self.seed = index, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = vds.load_image(self.items[i].path)
        return seeded_transform(
            self.transform, image, view_seed(self.ids[i], self.index, self.seed)
        ), self.items[i].label


def encode_batches(backbone: Backbone, device: torch.device, images: Tensor) -> Tensor:
    """One batch through the frozen image tower: ``(B, D)`` fp32 on the CPU (the pipeline's
    encoder actors call exactly this, so their features are the trial's)."""
    with torch.no_grad():
        return backbone.encode_image(images.to(device)).float().cpu()


class Source:
    """Batches of one split of one or several tasks, as images or as frozen image features.

    The items of several tasks are concatenated (task after task) and indexed as one split, so
    a shuffle and a global batch cover every task; each batch is then cut into one
    :class:`Batch` per task present in it (a method computes logits over one task's classes).
    ``features`` is ``(slots, N, D)``: slot 0 for the test view or the current epoch's view,
    one slot per view for cycled views; ``_have`` says which rows are filled.
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
        self.features: Tensor | None = None
        self._have: Tensor | None = None
        self._encoder: Encoder | None = None
        self._views: TrainViews | None = None  # None with an encoder: the test transform
        self._epoch: int | None = None  # the per-epoch view now in slot 0
        self._ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    # ------------------------------------------------------------------ which features
    def use_test_features(self, encoder: Encoder) -> None:
        """Read the deterministic test transform's features (cached, rows read when needed)."""
        self._encoder, self._views = encoder, None
        self._allocate(1, encoder.backbone.embed_dim)

    def use_views(self, encoder: Encoder, views: TrainViews) -> None:
        """Train on augmented views: cycled from the run's stream are encoded now (the run's
        RNG at this point, as always); shared or per-epoch views are loaded when needed."""
        if views.mode == "cycled" and not views.shared:
            self.cache_views(encoder, views.count)
            return
        self._encoder, self._views = encoder, views
        self._allocate(views.count if views.mode == "cycled" else 1, encoder.backbone.embed_dim)

    def cache_views(self, encoder: Encoder, views: int) -> None:
        """Encode every image ``views`` times, a fresh random transform draw each time (a run's
        own augmented training views: drawn from the run's RNG stream, never stored)."""
        self.features = torch.stack([self._encode(encoder) for _ in range(views)])
        self._have = torch.ones(self.features.shape[:2], dtype=torch.bool)

    def _allocate(self, slots: int, width: int) -> None:
        self.features = torch.zeros(slots, len(self), width)  # untouched pages cost no memory
        self._have = torch.zeros(slots, len(self), dtype=torch.bool)

    # ------------------------------------------------------------------ encoding
    def _encode(self, encoder: Encoder) -> Tensor:
        """Every image through the transform once, encoded: ``(N, D)`` fp32 on the CPU."""
        return self._encode_rows(encoder, self.dataset, list(range(len(self))))

    def _encode_rows(self, encoder: Encoder, dataset: Any, rows: list[int]) -> Tensor:
        """``rows`` of ``dataset`` encoded in order, in batches of ``encoder.batch_size``."""
        size = encoder.batch_size
        index = [rows[i : i + size] for i in range(0, len(rows), size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=index, num_workers=self.loader_workers)
        chunks = [encode_batches(encoder.backbone, encoder.device, images) for images, _ in loader]
        return torch.cat(chunks) if chunks else torch.empty(0, encoder.backbone.embed_dim)

    def ids(self) -> list[str]:
        if self._ids is None:
            root = self._encoder.root if self._encoder else None
            self._ids = [image_id(item.path, root) for item in self.items]
        return self._ids

    def _view(self, slot: int) -> tuple[dict[str, Any] | None, Any]:
        """The cache view spec of ``slot`` (``None``: the run's own stream) and its dataset."""
        views = self._views
        if views is None:
            return TEST_VIEW, self.dataset
        if not views.shared:
            return None, self.dataset
        index = self._epoch if views.mode == "per_epoch" else slot
        assert index is not None
        return seeded_view(views.seed, index), SeededViews(
            self.items, self.ids(), self.dataset.transform, index, views.seed
        )

    def _fill(self, slot: int, rows: Sequence[int]) -> None:
        """Rows ``rows`` of ``slot`` present: read from the cache, else encoded and merged into it."""
        assert self._have is not None and self.features is not None and self._encoder is not None
        need = [r for r in rows if not self._have[slot, r]]
        if not need:
            return
        view, dataset = self._view(slot)
        encoder = self._encoder
        if view is None:  # the run's own stream: one fresh draw of the whole split
            self.features[slot] = self._encode(encoder)
            self._have[slot] = True
            return
        if encoder.store is None:
            with torch.random.fork_rng(devices=[]):
                self.features[slot] = self._encode_rows(encoder, dataset, list(range(len(self))))
            self._have[slot] = True
            return
        missing = self._read_cached(slot, view, need)
        if missing:
            with torch.random.fork_rng(devices=[]):
                encoded = self._encode_rows(encoder, dataset, missing)
            self._store(slot, view, missing, encoded)

    def _families(self, view: Mapping[str, Any]) -> dict[str, list[int]]:
        """Cache entries (one per dataset) of this split's rows, each with its rows in order."""
        groups: dict[str, list[int]] = {}
        for row, image in enumerate(self.ids()):
            groups.setdefault(dataset_of(image), []).append(row)
        return groups

    def _key(self, view: Mapping[str, Any], dataset: str, transform: Any) -> dict[str, Any]:
        identity = self._encoder.identity  # type: ignore[union-attr]
        return family_key(
            identity["backbone"], identity["precision"], identity["device"], repr(transform), view, dataset
        )

    def _read_cached(self, slot: int, view: Mapping[str, Any], need: Sequence[int]) -> list[int]:
        """Fill the needed rows the cache holds; return every row of the split it lacks (in
        order) -- encoding all of them, not only this rank's, keeps ranks and runs in step."""
        encoder = self._encoder
        assert encoder is not None and encoder.store is not None and self.features is not None
        store, ids, wanted = encoder.store, self.ids(), set(need)
        missing: list[int] = []
        for dataset, rows in self._families(view).items():
            key = self._key(view, dataset, self.dataset.transform)
            entry = store.entry(key)
            stats = [file_stat(self.items[r].path) for r in rows]
            absent = [rows[i] for i in store.missing(entry, [ids[r] for r in rows], stats)]
            if absent and encoder.planned and (entry is not None or not store.path(key).is_file()):
                raise _planned_missing(store.path(key), dataset, [ids[r] for r in absent])
            lacking = set(absent)
            present = [r for r in rows if r in wanted and r not in lacking]
            values = store.read(entry, [ids[r] for r in present]) if present and entry else None
            if present and values is None:
                absent = rows  # a row group failed its checksum: recompute this entry's rows
            elif present:
                self.features[slot, present] = torch.from_numpy(values)
                self._have[slot, present] = True  # type: ignore[index]
            store.hits += not absent
            store.misses += bool(absent)
            missing += absent
        return sorted(missing)

    def _store(self, slot: int, view: Mapping[str, Any], rows: list[int], encoded: Tensor) -> None:
        encoder = self._encoder
        assert encoder is not None and encoder.store is not None and self.features is not None
        self.features[slot, rows] = encoded
        self._have[slot, rows] = True  # type: ignore[index]
        encoder.store.encoded += len(rows)
        ids, position = self.ids(), {r: i for i, r in enumerate(rows)}
        for dataset, members in self._families(view).items():
            mine = [r for r in members if r in position]
            if mine:
                values = encoded[[position[r] for r in mine]].numpy()
                stats = [file_stat(self.items[r].path) for r in mine]
                key = self._key(view, dataset, self.dataset.transform)
                encoder.store.merge(key, [ids[r] for r in mine], stats, values)

    # ------------------------------------------------------------------ batches
    def task_features(self, task: str) -> tuple[Tensor, Tensor]:
        """The first slot's features (every row) and the labels of one task's items."""
        if self._encoder is not None:
            self._fill(0, range(len(self)))
        assert self.features is not None
        mask = self.task_ids == self.tasks.index(task)
        return self.features[0][mask], self.labels[mask]

    def _loader(self, batches: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(
            torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.loader_workers)
        )

    def _slots(self, epoch: int | None, seed: int) -> Tensor:
        """Which slot each sample reads in ``epoch``: a seeded draw per (epoch, sample) among
        cycled views, not per batch, so every rank sees exactly the views one worker would."""
        assert self.features is not None
        slots = torch.zeros(len(self), dtype=torch.long)
        if epoch is not None and self.features.shape[0] > 1:
            gen = torch.Generator().manual_seed(seed * 7919 + epoch)
            slots = torch.randint(len(self.features), (len(self),), generator=gen)
        return slots

    def batches(
        self, index_batches: list[list[int]], epoch: int | None = None, seed: int = 0
    ) -> Iterator[list[Batch]]:
        """Per index batch, one :class:`Batch` per task in it (task order).

        Features: each sample reads its slot (:meth:`_slots`); only the rows these batches
        hold are read from the cache. A per-epoch view is loaded when its epoch starts.
        """
        if self.features is None:
            for idx, (images, labels) in zip(index_batches, self._loader(index_batches), strict=True):
                yield self._by_task(torch.tensor(idx, dtype=torch.long), images=images, labels=labels)
            return
        if self._views is not None and self._views.mode == "per_epoch" and epoch != self._epoch:
            self._epoch = epoch
            self._allocate(1, self.features.shape[-1])  # drop the last epoch's view
        slots = self._slots(epoch, seed)
        if self._encoder is not None:
            needed = sorted({i for idx in index_batches for i in idx})
            for slot in slots[needed].unique().tolist() if needed else []:
                self._fill(slot, [i for i in needed if slots[i] == slot])
        for idx in index_batches:
            index = torch.tensor(idx, dtype=torch.long)
            yield self._by_task(index, features=self.features[slots[index], index])

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


def _planned_missing(path: Any, dataset: str, absent: Sequence[str]) -> MissingPlannedFeatures:
    shown = ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
    return MissingPlannedFeatures(
        f"the sweep's feature pipeline wrote {path} (dataset {dataset!r}), but on node "
        f"{socket.gethostname()} it lacks {len(absent)} of the images this trial needs ({shown}): "
        "point data.feature_cache at a folder every node sees (e.g. /shared/vlp-features), "
        "or set data.pipeline=false to let each trial encode its own features"
    )

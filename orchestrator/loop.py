"""The one training/evaluation loop, run by every Ray Train worker (``train_loop``).

data → method → optimise → evaluate → report. It knows methods only through the
interface in ``vlprompt.methods.base`` and datasets only through ``vlprompt.datasets``.

Reference behaviour (Dassl/CoOp, ``reference/METHODS.md`` §0) kept here: SGD with
momentum 0.9 and weight decay 5e-4; the learning rate is set once per epoch — a
constant ``warmup_lr`` for the warm-up epochs, then cosine annealing with ``T_max`` =
total epochs (so it never reaches zero); ``drop_last`` when the training set holds at
least one batch; the last epoch's model is evaluated (no selection on test).

Methods with the optional ``fit`` hook (``FitsFeatures``, e.g. the linear probe) replace
the SGD epochs by one full-batch solve on cached features: the train split encoded once
with the test transform (as CoOp's ``lpclip`` does) and the val split; ``train.epochs``,
``lr`` and ``feature_views`` do not apply to them.

Protocols shape only the data and the metrics, never the method: ``multi_task`` trains one
method on every task of a group (batches cut per task, losses summed, accuracy per task and
their mean); ``test_time`` trains nothing and classifies each test image on its own, handing
methods that adapt (``test_time_views``) the image's augmented views in ``Batch.views``.

Distributed training (``num_workers > 1``) is exact rather than approximate: every
rank draws the same seeded permutation, takes its slice of each *global* batch
(``train.batch_size`` is the global batch size), and the gradients of the trainable
parameters are summed across ranks with per-sample weights — the same update a single
worker computes on the whole batch, whatever the worker count. The learnable tensors are
tiny, so an explicit all-reduce replaces DDP (whose hooks only fire through
``forward``, which methods do not use).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vlprompt import datasets as vds
from vlprompt.datasets.images import ImageDataset, test_transform, train_transform
from vlprompt.datasets.views import test_time_views
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, FeatureSet, FitsFeatures, count_trainable, trainable_parameters
from vlprompt.methods.clip import Backbone, load_backbone
from vlprompt.orchestrator import tracking
from vlprompt.orchestrator.config import flatten, method_section
from vlprompt.orchestrator.features import FeatureStore, backbone_identity, feature_key


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def lr_at(epoch: int, *, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), per epoch."""
    if epoch < warmup_epochs:
        return warmup_lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# data


@dataclass
class RunData:
    """The splits one run trains and evaluates on."""

    tasks: dict[str, vds.DatasetSplits]  # task → its (few-shot) splits; base classes for base-to-novel
    novel: vds.DatasetSplits | None  # novel classes (base-to-novel only)
    fingerprint: str
    targets: dict[str, vds.DatasetSplits]  # cross-dataset / domain-generalisation / test-time targets
    skipped_images: tuple[str, ...] = ()  # unreadable images dropped (data.skip_bad_images)


def prepare_data(cfg: DictConfig) -> RunData:
    """Read the dataset (or task group), sample the few-shot subset, apply the protocol's class split.

    ``multi_task``: every task of the group is sampled on its own (K shots per class of each
    task, its own cache file). ``test_time``: nothing is trained, so no few-shot sampling;
    the whole test split is used.
    """
    root = Path(cfg.data.root)
    protocol = cfg.data.protocol

    def ensure(name: str) -> None:
        if cfg.data.generate_missing and not (root / vds.get_entry(name).folder).exists():
            vds.generate_dataset(name, root, seed=0)

    def load(name: str) -> vds.DatasetSplits:
        ensure(name)
        return vds.load_dataset(name, root, make_missing_split=cfg.data.make_missing_splits)

    if protocol == "multi_task":
        for member in vds.task_names(cfg.data.dataset):
            ensure(member)
        loaded = vds.load_tasks(cfg.data.dataset, root, make_missing_split=cfg.data.make_missing_splits)
        sources = {key: (task.splits, task.cache_dir) for key, task in loaded.items()}
    else:
        entry = vds.get_entry(cfg.data.dataset)
        sources = {cfg.data.dataset: (load(cfg.data.dataset), root / entry.folder)}
    targets = {name: load(name) for name in cfg.data.eval_targets}
    skipped: list[str] = []
    if cfg.data.skip_bad_images:
        sources = {key: (_drop_unreadable(s, skipped), d) for key, (s, d) in sources.items()}
        targets = {name: _drop_unreadable(s, skipped) for name, s in targets.items()}
    if protocol == "test_time":
        tasks = {key: splits for key, (splits, _) in sources.items()}
    else:
        tasks = {
            key: vds.cached_fewshot(splits, cfg.data.shots, cfg.seed, cache_dir)
            for key, (splits, cache_dir) in sources.items()
        }
    fingerprint = _fingerprint(tasks)
    if protocol == "base_to_novel":
        ((key, fewshot),) = tasks.items()
        base = vds.subsample_classes(fewshot, "base")
        novel = vds.subsample_classes(fewshot, "new")
        return RunData({key: base}, novel, fingerprint, targets, tuple(skipped))
    return RunData(tasks, None, fingerprint, targets, tuple(skipped))


def _drop_unreadable(splits: vds.DatasetSplits, skipped: list[str]) -> vds.DatasetSplits:
    kept = {}
    for name in vds.SPLIT_NAMES:
        kept[name], bad = vds.drop_unreadable(splits.split(name))
        skipped.extend(bad)
    return dataclasses.replace(splits, **kept)


def _fingerprint(tasks: Mapping[str, vds.DatasetSplits]) -> str:
    """One task: its split fingerprint. Several: a hash over every task's, in task order."""
    if len(tasks) == 1:
        return vds.split_fingerprint(next(iter(tasks.values())))
    lines = "".join(f"{key} {vds.split_fingerprint(s)}\n" for key, s in tasks.items())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


class _Source:
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

    def _encode(self, backbone: Backbone, device: torch.device, batch: int) -> Tensor:
        """Every image through the transform once, encoded: ``(N, D)`` fp32 on the CPU."""
        with torch.no_grad():
            chunks = [
                backbone.encode_image(images.to(device)).float().cpu()
                for images, _ in self._loader(
                    [list(range(i, min(i + batch, len(self)))) for i in range(0, len(self), batch)]
                )
            ]
        return torch.cat(chunks) if chunks else torch.empty(0, backbone.embed_dim)

    def cache_views(self, backbone: Backbone, views: int, device: torch.device, batch: int) -> None:
        """Encode every image ``views`` times, a fresh random transform draw each time (a run's
        own augmented training views: drawn from the run's RNG stream, never stored)."""
        self.features = torch.stack([self._encode(backbone, device, batch) for _ in range(views)])

    def cache_test_features(
        self,
        backbone: Backbone,
        device: torch.device,
        batch: int,
        store: FeatureStore | None,
        identity: dict[str, Any],
    ) -> None:
        """Encode every image once through the deterministic test transform, via ``store``.

        Runs under a forked RNG: whether the features come from the disk cache or are
        computed (the data loader draws a seed) must not move the run's random stream.
        """

        def encode() -> Tensor:
            with torch.random.fork_rng(devices=[]):
                return self._encode(backbone, device, batch)

        if store is None or not len(self):
            self.features = encode().unsqueeze(0)
            return
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


class _ViewsDataset(torch.utils.data.Dataset):
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
    """This rank's share of each global batch of a seeded shuffle (same on every rank)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    drop_last = n >= batch_size
    stop = (n // batch_size) * batch_size if drop_last else n
    return [
        perm[i : min(i + batch_size, stop)][ctx.rank :: ctx.world_size] for i in range(0, stop, batch_size)
    ]


def eval_batches(n: int, batch_size: int, ctx: WorkerContext) -> list[list[int]]:
    mine = list(range(ctx.rank, n, ctx.world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


# --------------------------------------------------------------------------------------
# optimisation and evaluation


def _sync_gradients(params: Sequence[nn.Parameter], ctx: WorkerContext) -> None:
    if ctx.world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def _broadcast_parameters(params: Sequence[nn.Parameter], ctx: WorkerContext) -> None:
    if ctx.world_size > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def train_epoch(
    method: nn.Module,
    source: _Source,
    optimizer: torch.optim.Optimizer,
    cfg: DictConfig,
    epoch: int,
    ctx: WorkerContext,
) -> dict[str, float]:
    """One epoch of SGD steps; a step's loss is the sum over its tasks' sub-batches.

    Each sub-batch's mean loss is weighted by its share of the *global* batch, so a step
    minimises (sum of every sample's loss) / batch size whatever the split into tasks and
    ranks — SoftCPT's "summed loss of all tasks" (Eq. 8) for several tasks, plain CoOp
    for one.
    """
    params = trainable_parameters(method)
    n = len(source)
    global_sizes = [
        len(b)
        for b in epoch_batches(n, cfg.train.batch_size, epoch, cfg.seed, WorkerContext(0, 1, ctx.device))
    ]
    mine = epoch_batches(n, cfg.train.batch_size, epoch, cfg.seed, ctx)
    loss_sum = seen = 0.0
    for global_size, parts in zip(global_sizes, source.batches(mine, epoch, cfg.seed), strict=True):
        optimizer.zero_grad(set_to_none=True)
        total: Tensor | float = 0.0
        for batch in parts:
            batch = batch.to(ctx.device)
            loss = method.training_loss(batch)
            total = total + loss * (len(batch) / global_size)
            loss_sum += float(loss.detach()) * len(batch)
            seen += len(batch)
        if isinstance(total, Tensor):
            total.backward()
        _sync_gradients(params, ctx)
        optimizer.step()
    stats = torch.tensor([loss_sum, seen], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(stats)
    if stats[1] == 0:
        return {"train_loss": float("nan")}
    return {"train_loss": float(stats[0] / stats[1])}


def _accuracy(correct: int, total: int, ctx: WorkerContext, task: str) -> float:
    counts = torch.tensor([correct, total], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(counts)
    if counts[1] == 0:
        raise ValueError(f"task {task!r}: the evaluation split is empty")
    return float(100.0 * counts[0] / counts[1])


def evaluate(method: nn.Module, source: _Source, cfg: DictConfig, ctx: WorkerContext) -> float:
    """Top-1 accuracy in percent over the whole split (counts summed across ranks)."""
    correct = total = 0
    for parts in source.batches(eval_batches(len(source), cfg.train.eval_batch_size, ctx)):
        for batch in parts:
            batch = batch.to(ctx.device)
            labels, batch.labels = batch.labels, None  # predictions never see the labels
            logits = method.predict(batch)
            correct += int((logits.argmax(dim=-1) == labels).sum())
            total += len(batch)
    return _accuracy(correct, total, ctx, source.tasks[0])


def evaluate_test_time(
    method: nn.Module,
    items: Sequence[vds.Datum],
    task: str,
    transform: Any,
    cfg: DictConfig,
    ctx: WorkerContext,
) -> float:
    """Accuracy of a method that adapts on each test sample: one sample at a time, with its views.

    The method's ``predict`` gets the original image and its augmented views, never the
    label; it adapts, predicts and resets itself (``methods/base.py``). Progress is printed
    about every tenth of the split, since this is the slow part of a test-time run.
    """
    dataset = _ViewsDataset(items, transform, cfg.seed)
    mine = [[i] for i in range(ctx.rank, len(dataset), ctx.world_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=cfg.data.loader_workers)
    correct = total = 0
    every = max(1, len(mine) // 10)
    t0 = time.perf_counter()
    for step, (original, views, label) in enumerate(loader, start=1):
        batch = Batch(task, images=original, views=views).to(ctx.device)
        logits = method.predict(batch)
        correct += int((logits.argmax(dim=-1).cpu() == label).sum())
        total += len(label)
        if ctx.is_main and (step % every == 0 or step == len(mine)):
            rate = step / max(time.perf_counter() - t0, 1e-9)
            print(
                f"[vlprompt] test-time {task}: {step}/{len(mine)} samples on this worker, "
                f"accuracy so far {100.0 * correct / total:.1f}% ({rate:.2f} samples/s)",
                flush=True,
            )
    return _accuracy(correct, total, ctx, task)


# --------------------------------------------------------------------------------------
# the run


def run(cfg: DictConfig, ctx: WorkerContext, run_id: str | None, report: Any = None) -> dict[str, float]:
    """One complete run on this worker; returns the final metrics (identical on every rank).

    ``report(metrics, checkpoint_dir)`` is called once, at the end, with the final metrics and
    (on rank 0) a folder holding the learned state. Per-epoch numbers go to MLflow and stdout
    only: Tune rejects intermediate results that lack the sweep metric.
    """
    t_start = time.perf_counter()
    if cfg.train.batch_size < ctx.world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be at least "
            f"the number of workers ({ctx.world_size})"
        )
    seed_everything(cfg.seed)
    uri = cfg.tracking.uri
    log = ctx.is_main and run_id is not None
    test_time = cfg.data.protocol == "test_time"

    data = prepare_data(cfg)
    if data.skipped_images and ctx.is_main:
        shown = ", ".join(data.skipped_images[:5]) + (" ..." if len(data.skipped_images) > 5 else "")
        print(f"[vlprompt] skipped {len(data.skipped_images)} unreadable images: {shown}", flush=True)
    backbone = load_backbone(
        cfg.model.name, cfg.model.pretrained, device=ctx.device, precision=cfg.model.precision
    )
    method_name, options = method_section(cfg.method)
    tasks = data.tasks
    label = cfg.data.dataset  # what progress lines and errors call this run's data

    def build(task_splits: Mapping[str, vds.DatasetSplits]) -> nn.Module:
        classes = {task: list(s.classnames) for task, s in task_splits.items()}
        templates = {task: s.template for task, s in task_splits.items()}
        return build_method(method_name, backbone, classes, options, templates=templates).to(ctx.device)

    def transfer(splits: vds.DatasetSplits, what: str) -> nn.Module:
        """The trained method's learned state in a method built for other classes/templates."""
        (task,) = tasks
        moved = build({task: splits})
        state = method.learned_state()
        try:
            unexpected = moved.load_state_dict(state, strict=False).unexpected_keys
        except RuntimeError as err:  # shape mismatch, e.g. class-specific context
            unexpected = [f"{sorted(state)} ({str(err).splitlines()[-1].strip()})"]
        if unexpected:
            raise ValueError(
                f"{method_name}: learned state {unexpected} does not transfer to {what} "
                "(class-specific parameters cannot be evaluated on other classes)"
            )
        return moved.eval()

    method = build(tasks)
    params = trainable_parameters(method)
    _broadcast_parameters(params, ctx)
    n_trainable = count_trainable(method)
    frozen_images = bool(getattr(method, "frozen_image_tower", False))
    views_per_sample = int(getattr(method, "test_time_views", 0) or 0)
    adapts = test_time and views_per_sample > 0
    if test_time and params and not adapts:
        raise ValueError(
            f"data.protocol=test_time trains nothing, and {method_name} has {n_trainable} trainable "
            "parameters it would be evaluated with untrained; use a method that adapts at test time "
            "(tpt) or one with nothing to learn (zeroshot)"
        )
    # Full-batch methods (linear probe) solve on cached features instead of SGD epochs.
    full_batch = isinstance(method, FitsFeatures) and not test_time
    if full_batch and not frozen_images:
        raise ValueError(f"{method_name}: fit() on cached features needs frozen_image_tower = True")

    test_tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    # a full-batch fit sees each training image once, un-augmented (CoOp lpclip's feat_extractor.py)
    train_tf = (
        test_tf
        if full_batch
        else train_transform(
            backbone.image_size, backbone.image_mean, backbone.image_std, cfg.train.crop_min_scale
        )
    )
    views_tf = (
        test_time_views(
            backbone.image_size,
            backbone.image_mean,
            backbone.image_std,
            views_per_sample,
            augmix=bool(getattr(method, "augmix", False)),
        )
        if adapts
        else None
    )
    workers = cfg.data.loader_workers
    # test_time trains nothing: no training items to index (ImageNet's are 1.28 million)
    train_src = _Source({t: () if test_time else s.train for t, s in tasks.items()}, train_tf, workers)
    sources: dict[str, _Source] = {}
    eval_items: dict[str, tuple[str, Sequence[vds.Datum]]] = {}  # source key → (task, items)
    for task, splits in tasks.items():
        eval_items[f"test/{task}"] = (task, splits.test)
        if not test_time:
            eval_items[f"val/{task}"] = (task, splits.val)
    if data.novel is not None:
        eval_items["novel_test"] = (next(iter(tasks)), data.novel.test)
    for name, target in data.targets.items():
        eval_items[f"target/{name}"] = (next(iter(tasks)), target.test)
    if not adapts:
        sources = {key: _Source({task: items}, test_tf, workers) for key, (task, items) in eval_items.items()}
    store = FeatureStore(Path(cfg.data.feature_cache)) if cfg.data.feature_cache else None
    identity = {
        "backbone": backbone_identity(cfg.model.name, cfg.model.pretrained, cfg.seed),
        "precision": cfg.model.precision,
        "device": ctx.device.type,
    }
    if frozen_images and not adapts:  # deterministic test transform → cached features are exact
        for src in sources.values():
            src.cache_test_features(backbone, ctx.device, cfg.train.eval_batch_size, store, identity)
        if full_batch:
            train_src.cache_test_features(backbone, ctx.device, cfg.train.eval_batch_size, store, identity)
        elif params and cfg.train.feature_views > 0:
            train_src.cache_views(backbone, cfg.train.feature_views, ctx.device, cfg.train.eval_batch_size)

    if log:
        tracking.log_params(
            uri,
            run_id,
            {
                **flatten(cfg),
                "trainable_params": n_trainable,
                "split_fingerprint": data.fingerprint,
                "world_size": ctx.world_size,
                "device": str(ctx.device),
                "train_transform": repr(train_tf),
                "test_transform": repr(test_tf),
                "test_time_views_transform": repr(views_tf),
                "tasks": ", ".join(tasks),
                "num_tasks": len(tasks),
                "num_classes": sum(len(s.classnames) for s in tasks.values()),
                "num_train_images": len(train_src),
                **tracking.code_version(),
            },
        )
    t_setup = time.perf_counter()

    trained: dict[str, float] = {}
    if full_batch:
        # Every rank holds every cached feature and solves the same deterministic problem;
        # rank 0's solution is broadcast so ranks agree bit for bit even if kernels differ.
        stats = {}
        for task in tasks:
            val = sources[f"val/{task}"]
            assert val.features is not None
            fitted = method.fit(
                FeatureSet(task, *train_src.task_features(task)),
                FeatureSet(task, val.features[0], val.labels),
            )
            prefix = "" if len(tasks) == 1 else f"{task}/"
            stats.update({f"{prefix}{k}": v for k, v in fitted.items()})
        _broadcast_parameters(params, ctx)
        if log:
            tracking.log_metrics(uri, run_id, stats)
        if ctx.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
            print(f"[vlprompt] {method_name} {label} seed {cfg.seed}: fit: {shown}", flush=True)
    elif params and not test_time:
        optimizer = torch.optim.SGD(
            params, lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
        )
        for epoch in range(cfg.train.epochs):
            lr = lr_at(
                epoch,
                lr=cfg.train.lr,
                epochs=cfg.train.epochs,
                warmup_epochs=cfg.train.warmup_epochs,
                warmup_lr=cfg.train.warmup_lr,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            method.train()
            stats = train_epoch(method, train_src, optimizer, cfg, epoch, ctx)
            stats["lr"] = lr
            if log:
                tracking.log_metrics(uri, run_id, stats, step=epoch)
            if ctx.is_main:
                print(
                    f"[vlprompt] {method_name} {label} seed {cfg.seed}: epoch {epoch + 1}/{cfg.train.epochs} "
                    f"loss {stats['train_loss']:.4f} lr {lr:.2e}",
                    flush=True,
                )
            trained["final_train_loss"] = stats["train_loss"]
    t_train = time.perf_counter()

    method.eval()

    def accuracy(model: nn.Module, key: str) -> float:
        if adapts:
            task, items = eval_items[key]
            return evaluate_test_time(model, items, task, views_tf, cfg, ctx)
        return evaluate(model, sources[key], cfg, ctx)

    test = {task: accuracy(method, f"test/{task}") for task in tasks}
    metrics: dict[str, float] = {"test_acc": sum(test.values()) / len(test)}
    if len(tasks) > 1:
        metrics.update({f"task_acc/{task}": acc for task, acc in test.items()})
    if not test_time:
        val = {task: accuracy(method, f"val/{task}") for task in tasks if len(eval_items[f"val/{task}"][1])}
        if val:
            metrics["val_acc"] = sum(val.values()) / len(val)
            if len(tasks) > 1:
                metrics.update({f"task_val_acc/{task}": acc for task, acc in val.items()})
    if data.novel is not None:
        novel_method = transfer(data.novel, "the novel classes")
        base, novel = metrics["test_acc"], accuracy(novel_method, "novel_test")
        metrics.update(
            base_acc=base, novel_acc=novel, hm=0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
        )
    for name, target in data.targets.items():
        target_method = transfer(target, f"dataset {name!r}")
        metrics[f"target_acc/{name}"] = accuracy(target_method, f"target/{name}")
    if data.targets:
        metrics["target_acc_mean"] = sum(metrics[f"target_acc/{n}"] for n in data.targets) / len(data.targets)
    t_end = time.perf_counter()
    metrics.update(
        **trained,
        trainable_params=float(n_trainable),
        bad_images_skipped=float(len(data.skipped_images)),
        **(store.stats() if store is not None else {}),
        time_setup_s=t_setup - t_start,
        time_train_s=t_train - t_setup,
        time_eval_s=t_end - t_train,
        time_worker_s=t_end - t_start,
    )

    learned = {k: v.detach().cpu() for k, v in method.learned_state().items()}
    if log:
        tracking.log_metrics(uri, run_id, metrics, step=cfg.train.epochs)
        _log_learned(uri, run_id, learned, backbone, getattr(method, "token_space_keys", ()))
    if report is not None:
        with tempfile.TemporaryDirectory() as tmp:
            if ctx.is_main:
                torch.save(learned, Path(tmp) / "learned_state.pt")
            report(metrics, tmp if ctx.is_main else None)
    return metrics


def _log_learned(
    uri: str, run_id: str, learned: dict[str, Tensor], backbone: Backbone, token_keys: Sequence[str]
) -> None:
    """The learned tensors (``learned_state.pt``) and, for prompt vectors, their nearest words."""
    if not learned:
        return
    import io

    buf = io.BytesIO()
    torch.save(learned, buf)
    files: dict[str, bytes | str] = {"learned_state.pt": buf.getvalue()}
    lines = []
    for key in token_keys:
        vectors = learned[key].reshape(-1, learned[key].shape[-1]).float()
        for i, nearest in enumerate(backbone.nearest_words(vectors.to(backbone.device), k=3)):
            words = ", ".join(f"{w} ({d:.3f})" for w, d in nearest)
            lines.append(f"{key}[{i}]: {words}")
        lines.append(
            f"{key} as text: "
            + " ".join(n[0][0] for n in backbone.nearest_words(vectors.to(backbone.device), k=1))
        )
    if lines:
        files["learned_prompt_words.txt"] = "\n".join(lines) + "\n"
    tracking.log_artifact_files(uri, run_id, files, "learned")


def train_loop(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    cfg = OmegaConf.create({k: v for k, v in config.items() if not k.startswith("_")})
    threads = max(1, round(cfg.resources.cpus_per_worker))
    torch.set_num_threads(threads)
    if cfg.train.device == "cpu":
        device = torch.device("cpu")
    else:
        device = ray.train.torch.get_device()
        if cfg.train.device == "cuda" and device.type != "cuda":
            raise RuntimeError("train.device=cuda but this worker has no GPU; set resources.use_gpu=true")
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), device)

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    run(cfg, ctx, config.get("_run_id"), report)

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

Distributed training (``num_workers > 1``) is exact rather than approximate: every
rank draws the same seeded permutation, takes its slice of each *global* batch
(``train.batch_size`` is the global batch size), and the gradients of the trainable
parameters are summed across ranks with per-sample weights — the same update a single
worker computes on the whole batch, whatever the worker count. The learnable tensors are
tiny, so an explicit all-reduce replaces DDP (whose hooks only fire through
``forward``, which methods do not use).
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vlprompt import datasets as vds
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, FeatureSet, FitsFeatures, count_trainable, trainable_parameters
from vlprompt.methods.clip import Backbone, load_backbone
from vlprompt.orchestrator import tracking
from vlprompt.orchestrator.config import flatten, method_section


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

    splits: vds.DatasetSplits  # training classes (all, or base for base-to-novel)
    novel: vds.DatasetSplits | None  # novel classes (base-to-novel only)
    fingerprint: str
    targets: dict[str, vds.DatasetSplits]  # cross-dataset / domain-generalisation test sets


def prepare_data(cfg: DictConfig) -> RunData:
    """Read the dataset, sample the few-shot subset, apply the protocol's class split."""
    root = Path(cfg.data.root)

    def load(name: str) -> vds.DatasetSplits:
        if cfg.data.generate_missing and not (root / vds.get_entry(name).folder).exists():
            vds.generate_dataset(name, root, seed=0)
        return vds.load_dataset(name, root)

    entry = vds.get_entry(cfg.data.dataset)
    fewshot = vds.cached_fewshot(load(cfg.data.dataset), cfg.data.shots, cfg.seed, root / entry.folder)
    targets = {name: load(name) for name in cfg.data.eval_targets}
    fingerprint = vds.split_fingerprint(fewshot)
    if cfg.data.protocol == "base_to_novel":
        base = vds.subsample_classes(fewshot, "base")
        novel = vds.subsample_classes(fewshot, "new")
        return RunData(base, novel, fingerprint, targets)
    return RunData(fewshot, None, fingerprint, targets)


class _Source:
    """Batches of one split, either as images or as cached frozen image features."""

    def __init__(self, items: Sequence[vds.Datum], transform: Any, loader_workers: int):
        self.items = items
        self.dataset = vds.ImageDataset(items, transform)
        self.loader_workers = loader_workers
        self.labels = torch.tensor([d.label for d in items], dtype=torch.long)
        self.features: Tensor | None = None  # (views, N, D) when cached

    def __len__(self) -> int:
        return len(self.items)

    def cache_features(self, backbone: Backbone, views: int, device: torch.device, batch: int) -> None:
        """Encode every image ``views`` times (a fresh random transform draw each time)."""
        out = []
        with torch.no_grad():
            for _ in range(views):
                chunks = [
                    backbone.encode_image(images.to(device)).float().cpu()
                    for images, _ in self._loader(
                        [list(range(i, min(i + batch, len(self)))) for i in range(0, len(self), batch)]
                    )
                ]
                out.append(torch.cat(chunks))
        self.features = torch.stack(out)

    def _loader(self, batches: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(
            torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.loader_workers)
        )

    def batches(
        self, task: str, index_batches: list[list[int]], epoch: int | None = None, seed: int = 0
    ) -> Iterator[Batch]:
        """``epoch`` given: each sample takes a seeded random one of its cached views.

        The view is drawn per (epoch, sample), not per batch, so every rank of a
        data-parallel run sees exactly the views a single worker would.
        """
        if self.features is not None:
            views = torch.zeros(len(self), dtype=torch.long)
            if epoch is not None:
                gen = torch.Generator().manual_seed(seed * 7919 + epoch)
                views = torch.randint(len(self.features), (len(self),), generator=gen)
            for idx in index_batches:
                index = torch.tensor(idx, dtype=torch.long)
                yield Batch(task, features=self.features[views[index], index], labels=self.labels[index])
            return
        for images, labels in self._loader(index_batches):
            yield Batch(task, images=images, labels=labels)


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
    task: str,
    optimizer: torch.optim.Optimizer,
    cfg: DictConfig,
    epoch: int,
    ctx: WorkerContext,
) -> dict[str, float]:
    params = trainable_parameters(method)
    n = len(source)
    global_sizes = [
        len(b)
        for b in epoch_batches(n, cfg.train.batch_size, epoch, cfg.seed, WorkerContext(0, 1, ctx.device))
    ]
    mine = epoch_batches(n, cfg.train.batch_size, epoch, cfg.seed, ctx)
    loss_sum = seen = 0.0
    for global_size, batch in zip(global_sizes, source.batches(task, mine, epoch, cfg.seed), strict=True):
        batch = batch.to(ctx.device)
        optimizer.zero_grad(set_to_none=True)
        loss = method.training_loss(batch)
        # weight this rank's mean loss by its share of the global batch → summed grads are exact
        (loss * (len(batch) / global_size)).backward()
        _sync_gradients(params, ctx)
        optimizer.step()
        loss_sum += float(loss.detach()) * len(batch)
        seen += len(batch)
    if seen == 0:
        return {"train_loss": float("nan")}
    stats = torch.tensor([loss_sum, seen], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(stats)
    return {"train_loss": float(stats[0] / stats[1])}


def evaluate(method: nn.Module, source: _Source, task: str, cfg: DictConfig, ctx: WorkerContext) -> float:
    """Top-1 accuracy in percent over the whole split (counts summed across ranks)."""
    correct = total = 0
    for batch in source.batches(task, eval_batches(len(source), cfg.train.eval_batch_size, ctx)):
        batch = batch.to(ctx.device)
        logits = method.predict(batch)
        correct += int((logits.argmax(dim=-1) == batch.labels).sum())
        total += len(batch)
    counts = torch.tensor([correct, total], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(counts)
    if counts[1] == 0:
        raise ValueError(f"task {task!r}: the evaluation split is empty")
    return float(100.0 * counts[0] / counts[1])


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

    data = prepare_data(cfg)
    backbone = load_backbone(
        cfg.model.name, cfg.model.pretrained, device=ctx.device, precision=cfg.model.precision
    )
    method_name, options = method_section(cfg.method)
    task = cfg.data.dataset

    def build(splits: vds.DatasetSplits) -> nn.Module:
        tasks = {task: list(splits.classnames)}
        return build_method(method_name, backbone, tasks, options, templates={task: splits.template}).to(
            ctx.device
        )

    def transfer(splits: vds.DatasetSplits, what: str) -> nn.Module:
        """The trained method's learned state in a method built for other classes/templates."""
        moved = build(splits)
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

    method = build(data.splits)
    params = trainable_parameters(method)
    _broadcast_parameters(params, ctx)
    n_trainable = count_trainable(method)
    frozen_images = bool(getattr(method, "frozen_image_tower", False))
    # Full-batch methods (linear probe) solve on cached features instead of SGD epochs.
    full_batch = isinstance(method, FitsFeatures)
    if full_batch and not frozen_images:
        raise ValueError(f"{method_name}: fit() on cached features needs frozen_image_tower = True")

    test_tf = vds.test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    # a full-batch fit sees each training image once, un-augmented (CoOp lpclip's feat_extractor.py)
    train_tf = (
        test_tf
        if full_batch
        else vds.train_transform(
            backbone.image_size, backbone.image_mean, backbone.image_std, cfg.train.crop_min_scale
        )
    )
    workers = cfg.data.loader_workers
    train_src = _Source(data.splits.train, train_tf, workers)
    sources = {
        "test": _Source(data.splits.test, test_tf, workers),
        "val": _Source(data.splits.val, test_tf, workers),
    }
    if data.novel is not None:
        sources["novel_test"] = _Source(data.novel.test, test_tf, workers)
    for name, target in data.targets.items():
        sources[f"target/{name}"] = _Source(target.test, test_tf, workers)
    if frozen_images:  # deterministic test transform → cached features are exact
        for src in sources.values():
            src.cache_features(backbone, 1, ctx.device, cfg.train.eval_batch_size)
        if full_batch:
            train_src.cache_features(backbone, 1, ctx.device, cfg.train.eval_batch_size)
        elif params and cfg.train.feature_views > 0:
            train_src.cache_features(backbone, cfg.train.feature_views, ctx.device, cfg.train.eval_batch_size)

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
                "num_classes": len(data.splits.classnames),
                "num_train_images": len(train_src),
                **tracking.code_version(),
            },
        )
    t_setup = time.perf_counter()

    if full_batch:
        # Every rank holds every cached feature and solves the same deterministic problem;
        # rank 0's solution is broadcast so ranks agree bit for bit even if kernels differ.
        assert train_src.features is not None and sources["val"].features is not None
        stats = method.fit(
            FeatureSet(task, train_src.features[0], train_src.labels),
            FeatureSet(task, sources["val"].features[0], sources["val"].labels),
        )
        _broadcast_parameters(params, ctx)
        if log:
            tracking.log_metrics(uri, run_id, stats)
        if ctx.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
            print(f"[vlprompt] {method_name} {task} seed {cfg.seed}: fit: {shown}", flush=True)
    elif params:
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
            stats = train_epoch(method, train_src, task, optimizer, cfg, epoch, ctx)
            stats["lr"] = lr
            if log:
                tracking.log_metrics(uri, run_id, stats, step=epoch)
            if ctx.is_main:
                print(
                    f"[vlprompt] {method_name} {task} seed {cfg.seed}: epoch {epoch + 1}/{cfg.train.epochs} "
                    f"loss {stats['train_loss']:.4f} lr {lr:.2e}",
                    flush=True,
                )
    t_train = time.perf_counter()

    method.eval()
    metrics = {"test_acc": evaluate(method, sources["test"], task, cfg, ctx)}
    if len(sources["val"]):
        metrics["val_acc"] = evaluate(method, sources["val"], task, cfg, ctx)
    if data.novel is not None:
        novel_method = transfer(data.novel, "the novel classes")
        base, novel = metrics["test_acc"], evaluate(novel_method, sources["novel_test"], task, cfg, ctx)
        metrics.update(
            base_acc=base, novel_acc=novel, hm=0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
        )
    for name, target in data.targets.items():
        target_method = transfer(target, f"dataset {name!r}")
        metrics[f"target_acc/{name}"] = evaluate(target_method, sources[f"target/{name}"], task, cfg, ctx)
    if data.targets:
        metrics["target_acc_mean"] = sum(metrics[f"target_acc/{n}"] for n in data.targets) / len(data.targets)
    t_end = time.perf_counter()
    metrics.update(
        trainable_params=float(n_trainable),
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

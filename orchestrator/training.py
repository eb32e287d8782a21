"""How a method's parameters are set before evaluation: SGD epochs, or one full-batch fit.

Reference behaviour (Dassl/CoOp ``optim/lr_scheduler.py`` and ``engine/trainer.py``): SGD with
momentum 0.9 and weight decay 5e-4; the learning rate is set once per epoch -- a constant
``warmup_lr`` for the warm-up epochs, then cosine annealing with ``T_max`` = total epochs (so it
never reaches zero); ``drop_last`` when the training set holds at least one batch; the last
epoch's model is evaluated (no selection on test).

Methods declaring ``fits_features`` (the linear probe) replace the SGD epochs by one full-batch
solve on cached features: the train split encoded once with the test transform (as CoOp's
``lpclip/feat_extractor.py`` does) and the val split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from vlprompt.methods.base import EpochHooks, FeatureSet, trainable_parameters
from vlprompt.orchestrator.batching import Source, epoch_batches
from vlprompt.orchestrator.checkpoints import TrainState, restore
from vlprompt.orchestrator.worker import WorkerContext, broadcast_parameters, sum_gradients, summed

#: Called once per epoch with (epoch, {"train_loss", "lr"}): logging and progress lines.
EpochLog = Callable[[int, dict[str, float]], None]
#: Called after each epoch's log with (epoch, optimizer, stats): checkpoints, reports to Tune.
EpochEnd = Callable[[int, torch.optim.Optimizer, dict[str, float]], None]


def lr_at(epoch: int, *, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), per epoch."""
    if epoch < warmup_epochs:
        return warmup_lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def train_epoch(
    method: nn.Module,
    source: Source,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    ctx: WorkerContext,
    withhold_labels: bool = False,
) -> dict[str, float]:
    """One epoch of SGD steps; a step's loss is the sum over its tasks' sub-batches.

    ``withhold_labels``: the method gets ``Batch.labels = None`` (a transductive protocol trains
    on unlabelled images).

    Each sub-batch's mean loss is weighted by its share of the *global* batch, so a step
    minimises (sum of every sample's loss) / batch size whatever the split into tasks and
    ranks -- SoftCPT's "summed loss of all tasks" (Eq. 8) for several tasks, plain CoOp
    for one.
    """
    params = trainable_parameters(method)
    n = len(source)
    everyone = WorkerContext(0, 1, ctx.device)
    global_sizes = [len(b) for b in epoch_batches(n, batch_size, epoch, seed, everyone)]
    mine = epoch_batches(n, batch_size, epoch, seed, ctx)
    loss_sum = seen = 0.0
    for global_size, parts in zip(global_sizes, source.batches(mine, epoch, seed), strict=True):
        optimizer.zero_grad(set_to_none=True)
        total: Tensor | float = 0.0
        for batch in parts:
            batch = batch.to(ctx.device)
            if withhold_labels:
                batch.labels = None
            loss = method.training_loss(batch)
            total = total + loss * (len(batch) / global_size)
            loss_sum += float(loss.detach()) * len(batch)
            seen += len(batch)
        if isinstance(total, Tensor):
            total.backward()
        sum_gradients(params, ctx)
        optimizer.step()
    loss_total, count = summed([loss_sum, seen], ctx).tolist()
    return {"train_loss": float("nan") if count == 0 else loss_total / count}


def train_epochs(
    method: nn.Module,
    source: Source,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    warmup_epochs: int,
    warmup_lr: float,
    seed: int,
    ctx: WorkerContext,
    on_epoch: EpochLog,
    on_epoch_end: EpochEnd | None = None,
    resume: TrainState | None = None,
    withhold_labels: bool = False,
    hooks: EpochHooks | None = None,
) -> dict[str, float]:
    """The SGD epochs; returns the last epoch's mean loss as ``final_train_loss``.

    ``withhold_labels``: see :func:`train_epoch`. ``hooks``: the method, when it declares
    ``epoch_hooks``: told of each epoch's end (1-based) before ``on_epoch`` / ``on_epoch_end``,
    so the epoch's checkpoint holds what the hook changed.

    ``resume``: a checkpoint of this run after ``resume.epoch`` epochs (``orchestrator/
    checkpoints.py``): parameters, optimiser and RNG streams are put back and the remaining
    epochs run as they would have.
    """
    optimizer = torch.optim.SGD(
        trainable_parameters(method), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    stats: dict[str, float] = {}
    first = 0
    if resume is not None:
        restore(resume, method, optimizer)
        first, stats = resume.epoch, dict(resume.stats)
    for epoch in range(first, epochs):
        rate = lr_at(epoch, lr=lr, epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = rate
        method.train()
        stats = train_epoch(
            method,
            source,
            optimizer,
            batch_size=batch_size,
            seed=seed,
            epoch=epoch,
            ctx=ctx,
            withhold_labels=withhold_labels,
        )
        if hooks is not None:
            hooks.epoch_end(epoch + 1, epochs)
        stats["lr"] = rate
        on_epoch(epoch, stats)
        if on_epoch_end is not None:
            on_epoch_end(epoch, optimizer, stats)
    return {"final_train_loss": stats["train_loss"]} if stats else {}


def fit_features(
    method: nn.Module, train: Source, val: Mapping[str, Source], ctx: WorkerContext
) -> dict[str, float]:
    """One full-batch fit per task on cached features (``FitsFeatures``); the fit's own numbers.

    Every rank holds every cached feature and solves the same deterministic problem; rank 0's
    solution is broadcast so ranks agree bit for bit even if kernels differ.
    """
    stats: dict[str, float] = {}
    for task in train.tasks:
        fitted = method.fit(
            FeatureSet(task, *train.task_features(task)), FeatureSet(task, *val[task].task_features(task))
        )
        prefix = "" if len(train.tasks) == 1 else f"{task}/"
        stats.update({f"{prefix}{k}": v for k, v in fitted.items()})
    broadcast_parameters(trainable_parameters(method), ctx)
    return stats

"""Scoring a method on an evaluation set: batched, or one test image at a time with its views.

Predictions never see the labels. Counts are summed over the data-parallel ranks, so every rank
returns the same accuracy. A set that brings its own classes (base-to-novel's novel half, a
transfer target) is scored by :func:`transferred`: the trained method's learned state in a method
built for those classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vlprompt import datasets as vds
from vlprompt.methods.base import Batch
from vlprompt.orchestrator.batching import Source, ViewsDataset, eval_batches
from vlprompt.orchestrator.worker import WorkerContext, summed


def accuracy(correct: int, total: int, ctx: WorkerContext, what: str) -> float:
    """Top-1 accuracy in percent from this rank's counts, summed over the ranks."""
    right, seen = summed([correct, total], ctx).tolist()
    if seen == 0:
        raise ValueError(f"task {what!r}: the evaluation split is empty")
    return float(100.0 * right / seen)


def evaluate(method: nn.Module, source: Source, batch_size: int, ctx: WorkerContext) -> float:
    """Top-1 accuracy in percent over the whole split."""
    correct = total = 0
    for parts in source.batches(eval_batches(len(source), batch_size, ctx)):
        for batch in parts:
            batch = batch.to(ctx.device)
            labels, batch.labels = batch.labels, None  # predictions never see the labels
            logits = method.predict(batch)
            correct += int((logits.argmax(dim=-1) == labels).sum())
            total += len(batch)
    return accuracy(correct, total, ctx, source.tasks[0])


def evaluate_test_time(
    method: nn.Module,
    items: Sequence[vds.Datum],
    task: str,
    transform: Any,
    *,
    seed: int,
    loader_workers: int,
    ctx: WorkerContext,
    images_per_call: int = 1,
) -> float:
    """Accuracy of a method that adapts on each test sample, with its views.

    The method's ``predict`` gets ``images_per_call`` originals (the method's declared
    ``TestTimeViews.images_per_step``) and their augmented views, never the labels; it adapts
    each on its own, predicts and resets itself (``methods/base.py``). Progress is printed about
    every tenth of the split, since this is the slow part of a test-time run.
    """
    dataset = ViewsDataset(items, transform, seed)
    own = list(range(ctx.rank, len(dataset), ctx.world_size))
    mine = [own[i : i + images_per_call] for i in range(0, len(own), images_per_call)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=loader_workers)
    correct = total = 0
    every = max(1, len(mine) // 10)
    t0 = time.perf_counter()
    for step, (original, views, label) in enumerate(loader, start=1):
        batch = Batch(task, images=original, views=views).to(ctx.device)
        logits = method.predict(batch)
        correct += int((logits.argmax(dim=-1).cpu() == label).sum())
        total += len(label)
        if ctx.is_main and (step % every == 0 or step == len(mine)):
            rate = total / max(time.perf_counter() - t0, 1e-9)
            print(
                f"[vlprompt] test-time {task}: {total}/{len(own)} samples on this worker, "
                f"accuracy so far {100.0 * correct / total:.1f}% ({rate:.2f} samples/s)",
                flush=True,
            )
    return accuracy(correct, total, ctx, task)


def transferred(
    method: nn.Module,
    build: Callable[[Mapping[str, vds.DatasetSplits]], nn.Module],
    task: str,
    splits: vds.DatasetSplits,
    what: str,
    method_name: str,
) -> nn.Module:
    """The trained ``method``'s learned state in a method ``build`` makes for ``splits``' classes."""
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

"""The loop's reference schedule and its exact data-parallel batching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vlprompt.orchestrator.batching import epoch_batches, eval_batches
from vlprompt.orchestrator.training import lr_at
from vlprompt.orchestrator.worker import WorkerContext


def test_lr_schedule_matches_dassl_constant_warmup_then_cosine():
    E, lr = 10, 0.002
    lrs = [lr_at(e, lr=lr, epochs=E, warmup_epochs=1, warmup_lr=1e-5) for e in range(E)]
    assert lrs[0] == 1e-5
    assert lrs[1] == pytest.approx(lr)  # cosine restarts at the base LR after warm-up
    assert lrs[-1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (E - 2) / E)))  # never 0
    assert all(a > b for a, b in itertools.pairwise(lrs[1:]))


@pytest.mark.parametrize(
    ("n", "batch", "world"), [(37, 8, 1), (37, 8, 2), (37, 8, 3), (5, 8, 2), (64, 16, 4)]
)
def test_ranks_partition_each_global_batch_exactly(n, batch, world):
    single = epoch_batches(n, batch, epoch=3, seed=1, ctx=WorkerContext(0, 1, torch.device("cpu")))
    shards = [
        epoch_batches(n, batch, epoch=3, seed=1, ctx=WorkerContext(r, world, torch.device("cpu")))
        for r in range(world)
    ]
    assert all(len(s) == len(single) for s in shards)
    for b, whole in enumerate(single):
        pieces = sorted(i for s in shards for i in s[b])
        assert pieces == sorted(whole)
    # reference drop_last: full batches only once the set holds at least one batch
    expected = (n // batch) * batch if n >= batch else n
    assert sum(len(b) for b in single) == expected


def test_shuffle_is_seeded_and_changes_per_epoch():
    ctx = WorkerContext(0, 1, torch.device("cpu"))
    a = epoch_batches(40, 8, epoch=0, seed=1, ctx=ctx)
    assert a == epoch_batches(40, 8, epoch=0, seed=1, ctx=ctx)
    assert a != epoch_batches(40, 8, epoch=1, seed=1, ctx=ctx)
    assert a != epoch_batches(40, 8, epoch=0, seed=2, ctx=ctx)


def test_evaluation_shards_cover_every_sample_once():
    shards = [eval_batches(23, 5, WorkerContext(r, 3, torch.device("cpu"))) for r in range(3)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(23))

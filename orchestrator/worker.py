"""Who this Ray Train worker is among its peers, and the few collectives the loop needs.

Distributed training (``num_workers > 1``) is exact rather than approximate: every rank draws the
same seeded permutation, takes its slice of each *global* batch (``train.batch_size`` is the
global batch size), and the gradients of the trainable parameters are summed across ranks with
per-sample weights -- the update a single worker computes on the whole batch, whatever the worker
count. The learnable tensors are tiny, so an explicit all-reduce replaces DDP (whose hooks only
fire through ``forward``, which methods do not use).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sum_gradients(params: Sequence[nn.Parameter], ctx: WorkerContext) -> None:
    """Sum every parameter's gradient over the ranks (each rank's loss is pre-weighted)."""
    if ctx.world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def broadcast_parameters(params: Sequence[nn.Parameter], ctx: WorkerContext) -> None:
    """Rank 0's values on every rank (after initialisation, after a full-batch fit)."""
    if ctx.world_size > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def summed(values: Sequence[float], ctx: WorkerContext) -> torch.Tensor:
    """``values`` summed over the ranks, as float64."""
    totals = torch.tensor(values, dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(totals)
    return totals


def broadcast_flag(flag: bool, ctx: WorkerContext) -> bool:
    """Rank 0's ``flag`` on every rank (a decision taken by one clock, for all)."""
    if ctx.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=ctx.device)
    dist.broadcast(value, src=0)
    return bool(value.item())

"""Activation memory a training step keeps for its backward pass, measured without timing.

Peak allocator readings (``torch.cuda.max_memory_allocated``) exist only on CUDA and include
the allocator's rounding; on CPU there is no such reading at all. What the budget of issue 9 is
about -- the activations autograd keeps between a forward and its backward -- is visible on any
device through ``torch.autograd.graph.saved_tensors_hooks``: every tensor an autograd node saves
passes through the pack hook. :func:`saved_bytes` adds up the distinct storages seen there, so
the number is deterministic for a given model and input (same ops, same shapes).

Under ``torch.utils.checkpoint`` (non-reentrant) the checkpointed region's own saved tensors are
taken by checkpoint's inner hook and never reach ours; its *inputs*, which it does keep, do. So
for a checkpointed forward :func:`saved_bytes` is what is held *between* forward and backward;
during backward one region at a time is re-computed on top of that, which
:func:`checkpointed_peak` adds (the largest region's own saved bytes, measured unchecked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def _storage_key(t: Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def saved_bytes(step: Callable[[], object], frozen: Iterable[nn.Module] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step()`` runs.

    A storage saved by several nodes (or as several views) is counted once: it is held once.
    The parameters and buffers of the ``frozen`` modules are left out -- they are in memory
    whatever autograd does, and are weights, not activations. ``step`` runs with gradients on
    and nothing is back-propagated (the graph is dropped on return).
    """
    excluded = {_storage_key(t) for module in frozen for t in [*module.parameters(), *module.buffers()]}
    held: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in excluded and key[1] != 0:
            held[key] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(held.values())


def checkpointed_peak(
    held: int, regions: Iterable[Callable[[], object]], frozen: Iterable[nn.Module] = ()
) -> int:
    """Saved bytes at the worst moment of a checkpointed step's backward pass.

    ``held``: :func:`saved_bytes` of the checkpointed forward (kept until backward ends, at the
    latest). ``regions``: each checkpointed region run *without* checkpointing (its own saved
    bytes are what its re-computation brings back). Autograd finishes one region's backward
    before it re-computes the next (the regions are independent and run in reverse creation
    order), and non-reentrant checkpoint frees a re-computed tensor once it is used, so at most
    one region is live at a time: ``held + max(region)``.
    """
    frozen = list(frozen)
    return held + max((saved_bytes(region, frozen) for region in regions), default=0)

"""What every test-time method shares: confidence selection, the average-entropy objective, and
adapting many test images at once.

TPT (and the methods built like it) tune a reset state on each test image alone. Those adaptations
are independent, so G of them can run as one: the reset state is stacked into G copies along a new
leading axis, every image's views go through one forward pass, and the loss is the *sum* of the G
per-image losses. Each copy's gradient is then exactly its own image's gradient (no term of the sum
depends on another copy), and AdamW is element-wise -- moments, bias correction, weight decay and
the update of an element read only that element -- so one step on the stacked tensor equals G
separate steps from fresh optimisers (tested to 1e-5 against the per-image loop). It would *not*
hold with anything that couples elements across copies: a global-norm gradient clip, an optimiser
state shared between images, or a loss averaged rather than summed over copies (that scales each
copy's gradient by 1/G, which Adam's normalisation hides only up to ``eps``).

Selection and entropy follow ``azshue/TPT tpt_classification.py`` (``select_confident_samples``,
``avg_entropy``): the ``int(N · ρ)`` lowest-entropy images, chosen once at the first step; the
entropy of their mean softmax, computed in log space. Ties go to the earlier image (stable sort).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlprompt.methods.options import n_selected


def _entropy(logits: Tensor) -> Tensor:
    logits = logits.float()
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


def select_confident(logits: Tensor, selection_p: float) -> Tensor:
    """Indices of the ``int(N · ρ)`` rows of ``logits`` ``(N, C)`` whose softmax has the lowest
    entropy, most confident first (``select_confident_samples``)."""
    return select_confident_stacked(logits.unsqueeze(0), selection_p)[0]


def select_confident_stacked(logits: Tensor, selection_p: float) -> Tensor:
    """:func:`select_confident` of each image's ``(N, C)`` block of ``logits`` ``(G, N, C)``: ``(G, k)``."""
    k = n_selected(logits.shape[1], selection_p)
    if k < 1:
        raise ValueError(f"tpt: selection_p={selection_p} keeps no image out of {logits.shape[1]}")
    return torch.argsort(_entropy(logits), dim=-1, stable=True)[:, :k]


def average_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax of the rows of ``logits`` ``(N, C)`` (``avg_entropy``), computed
    in log space: ``log p̃ = logsumexp_n(log p_n) − log N``, clamped so ``0 · log 0`` stays 0."""
    return average_entropy_stacked(logits.unsqueeze(0))[0]


def average_entropy_stacked(logits: Tensor) -> Tensor:
    """:func:`average_entropy` of each image's rows of ``logits`` ``(G, N, C)``: ``(G,)`` (any
    leading axes: ``(N, C)`` gives the one image's entropy, ``()``)."""
    log_p = logits.float().log_softmax(dim=-1)
    log_mean = torch.logsumexp(log_p, dim=-2) - math.log(log_p.shape[-2])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum(dim=-1)


def pick(logits: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``(G, k)`` of each image's logits ``(G, N, C)``: ``(G, k, C)``."""
    return torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def take(images: Tensor, index: Tensor) -> Tensor:
    """Images ``index`` of one image's ``(N, ...)`` (``index`` ``(k,)``), or of each of G images'
    ``(G, N, ...)`` (``index`` ``(G, k)``): ``(k, ...)`` / ``(G, k, ...)``."""
    if index.dim() == 1:
        return images[index]
    return images[torch.arange(index.shape[0], device=index.device)[:, None], index]


def stacked_copies(start: Tensor, copies: int) -> Tensor:
    """``copies`` independent copies of ``start`` along a new leading axis, a leaf that needs grad."""
    return start.detach().unsqueeze(0).repeat(copies, *([1] * start.dim())).requires_grad_(True)

"""Fixtures for the methods tests: the tiny open_clip backbone (``vlp-tiny``), built once per module,
and a random-init ViT-B/16 for exact parameter counts, built once per session."""

from __future__ import annotations

import math

import pytest
import torch

from vlprompt.methods.clip import Backbone, load_backbone

TINY = "vlp-tiny"


def tiny_backbone(seed: int = 0) -> Backbone:
    """Random-init ``vlp-tiny`` with every weight perturbed, so no layer is an identity.

    open_clip initialises LayerNorm to (1, 0) and biases to 0; noise on everything makes
    positions, norms and biases all matter. The logit scale is set to CLIP's trained 100.
    """
    torch.manual_seed(seed)
    backbone = load_backbone(TINY)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in backbone.model.named_parameters():
            if name == "logit_scale":
                param.fill_(math.log(100.0))
            else:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return backbone


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return tiny_backbone()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Six random images at the tiny model's resolution."""
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def vit_b16() -> Backbone:
    """open_clip's built-in ``ViT-B-16``, random init (nothing downloaded): the real shapes, for counting.

    One for the whole session: it is the slow build, and counting never changes a frozen backbone.
    """
    return load_backbone("ViT-B-16", None)

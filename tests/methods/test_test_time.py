"""The shared test-time maths (``methods/test_time.py``): stacked selection and entropy equal
their one-image forms and the definitions. TPT adapting many images at once: ``test_tpt.py``."""

from __future__ import annotations

import pytest
import torch

from vlprompt.methods.test_time import (
    average_entropy,
    average_entropy_stacked,
    select_confident,
    select_confident_stacked,
)


def test_stacked_selection_and_entropy_equal_each_image_alone() -> None:
    logits = torch.randn(4, 9, 5, generator=torch.Generator().manual_seed(0)) * 3
    logits[1, 3] = logits[1, 5]  # a tie: the earlier row goes first, as alone
    chosen = select_confident_stacked(logits, 0.34)
    for g in range(4):
        assert torch.equal(chosen[g], select_confident(logits[g], 0.34))
        # the definition: entropy of the mean softmax
        p = logits[g].softmax(-1).mean(0)
        assert float(average_entropy(logits[g])) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
    expected = torch.stack([average_entropy(logits[g]) for g in range(4)])
    torch.testing.assert_close(average_entropy_stacked(logits), expected, rtol=0, atol=1e-6)

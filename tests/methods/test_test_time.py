"""Many test images adapted at once (``methods/test_time.py``): the stacked path equals the
per-image loop, and the shared selection/entropy maths equal their definitions."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.test_time import (
    average_entropy,
    average_entropy_stacked,
    select_confident,
    select_confident_stacked,
)
from vlprompt.methods.tpt import TPT

CLASSES = ["golden_retriever", "airplane", "sea lion", "annual crop land", "x"]
V = 7


def tpt(backbone: Backbone, **options: object) -> TPT:
    method = build_method("tpt", backbone, {"pets": CLASSES}, {"n_views": V, "selection_p": 0.25, **options})
    assert isinstance(method, TPT)
    return method


@pytest.fixture(scope="module")
def views() -> Tensor:
    return torch.randn(6, V, 3, 32, 32, generator=torch.Generator().manual_seed(2))


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


def test_stacked_text_features_equal_one_context_at_a_time(tiny: Backbone) -> None:
    method = tpt(tiny)
    prompts = method.coop.prompts
    ctx = torch.randn(3, *method.ctx.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    with torch.no_grad():
        stacked = prompts.text_features_stacked(ctx, "pets")
        for g in range(3):
            torch.testing.assert_close(
                stacked[g], prompts.text_features(ctx[g], "pets"), rtol=1e-5, atol=1e-5
            )


def _features(backbone: Backbone, images: Tensor, views: Tensor) -> Tensor:
    with torch.no_grad():
        seen = backbone.encode_image(views.flatten(0, 1)).view(len(images), V, -1)
        return torch.cat([backbone.encode_image(images)[:, None], seen], 1)


def _gradient(method: TPT, features: Tensor) -> Tensor:
    """One image's gradient of TPT's loss at the current context."""
    ctx = method.ctx
    logits = method.logits("pets", features)
    loss = average_entropy(logits[select_confident(logits.detach(), method.selection_p)])
    return torch.autograd.grad(loss, ctx)[0]


def test_one_stacked_step_gets_each_image_its_own_gradient(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = tpt(tiny)
    feats = _features(tiny, images, views)
    ctx = method.ctx.detach().unsqueeze(0).repeat(6, 1, 1).requires_grad_(True)
    logits = method.stacked_logits("pets", ctx, feats)
    loss = average_entropy_stacked(
        torch.stack([logits[b][select_confident(logits[b].detach(), 0.25)] for b in range(6)])
    )
    (stacked,) = torch.autograd.grad(loss.sum(), ctx)
    for b in range(6):
        torch.testing.assert_close(stacked[b], _gradient(method, feats[b]), rtol=1e-4, atol=1e-5)  # |g| ~ 5


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2])
def test_images_adapted_together_equal_the_per_image_loop(
    tiny: Backbone, images: Tensor, views: Tensor, steps: int
) -> None:
    batch = Batch("pets", images=images, views=views)
    alone = tpt(tiny, steps=steps, lr=0.05)
    together = tpt(tiny, steps=steps, lr=0.05, images_per_step=4)  # 6 images: chunks of 4 and 2
    with torch.no_grad():
        together.ctx.copy_(alone.ctx)
    start = together.ctx.detach().clone()
    expected, got = alone.predict(batch), together.predict(batch)
    assert torch.equal(together.ctx, start)  # the reset state is untouched
    assert not torch.allclose(expected, tpt(tiny, steps=0).predict(batch), atol=1e-3)  # it tuned
    # Adam's first step is lr * g / (|g| + eps), a sign: a gradient element within float noise of
    # zero may flip between two summation orders; images with one are left out
    feats = _features(tiny, images, views)
    gradients = [_gradient(alone, feats[b]) for b in range(6)]
    robust = [b for b, g in enumerate(gradients) if g.abs().min() > 1e-5 * g.abs().max()]
    assert len(robust) >= 4
    # logits are 100 x cosine: 1e-4 here is 1e-6 in cosine
    torch.testing.assert_close(got[robust], expected[robust], rtol=1e-5, atol=1e-4)


def test_an_image_adapted_with_others_does_not_depend_on_them(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = tpt(tiny, lr=0.05, images_per_step=3)
    full = method.predict(Batch("pets", images=images[:3], views=views[:3]))
    other = views.clone()
    other[0] = torch.randn_like(other[0])  # change image 0's views only
    swapped = method.predict(Batch("pets", images=images[:3], views=other[:3]))
    torch.testing.assert_close(swapped[1:], full[1:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(swapped[0], full[0])

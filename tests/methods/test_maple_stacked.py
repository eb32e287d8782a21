"""MaPLe's forward under G stacked prompt copies equals MaPLe's own forward with each copy loaded:
text features (several copies per text-tower chunk, and a copy alone when its classes fill one),
image features and block inputs, and the gradients that reach each copy."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import cosine_logits, observed_image_features
from vlprompt.methods.maple import MaPLe
from vlprompt.methods.maple_stacked import StackedMaPLe

from .conftest import tiny_backbone

CLASSES = ["cat", "dog", "car", "tree", "x"]
G = 3


def maple(backbone: Backbone) -> MaPLe:
    torch.manual_seed(0)
    method = build_method("maple", backbone, {"pets": CLASSES}, {"prompt_depth": 3})
    assert isinstance(method, MaPLe)
    return method


def different_copies(prompt: MaPLe) -> list[dict[str, Tensor]]:
    """G start states: MaPLe's own, moved by noise (so every copy's prompts differ)."""
    gen = torch.Generator().manual_seed(3)
    named = dict(prompt.named_parameters())
    return [
        {k: v.detach() + 0.1 * g * torch.randn(v.shape, generator=gen) for k, v in named.items()}
        for g in range(G)
    ]


def stacked_from(prompt: MaPLe, states: list[dict[str, Tensor]]) -> StackedMaPLe:
    copies = StackedMaPLe(prompt, states[0], G)
    with torch.no_grad():
        for name, leaf in copies.state.items():
            leaf.copy_(torch.stack([s[name] for s in states]))
    return copies


@pytest.mark.parametrize("chunk", [1000, 10, 4], ids=["copies-share-a-chunk", "two-per-chunk", "alone"])
def test_each_copy_is_maples_forward_with_it_loaded(chunk: int, images: Tensor) -> None:
    backbone = tiny_backbone()
    backbone.text_chunk_size = chunk  # 4 < 5 classes: each copy encoded alone, in two chunks
    prompt = maple(backbone)
    states = different_copies(prompt)
    copies = stacked_from(prompt, states)
    per_copy = images[:4].unsqueeze(0).expand(G, -1, -1, -1, -1)
    with torch.no_grad():
        text = copies.text_features("pets")
        features, tokens = copies.observe(per_copy, [0, 1])
        assert torch.equal(copies.image_features(per_copy), features)  # observing only looks
    for g, state in enumerate(states):
        prompt.load_state_dict(state, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(text[g], prompt.text_features("pets"), rtol=1e-5, atol=1e-5)
            own, own_tokens = _observed(prompt, images[:4], [0, 1])
        torch.testing.assert_close(features[g], own, rtol=1e-5, atol=1e-5)
        for b in (0, 1):
            torch.testing.assert_close(tokens[b][g], own_tokens[b], rtol=1e-5, atol=1e-5)
    assert (text[1] - text[0]).abs().max() > 1e-3  # the copies really differ


def _observed(prompt: MaPLe, images: Tensor, blocks: list[int]) -> tuple[Tensor, dict[int, Tensor]]:
    return observed_image_features(prompt.backbone, prompt.vision_prompts(), images, blocks)


@pytest.mark.parametrize("chunk", [1000, 4])
def test_each_copy_gets_its_own_images_gradient(chunk: int, images: Tensor) -> None:
    backbone = tiny_backbone()
    backbone.text_chunk_size = chunk
    prompt = maple(backbone)
    states = different_copies(prompt)
    copies = stacked_from(prompt, states)
    scale = backbone.logit_scale
    per_copy = torch.stack([images[2 * g : 2 * g + 2] for g in range(G)])  # copy g: images 2g, 2g+1
    logits = cosine_logits(copies.image_features(per_copy), copies.text_features("pets"), scale)
    grads = torch.autograd.grad(logits.logsumexp(-1).sum(), copies.leaves())
    names = [n for n, _ in prompt.named_parameters()]
    for g, state in enumerate(states):
        prompt.load_state_dict(state, strict=False)
        own = prompt.logits(Batch("pets", images=images[2 * g : 2 * g + 2]))
        expected = torch.autograd.grad(own.logsumexp(-1).sum(), list(prompt.parameters()))
        for name, got, want in zip(names, grads, expected, strict=True):
            torch.testing.assert_close(got[g], want, rtol=1e-4, atol=1e-5, msg=name)


def test_a_start_state_of_another_shape_is_refused(tiny: Backbone) -> None:
    prompt = maple(tiny)
    state = dict(prompt.named_parameters())
    state.pop("ctx")
    with pytest.raises(ValueError, match="ctx"):
        StackedMaPLe(prompt, state, 2)
    copies = StackedMaPLe(prompt, dict(prompt.named_parameters()), 2)
    with pytest.raises(ValueError, match=r"G=2"):
        copies.image_features(torch.zeros(3, 1, 3, 32, 32))

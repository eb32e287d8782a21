"""The method matrix: what every registered method owes, checked on each, one table row per method.

``CASES`` has one row per entry of ``vlprompt.methods.METHODS`` (a test asserts it), peft's
``TEST_CASES`` style: the options that build the method offline on the tiny backbone and its exact
trainable-parameter count on ViT-B/16. Every test below runs on every row and reads what to expect
from the method's declared capabilities, never from its name -- so a new method joins the matrix by
adding its row. Method-specific behaviour (reference equivalences, edge cases, error messages) is
tested in the method's own file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from vlprompt.methods import METHODS, build_method, capabilities, method_config, methods_with
from vlprompt.methods.base import (
    Batch,
    EpochHooks,
    FeatureSet,
    FitsFeatures,
    Method,
    TextClassifier,
    count_trainable,
)
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import cosine_logits

TASKS = {"t": ["cat", "dog", "car", "tree"]}
TEMPLATES = {"t": "a photo of a {}."}
VIT_B16_TASKS = {"pets": ["abyssinian", "beagle"]}


@dataclass(frozen=True)
class Case:
    """One row of the matrix."""

    options: dict[str, Any]
    """Builds the method offline on the tiny backbone (templates are passed as the loop passes them)."""
    vit_b16: int
    """Exact trainable parameters on a random-init ViT-B/16 for ``VIT_B16_TASKS`` (two classes),
    counted by the upstream code's shapes."""
    vit_b16_options: dict[str, Any] = field(default_factory=dict)
    """Options replaced for the ViT-B/16 count (PromptKD's teacher must match the student's images)."""
    lr: float = 1e-3
    """Plain SGD learning rate for the loss check, for methods that learn by SGD."""
    image_features: Callable[[nn.Module, Tensor], Tensor] | None = None
    """A text classifier whose image tower is prompted: its image embedding of ``images``."""


# PromptKD's teacher: the bundled small CLIP (the default ViT-L-14 "openai" would be a download)
TEACHER = {"teacher_model": "vlp-small", "teacher_pretrained": "bundled"}
# a random-init ViT-L-14 teacher: the reference teacher's shapes (its 768-wide embedding sets the projector)
VIT_L14_TEACHER = {"teacher_model": "ViT-L-14", "teacher_pretrained": None}

CASES: dict[str, Case] = {
    "zeroshot": Case({}, 0),
    "linear_probe": Case({}, 2 * (512 + 1)),  # one 512-wide row and a bias per class
    "coop": Case({}, 8_192),  # 16 x 512 (CoOp vit_b16.yaml: N_CTX 16)
    "cocoop": Case({}, 35_360),  # ctx 4 x 512 + Meta-Net 512 -> 32 -> 512
    "kgcoop": Case({}, 2_048),  # "a photo of a": 4 x 512
    "ivlp": Case({}, 30_720, image_features=lambda m, x: m.image_features(x)),  # 2+2 tokens, depth 12
    "maple": Case({}, 3_555_072, image_features=lambda m, x: m.image_features(x)),  # n_ctx 2, depth 9
    # IVLP 4+4 tokens, depth 9/9: 9 x 4 x 512 + 9 x 4 x 768
    "promptsrc": Case({}, 46_080, image_features=lambda m, x: m.ivlp.image_features(x)),
    "bias_tuning": Case(  # matched to IVLP 2+2 depth 12: one bias per prompt vector
        {"match": "ivlp"}, 30_720, image_features=lambda m, x: m.image_features(Batch("t", images=x))
    ),
    "softcpt": Case({}, 4_196_352),  # proj 512 x (16 x 512) + task context 4 x 512
    # vision prompts 9 x 4 x 768 + projector Conv1x1(512->768), BN(768), Conv1x1(768->768)
    "promptkd": Case(TEACHER, 1_013_760, vit_b16_options=VIT_L14_TEACHER, lr=1e-5),  # loss x kd_weight 1000
    "tpt": Case({"n_views": 7, "selection_p": 0.25}, 2_048),  # "a photo of a": 4 x 512
    # MaPLe n_ctx 2, depth 3: ctx 2 x 512 + proj 512 x 768 + 768, twice more for the deep layers;
    # beta 0 here (no statistics file): the alignment is tested in test_promptalign.py
    "promptalign": Case({"n_views": 7, "selection_p": 0.25, "align_weight": 0.0}, 1_185_024),
    # beta = gamma = 0 here (no statistics file): the terms are tested in test_promptsync.py
    "promptsync": Case(
        {"n_views": 7, "selection_p": 0.25, "align_weight": 0.0, "discrimination_weight": 0.0}, 1_185_024
    ),
}

NAMES = sorted(CASES)


def build(name: str, backbone: Backbone, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_method(name, backbone, TASKS, CASES[name].options, templates=TEMPLATES)


def logits(method: nn.Module, batch: Batch) -> Tensor:
    method.eval()
    return method.predict(batch)


def views(name: str, images: Tensor) -> Tensor:
    """Random views ``(B, V, C, H, W)`` of ``images``: as many as a ``test_time_views`` method asks for."""
    wanted = capabilities(name).test_time_views
    n_views = wanted(method_config(name, CASES[name].options)).n_views if wanted else 2
    return torch.randn(len(images), n_views, *images.shape[1:], generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def batch(images: Tensor) -> Batch:
    """Four images, one per class of ``TASKS``."""
    return Batch("t", images=images[:4], labels=torch.arange(4))


def test_the_matrix_covers_every_registered_method() -> None:
    assert set(CASES) == set(METHODS)


@pytest.mark.parametrize("name", NAMES)
def test_builds_as_a_method_holding_only_what_it_learns(tiny: Backbone, name: str) -> None:
    method = build(name, tiny)
    caps = capabilities(name)
    assert isinstance(method, Method)
    assert not any(p is q for p in method.parameters() for q in tiny.parameters())  # backbone held, not owned
    state = method.learned_state()
    assert set(state) <= set(method.state_dict())
    for key in caps.token_space_keys:
        assert state[key].shape[-1] == tiny.text_width, key
    learns_something = caps.learns or caps.test_time_views is not None
    assert (count_trainable(method) > 0) is learns_something


@pytest.mark.parametrize("name", NAMES)
def test_trainable_parameters_on_vit_b16(vit_b16: Backbone, name: str) -> None:
    case = CASES[name]
    options = {**case.options, **case.vit_b16_options}
    method = build_method(
        name, vit_b16, VIT_B16_TASKS, options, templates=dict.fromkeys(VIT_B16_TASKS, "{}.")
    )
    assert count_trainable(method) == case.vit_b16


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_logits(tiny: Backbone, batch: Batch, name: str) -> None:
    assert torch.equal(logits(build(name, tiny), batch), logits(build(name, tiny), batch))


def learn(name: str, method: nn.Module, batch: Batch, backbone: Backbone) -> tuple[float, float] | None:
    """What the method learns, as the loop has it learn: the training loss before and after.

    A ``fits_features`` method is fitted on the batch's cached features; a method that ``learns``
    takes five plain SGD steps on the batch; a ``test_time_views`` method adapts inside ``predict``
    (no loss to compare); any other method only predicts.
    """
    caps = capabilities(name)
    if caps.fits_features:
        assert isinstance(method, FitsFeatures) and batch.images is not None and batch.labels is not None
        with torch.no_grad():
            features = backbone.encode_image(batch.images)
        cached, split = (
            Batch(batch.task, features=features, labels=batch.labels),
            FeatureSet(batch.task, features, batch.labels),
        )
        before = method.training_loss(cached).item()
        method.fit(split, split)
        return before, method.training_loss(cached).item()
    if caps.learns:
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=CASES[name].lr)
        method.train()
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = method.training_loss(batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            return losses[0], method.training_loss(batch).item()
    method.predict(Batch(batch.task, images=batch.images, views=views(name, batch.images)))
    return None


@pytest.mark.parametrize("name", NAMES)
def test_learning_lowers_the_loss_and_leaves_the_backbone_alone(
    tiny: Backbone, batch: Batch, name: str
) -> None:
    method = build(name, tiny)
    before = copy.deepcopy(tiny.state_dict())
    losses = learn(name, method, batch, tiny)
    if losses is not None:
        assert losses[1] < losses[0], losses
    after = tiny.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in tiny.parameters())
    assert not tiny.training


@pytest.mark.parametrize("name", NAMES)
def test_learned_state_round_trips_into_a_fresh_build(tiny: Backbone, images: Tensor, name: str) -> None:
    trained = build(name, tiny, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a state no fresh build starts from (zero-init heads and biases too)
        for tensor in trained.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=gen).to(tensor.device))
    fresh = build(name, tiny, seed=1)
    fresh.load_state_dict(trained.learned_state())
    batch = Batch("t", images=images)
    assert torch.equal(logits(fresh, batch), logits(trained, batch))


@pytest.mark.parametrize("name", NAMES)
def test_cached_features_are_taken_exactly_where_declared(tiny: Backbone, images: Tensor, name: str) -> None:
    method = build(name, tiny)
    with torch.no_grad():
        features = tiny.encode_image(images)
    if capabilities(name).frozen_image_tower:
        from_features = logits(method, Batch("t", features=features))
        torch.testing.assert_close(
            from_features, logits(method, Batch("t", images=images)), rtol=0, atol=1e-5
        )
    else:
        with pytest.raises(ValueError, match="cached image features cannot be used"):
            logits(method, Batch("t", features=features))


@pytest.mark.parametrize("name", methods_with("text_classifier"))
def test_a_text_classifier_predicts_with_its_text_features(tiny: Backbone, images: Tensor, name: str) -> None:
    method = build(name, tiny)
    assert isinstance(method, TextClassifier)
    method.eval()
    with torch.no_grad():
        text = method.text_features("t")
        image_features = CASES[name].image_features
        image = image_features(method, images) if image_features else tiny.encode_image(images)
    assert text.shape == (len(TASKS["t"]), tiny.embed_dim)
    expected = cosine_logits(image, text, tiny.logit_scale)
    torch.testing.assert_close(logits(method, Batch("t", images=images)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fits_features_exactly_when_declared(tiny: Backbone, name: str) -> None:
    assert isinstance(build(name, tiny), FitsFeatures) is capabilities(name).fits_features


@pytest.mark.parametrize("name", NAMES)
def test_epoch_hooks_exactly_when_declared(tiny: Backbone, name: str) -> None:
    assert isinstance(build(name, tiny), EpochHooks) is capabilities(name).epoch_hooks


@pytest.mark.parametrize("name", NAMES)
def test_test_time_views_adapt_and_restore_or_are_ignored(tiny: Backbone, images: Tensor, name: str) -> None:
    method = build(name, tiny)
    state = method.learned_state()
    plain = logits(method, Batch("t", images=images[:2]))
    adapted = logits(method, Batch("t", images=images[:2], views=views(name, images[:2])))
    after = method.learned_state()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    if capabilities(name).test_time_views:
        assert float((adapted - plain).abs().max()) > 1e-4  # each sample tuned on its views ...
        torch.testing.assert_close(logits(method, Batch("t", images=images[:2])), plain, rtol=0, atol=0)
    else:
        assert torch.equal(adapted, plain)

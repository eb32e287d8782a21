"""PromptSRC: each self-consistency term against a hand computation on the tiny backbone, the
total, the frozen targets, Gaussian prompt aggregation, and the refusal of weights that miss
every epoch.

The prompted features come from an *independently built* IVLP with the same options and seed
(the same random draws), so the tests also check that PromptSRC's prompts are IVLP's.
"""

from __future__ import annotations

import math

import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor

from vlprompt.methods import build_method, method_config
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.ivlp import IVLP
from vlprompt.methods.options import gpa_weights
from vlprompt.methods.promptsrc import IMAGENET60, PromptSRC

TASKS = {"t": ["cat", "dog", "sea lion", "x"]}
TEMPLATES = ["a photo of a {}.", "a sketch of the {}.", "{} in the wild."]
IVLP_OPTIONS = {"n_ctx_text": 4, "n_ctx_vision": 4, "depth_text": 9, "depth_vision": 9}


def nudged(method: torch.nn.Module) -> torch.nn.Module:
    """Prompts moved away from their init by seeded noise (the same for both twins), so that the
    prompted model is far enough from the frozen one for every term to matter."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return method


def build(tiny: Backbone, **options: object) -> PromptSRC:
    torch.manual_seed(0)
    method = build_method("promptsrc", tiny, TASKS, {"text_templates": TEMPLATES, **options})
    assert isinstance(method, PromptSRC)
    return method


def twin_ivlp(tiny: Backbone, **options: object) -> IVLP:
    """An IVLP built from the same seed with PromptSRC's prompt options: the same prompts."""
    torch.manual_seed(0)
    method = build_method("ivlp", tiny, TASKS, {**IVLP_OPTIONS, **options})
    assert isinstance(method, IVLP)
    return method


@pytest.fixture(scope="module")
def batch(images: Tensor) -> Batch:
    return Batch("t", images=images, labels=torch.tensor([0, 1, 2, 3, 1, 0]))


def hand_targets(tiny: Backbone, templates: list[str], normalise_each: bool = False) -> Tensor:
    """t̃: one template at a time through the frozen text tower, averaged, normalised."""
    total = 0
    with torch.no_grad():
        for template in templates:
            feats = tiny.encode_text(tiny.tokenize([template.replace("{}", c) for c in TASKS["t"]]))
            total = total + (feats / feats.norm(dim=-1, keepdim=True) if normalise_each else feats)
    mean = total / len(templates)
    return mean / mean.norm(dim=-1, keepdim=True)


def mean_abs(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().sum() / a.numel()


def hand_terms(tiny: Backbone, twin: IVLP, batch: Batch, targets: Tensor) -> dict[str, Tensor]:
    """The four terms written out from the IVLP twin and the un-prompted tower."""
    assert batch.images is not None and batch.labels is not None
    with torch.no_grad():
        text = twin.text_features("t")
        image = twin.image_features(batch.images)
        frozen = tiny.encode_image(batch.images)
    text, image, frozen = (x / x.norm(dim=-1, keepdim=True) for x in (text, image, frozen))
    scale = float(tiny.logit_scale)
    logits, zero_shot = scale * image @ text.T, scale * frozen @ targets.T
    log_p, log_q = torch.log_softmax(logits, dim=1), torch.log_softmax(zero_shot, dim=1)
    picked = log_p[torch.arange(len(batch)), batch.labels]
    return {
        "ce": -picked.mean(),
        "text": mean_abs(text, targets),
        "image": mean_abs(image, frozen),
        "logits": (log_q.exp() * (log_q - log_p)).sum() / logits.numel(),  # KL(zero-shot ‖ prompted)
    }


# ---------------------------------------------------------------- the frozen targets


def test_the_default_templates_are_the_references_60_in_its_order() -> None:
    openai = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(IMAGENET60) == len(set(IMAGENET60)) == 60 and set(IMAGENET60) <= set(openai)
    # trainers/imagenet_templates.py: "a photo of a {}." first, then CLIP's notebook order
    assert IMAGENET60[:3] == ("a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.")
    assert IMAGENET60[-2:] == ("a pixelated photo of a {}.", "itap of the {}.")
    assert "itap of a {}." not in IMAGENET60 and "a photo of the small {}." not in IMAGENET60


@pytest.mark.parametrize("normalise_each", [False, True])
def test_text_targets_are_the_template_mean_of_frozen_features(tiny: Backbone, normalise_each: bool) -> None:
    method = build(tiny, normalise_templates=normalise_each)
    assert method.targets is None  # computed on the first training step, not at build
    got = method.text_targets("t")
    torch.testing.assert_close(got, hand_targets(tiny, TEMPLATES, normalise_each), rtol=0, atol=2e-6)
    other = hand_targets(tiny, TEMPLATES, not normalise_each)
    assert float((got - other).abs().max()) > 1e-4  # the two averages differ on this model


def test_default_targets_use_all_60_templates(tiny: Backbone) -> None:
    torch.manual_seed(0)
    method = build_method("promptsrc", tiny, TASKS, {})
    assert method.templates == IMAGENET60
    torch.testing.assert_close(
        method.text_targets("t"), hand_targets(tiny, list(IMAGENET60)), atol=2e-6, rtol=0
    )


# ---------------------------------------------------------------- the loss


def test_each_term_and_the_total_match_the_hand_computation(tiny: Backbone, batch: Batch) -> None:
    method = nudged(build(tiny))
    terms = method.losses(batch)
    hand = hand_terms(tiny, nudged(twin_ivlp(tiny)), batch, hand_targets(tiny, TEMPLATES))
    for key in ("ce", "text", "image", "logits"):
        torch.testing.assert_close(terms[key], hand[key], rtol=1e-5, atol=1e-7, msg=key)
        assert float(hand[key]) > 1e-3, key  # every term is really there on this batch
    total = hand["ce"] + 25 * hand["text"] + 10 * hand["image"] + hand["logits"]
    torch.testing.assert_close(method.training_loss(batch), total, rtol=1e-5, atol=1e-6)


def test_the_weights_scale_their_own_terms(tiny: Backbone, batch: Batch) -> None:
    weights = {"text_loss_weight": 2.0, "image_loss_weight": 3.0, "logit_loss_weight": 0.5}
    method = nudged(build(tiny, **weights))
    t = method.losses(batch)
    expected = t["ce"] + 2.0 * t["text"] + 3.0 * t["image"] + 0.5 * t["logits"]
    torch.testing.assert_close(method.training_loss(batch), expected, rtol=1e-6, atol=0)
    zero = nudged(build(tiny, text_loss_weight=0, image_loss_weight=0, logit_loss_weight=0))
    torch.testing.assert_close(zero.training_loss(batch), t["ce"], rtol=0, atol=0)


def test_without_visual_prompts_the_image_term_vanishes(tiny: Backbone, batch: Batch) -> None:
    method = build(tiny, n_ctx_vision=0, depth_vision=0)
    assert float(method.losses(batch)["image"]) == 0.0
    with pytest.raises(ValueError, match="promptsrc n_ctx_vision and depth_vision must both be 0"):
        method_config("promptsrc", {"n_ctx_vision": 0})


def test_prediction_and_state_are_ivlps(tiny: Backbone, images: Tensor) -> None:
    method, twin = build(tiny), twin_ivlp(tiny)
    state = method.learned_state()
    assert state.keys() == twin.learned_state().keys()
    with torch.no_grad():
        for tensor in method.parameters():
            tensor.add_(0.05)
    fresh = twin_ivlp(tiny)
    fresh.load_state_dict(method.learned_state())  # a PromptSRC run is an IVLP checkpoint
    batch = Batch("t", images=images)
    torch.testing.assert_close(method.predict(batch), fresh.predict(batch), rtol=0, atol=0)
    assert method.targets is None  # predicting never needs the frozen targets


# ---------------------------------------------------------------- Gaussian prompt aggregation


def test_gpa_weights_are_the_normalised_gaussian() -> None:
    # μ = 2, σ = 1 over three epochs: densities ∝ e^-1/2, 1, e^-1/2
    side = math.exp(-0.5)
    assert gpa_weights(2.0, 1.0, 3) == pytest.approx(
        (side / (1 + 2 * side), 1 / (1 + 2 * side), side / (1 + 2 * side))
    )
    # the reference defaults, E = 20, μ = 15, σ = 1: w_e ∝ exp(-(e - 15)² / 2)
    weights = gpa_weights(15.0, 1.0, 20)
    density = [math.exp(-((e - 15) ** 2) / 2) for e in range(1, 21)]
    assert weights == pytest.approx([d / sum(density) for d in density], rel=1e-12)
    assert sum(weights) == pytest.approx(1.0) and max(weights) == weights[14]
    assert gpa_weights(15.0, 1.0, 1) == (1.0,)  # one epoch: all weight on it, however far μ is


def test_the_aggregate_is_the_weighted_sum_of_each_epochs_prompts(tiny: Backbone) -> None:
    method, epochs = build(tiny, gpa_mean=2.0, gpa_std=1.5), 4
    weights = gpa_weights(2.0, 1.5, epochs)
    gen = torch.Generator().manual_seed(5)
    saved = []
    for epoch in range(1, epochs + 1):
        with torch.no_grad():  # stand-in for an epoch of SGD steps
            for p in method.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        saved.append(method.learned_state())
        method.epoch_end(epoch, epochs)
        if epoch < epochs:  # the prompts go on training; only the aggregate changes
            assert all(torch.equal(v, saved[-1][k]) for k, v in method.learned_state().items())
    final = method.learned_state()
    for key in final:
        expected = sum(w * state[key] for w, state in zip(weights, saved, strict=True))
        torch.testing.assert_close(final[key], expected, rtol=0, atol=1e-7, msg=key)
        assert float((final[key] - saved[-1][key]).abs().max()) > 1e-3  # not the last epoch's
    assert float(method.gpa_aggregate.abs().max()) == 0.0  # cleared once it became the prompts


def test_without_gpa_the_last_epochs_prompts_stay(tiny: Backbone) -> None:
    method = build(tiny, gpa=False)
    before = method.learned_state()
    for epoch in (1, 2):
        method.epoch_end(epoch, 2)
    assert all(torch.equal(v, before[k]) for k, v in method.learned_state().items())


def test_the_aggregate_is_checkpointed_state_not_learned_state(tiny: Backbone) -> None:
    method = build(tiny, gpa_mean=1.0)
    method.epoch_end(1, 3)
    assert "gpa_aggregate" in method.state_dict() and "gpa_aggregate" not in method.learned_state()
    assert float(method.gpa_aggregate.abs().max()) > 0
    fresh = build(tiny)
    fresh.load_state_dict(method.state_dict())  # a checkpoint brings the running sum back
    assert torch.equal(fresh.gpa_aggregate, method.gpa_aggregate)
    fresh.load_state_dict(build(tiny).learned_state())  # a learned state loads strictly, sum kept
    assert torch.equal(fresh.gpa_aggregate, method.gpa_aggregate)


@pytest.mark.parametrize(("mean", "std"), [(1000.0, 1.0), (-500.0, 2.0), (15.5, 1e-3)])
def test_weights_that_miss_every_epoch_are_refused(mean: float, std: float) -> None:
    epochs = 20
    with pytest.raises(
        ValueError, match=rf"gpa_mean={mean} gpa_std={std} put no weight on any of the epochs"
    ):
        gpa_weights(mean, std, epochs)
    cfg = method_config("promptsrc", {"gpa_mean": mean, "gpa_std": std})
    with pytest.raises(ValueError, match=r"move gpa_mean into 1 \.\. 20"):
        cfg.check_epochs(epochs)
    method_config("promptsrc", {"gpa": False, "gpa_mean": mean}).check_epochs(epochs)  # no GPA: no rule
    with pytest.raises(ValueError, match="gpa_std must be a number > 0"):
        method_config("promptsrc", {"gpa_std": 0})


def test_bad_epoch_numbers_and_templates_are_refused(tiny: Backbone) -> None:
    method = build(tiny)
    with pytest.raises(ValueError, match=r"epoch 0 is not one of 1 \.\. 3"):
        method.epoch_end(0, 3)
    with pytest.raises(ValueError, match=r"text_templates\[1\] must be a string with exactly one"):
        method_config("promptsrc", {"text_templates": ["a {}.", "no slot"]})

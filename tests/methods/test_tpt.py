"""TPT: confidence selection, the average-entropy loss, per-sample reset, and TPT without tuning = CLIP."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from vlprompt.methods import METHODS, build_method, capabilities, options
from vlprompt.methods.base import Batch, Method, count_trainable
from vlprompt.methods.clip import Backbone
from vlprompt.methods.coop import CoOp
from vlprompt.methods.test_time import average_entropy_stacked
from vlprompt.methods.tpt import TPT, TPTConfig, average_entropy, select_confident

CLASSES = ["golden_retriever", "airplane", "sea lion", "annual crop land", "x"]
V = 7  # views per image in these tests: 1 + 7 = 8 images, selection_p 0.25 keeps 2


def tpt(backbone: Backbone, tasks: dict[str, list[str]] | None = None, **options: object) -> TPT:
    options = {"n_views": V, "selection_p": 0.25, **options}
    method = build_method("tpt", backbone, tasks or {"pets": CLASSES}, options)
    assert isinstance(method, TPT)
    return method


@pytest.fixture(scope="module")
def views() -> Tensor:
    """``V`` random views of each of the six ``images``."""
    return torch.randn(6, V, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_selection_keeps_the_lowest_entropy_rows() -> None:
    # row i: a two-class logit gap; entropy falls as |gap| grows (sign does not matter)
    gaps = torch.tensor([0.0, 3.0, -8.0, 0.5, 6.0, -1.0, 10.0, 2.0, -4.0, 0.1])
    logits = torch.stack([torch.zeros(10), gaps], dim=1)
    assert select_confident(logits, 0.3).tolist() == [6, 2, 4]  # int(10 x 0.3) = 3, most confident first
    assert select_confident(logits, 0.5).tolist() == [6, 2, 4, 8, 1]
    # the reference's count: the original plus 63 views, selection_p 0.1 -> int(6.4) = 6 images
    assert len(select_confident(torch.randn(64, 5), 0.1)) == 6
    # the original (row 0) competes like any view
    assert select_confident(torch.tensor([[20.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), 0.34).tolist() == [0]
    with pytest.raises(ValueError, match="keeps no image"):
        select_confident(logits, 0.05)


def test_average_entropy_is_the_entropy_of_the_mean_prediction() -> None:
    logits = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)) * 4
    p = logits.double().softmax(dim=-1).mean(dim=0)
    expected = -(p * p.log()).sum()
    assert float(average_entropy(logits)) == pytest.approx(float(expected), rel=1e-5)
    # a confident mean is finite and ~0 even where some probabilities underflow to 0 (clamped log)
    sharp = torch.tensor([[0.0, 2000.0], [0.0, 3000.0]])
    assert torch.isfinite(average_entropy(sharp)) and float(average_entropy(sharp)) == pytest.approx(0.0)
    # the entropy of the mean, not the mean entropy: two opposite confident views -> log 2
    opposite = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert float(average_entropy(opposite)) == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.parametrize("options", [{"steps": 0}, {"lr": 0.0}])
def test_without_tuning_tpt_is_clip_with_a_photo_of_a(
    tiny: Backbone, images: Tensor, views: Tensor, options: dict
) -> None:
    method = tpt(tiny, **options)
    zeroshot = build_method("zeroshot", tiny, {"pets": CLASSES}, {"template": "a photo of a {}."})
    expected = zeroshot.predict(Batch("pets", images=images))
    ours = method.predict(Batch("pets", images=images, views=views))
    assert ours.shape == (6, len(CLASSES))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert float(expected.std()) > 0.1  # the classes are told apart
    # without views: no tuning at all, whatever the options (cached features work too)
    with torch.no_grad():
        features = tiny.encode_image(images)
    torch.testing.assert_close(
        tpt(tiny).predict(Batch("pets", features=features)), expected, rtol=0, atol=1e-5
    )


def test_tuning_changes_the_prediction(tiny: Backbone, images: Tensor, views: Tensor) -> None:
    batch = Batch("pets", images=images[:2], views=views[:2])
    tuned = tpt(tiny).predict(batch)
    untuned = tpt(tiny, steps=0).predict(batch)
    assert float((tuned - untuned).abs().max()) > 1e-2


def test_predict_resets_and_leaks_nothing_between_samples(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = tpt(tiny, steps=2)
    ctx0 = method.ctx.detach().clone()
    sample_a = Batch("pets", images=images[:1], views=views[:1])
    sample_b = Batch("pets", images=images[1:2], views=views[1:2])
    torch.manual_seed(0)
    b_alone = tpt(tiny, steps=2).predict(sample_b)
    torch.manual_seed(0)
    method.predict(sample_a)
    assert torch.equal(method.ctx.detach(), ctx0) and method.ctx.grad is None
    b_after_a = method.predict(sample_b)
    assert torch.equal(b_after_a, b_alone)
    torch.manual_seed(0)
    assert torch.equal(method.predict(sample_b), b_alone)  # same input twice -> same logits
    assert torch.equal(method.ctx.detach(), ctx0)
    # a batch: each sample tuned on its own from the same start
    both = method.predict(Batch("pets", images=images[:2], views=views[:2]))
    torch.testing.assert_close(both[1:], b_alone, rtol=0, atol=1e-5)
    assert torch.equal(method.ctx.detach(), ctx0)


def test_one_step_lowers_the_selected_views_average_entropy(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = tpt(tiny)
    with torch.no_grad():
        features = torch.cat([tiny.encode_image(images[:1]), tiny.encode_image(views[0])])
        before = method.logits("pets", features)
    selected = select_confident(before, 0.25)
    assert len(selected) == 2
    losses = method.adapt("pets", features)
    with torch.no_grad():
        after = average_entropy(method.logits("pets", features)[selected])
    assert losses == [pytest.approx(float(average_entropy(before[selected])))]
    # observed 0.13 -> 6e-4 for this backbone and data
    assert float(after) < losses[0] / 2


def test_state_is_a_coop_checkpoint_and_trains_like_coop(tiny: Backbone, images: Tensor) -> None:
    method = tpt(tiny, {"t": ["cat", "dog", "car", "tree"]})
    assert isinstance(method, Method)
    assert [name for name, _ in method.named_parameters()] == ["ctx"]
    assert set(method.state_dict()) == set(method.learned_state()) == {"ctx"}
    assert count_trainable(method) == 4 * tiny.text_width
    caps = capabilities("tpt")
    wanted = caps.test_time_views(TPTConfig(n_views=V, selection_p=0.25))
    assert wanted == options.TestTimeViews(V, augmix=False)
    assert caps.test_time_views(TPTConfig(augmix=True)).augmix is True
    assert caps.frozen_image_tower and caps.token_space_keys == ("ctx",) and not caps.learns
    coop = build_method("coop", tiny, {"t": ["cat", "dog", "car", "tree"]}, {"ctx_init": "a photo of a"})
    batch = Batch("t", images=images[:4], labels=torch.arange(4))
    torch.testing.assert_close(method.training_loss(batch), coop.training_loss(batch), rtol=0, atol=1e-6)
    method.training_loss(batch).backward()
    assert method.ctx.grad is not None and method.ctx.grad.abs().sum() > 0


def test_init_state_starts_from_a_trained_coop_context(
    tiny: Backbone, images: Tensor, tmp_path: Path
) -> None:
    coop = build_method("coop", tiny, {"pets": CLASSES}, {"n_ctx": 4})
    assert isinstance(coop, CoOp)
    with torch.no_grad():
        coop.ctx.add_(torch.randn(coop.ctx.shape, generator=torch.Generator().manual_seed(4)))
    path = tmp_path / "learned_state.pt"
    torch.save({k: v.cpu() for k, v in coop.learned_state().items()}, path)
    method = tpt(tiny, init_state=str(path))
    assert torch.equal(method.ctx.detach(), coop.ctx.detach())
    batch = Batch("pets", images=images)
    torch.testing.assert_close(method.predict(batch), coop.predict(batch), rtol=0, atol=1e-5)
    # a CoOp/Dassl checkpoint (the reference's --load) holds it under "state_dict"
    dassl = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": coop.learned_state(), "epoch": 50}, dassl)
    assert torch.equal(tpt(tiny, init_state=str(dassl)).ctx.detach(), coop.ctx.detach())


def test_init_state_errors_name_the_file(tiny: Backbone, tmp_path: Path) -> None:
    wrong = tmp_path / "sixteen.pt"
    torch.save({"ctx": torch.zeros(16, tiny.text_width)}, wrong)
    with pytest.raises(ValueError, match=rf"{re.escape(str(wrong))}.*\(16, 64\).*\(4, 64\).*n_ctx"):
        tpt(tiny, init_state=str(wrong))
    tpt(tiny, init_state=str(wrong), ctx_init="", n_ctx=16)  # a matching random-init TPT loads it
    no_ctx = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, no_ctx)
    with pytest.raises(ValueError, match=rf"{re.escape(str(no_ctx))} holds no 'ctx'.*\['weight'\]"):
        tpt(tiny, init_state=str(no_ctx))
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        tpt(tiny, init_state=str(tmp_path / "missing.pt"))


def test_views_shape_is_checked(tiny: Backbone, images: Tensor, views: Tensor) -> None:
    with pytest.raises(ValueError, match=r"\(B, V, C, H, W\) with B = 2"):
        tpt(tiny).predict(Batch("pets", images=images[:2], views=views[:1]))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"n_views": 0}, "n_views"),
        ({"n_views": True}, "n_views"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"n_ctx": 0}, "n_ctx"),
        ({"selection_p": 0.0}, "selection_p"),
        ({"selection_p": 1.5}, "selection_p"),
        ({"selection_p": "0.1"}, "selection_p"),
        ({"n_views": 3, "selection_p": 0.1}, "selection_p"),  # int(4 x 0.1) = 0 images kept
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"ctx_init": None}, "ctx_init"),
        ({"init_state": None}, "init_state"),
        ({"augmix": "yes"}, "augmix"),
    ],
)
def test_config_checks(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"tpt {field}"):
        TPTConfig(**options)


def test_registered_with_the_reference_defaults() -> None:
    spec = METHODS["tpt"]
    assert spec.options is TPTConfig and spec.summary.startswith("TPT")
    cfg = TPTConfig()
    assert (cfg.n_views, cfg.selection_p, cfg.lr, cfg.steps) == (63, 0.1, 5e-3, 1)
    assert (cfg.ctx_init, cfg.n_ctx, cfg.init_state, cfg.augmix) == ("a photo of a", 4, "", False)


def test_multi_task_tunes_over_the_batch_task_only(tiny: Backbone, images: Tensor, views: Tensor) -> None:
    method = tpt(tiny, {"pets": CLASSES, "vehicles": ["car", "bus"]})
    logits = method.predict(Batch("vehicles", images=images[:1], views=views[:1]))
    alone = tpt(tiny, {"vehicles": ["car", "bus"]}).predict(
        Batch("vehicles", images=images[:1], views=views[:1])
    )
    assert logits.shape == (1, 2)
    torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    with torch.no_grad():  # and the tuned prediction is still a cosine-logit of the original
        assert float(logits.abs().max()) <= float(tiny.logit_scale) + 1e-4


def test_predict_tunes_on_the_original_then_its_views_selecting_once(
    tiny: Backbone, images: Tensor, views: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlprompt.methods.tpt as module

    method = tpt(tiny, steps=3)
    seen: list[Tensor] = []
    selections: list[int] = []
    original_adapt, original_select = TPT.adapt, module.select_confident

    def recording_adapt(self: TPT, task: str, features: Tensor) -> list[float]:
        seen.append(features.detach().clone())
        return original_adapt(self, task, features)

    def counting_select(logits: Tensor, selection_p: float) -> Tensor:
        selections.append(logits.shape[0])
        return original_select(logits, selection_p)

    monkeypatch.setattr(TPT, "adapt", recording_adapt)
    monkeypatch.setattr(module, "select_confident", counting_select)
    method.predict(Batch("pets", images=images[:2], views=views[:2]))
    assert selections == [1 + V, 1 + V]  # once per sample (at the first of 3 steps), original included
    with torch.no_grad():
        for b, features in enumerate(seen):
            expected = torch.cat([tiny.encode_image(images[b : b + 1]), tiny.encode_image(views[b])])
            torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- many images at once


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

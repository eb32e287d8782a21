"""PromptSync: each loss term by hand (w, L_PA, L_PD, symmetric, top-k), β = γ = 0 as TPT on MaPLe
(PromptAlign with β = 0), the cached discrimination against recomputing it (both modes), the
per-image reset, and the refusal of a file lacking classes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.methods import METHODS, build_method, capabilities, options
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.options import PromptSyncConfig
from vlprompt.methods.promptalign import alignment_loss
from vlprompt.methods.promptsync import (
    PromptSync,
    class_distances,
    discrimination_loss,
    prototype_alignment_loss,
)
from vlprompt.methods.stats_file import MAKE_COMMAND

from .test_promptalign import assert_same_as_one_at_a_time, make_stats, promptalign

V = 7
HAVE = ["cat", "dog", "car", "x"]  # the classes the statistics file has rows for ('tree' has none)


def promptsync(backbone: Backbone, seed: int = 0, classes: list[str] = HAVE, **opts: object) -> PromptSync:
    torch.manual_seed(seed)
    opts = {"n_views": V, "selection_p": 0.25, **opts}
    method = build_method("promptsync", backbone, {"pets": classes}, opts)
    assert isinstance(method, PromptSync)
    return method


@pytest.fixture(scope="module")
def views() -> Tensor:
    return torch.randn(4, V, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def stats_file(tiny: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 4, 4, 4])
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    return make_stats(promptalign(tiny), (images, labels), path)


# ---------------------------------------------------------------- each term by hand
def test_class_distances_and_the_weighted_alignment_by_hand() -> None:
    block0 = torch.tensor([[[1.0, 3.0]], [[3.0, 7.0]]])  # mean (2, 5), var (1, 4)
    block1 = torch.tensor([[[0.0, 0.0]], [[2.0, -2.0]]])  # mean (1, -1), var (1, 1)
    # class 0: PromptAlign's test (2.125); class 1: block 0 0.5*mean(2,5)+0.5*mean(1,4) = 3,
    # block 1 0.5*mean(1,1)+0.5*mean(1,1) = 1 -> 4 (source mean 0, var 0)
    mean = torch.stack([torch.tensor([[[0.0, 5.0]], [[1.0, 1.0]]]), torch.zeros(2, 1, 2)])
    var = torch.stack([torch.tensor([[[1.0, 0.0]], [[0.5, 1.0]]]), torch.zeros(2, 1, 2)])
    d = class_distances([block0, block1], mean, var)
    torch.testing.assert_close(d, torch.tensor([2.125, 4.0]))
    assert float(alignment_loss([block0, block1], mean[0], var[0])) == pytest.approx(2.125)
    w = torch.tensor([0.25, 0.75])
    loss = prototype_alignment_loss([block0, block1], mean, var, w)
    assert float(loss) == pytest.approx(0.25 * 2.125 + 0.75 * 4.0)
    top = prototype_alignment_loss([block0, block1], mean, var, w, top_k=1)  # class 1 only, w kept
    assert float(top) == pytest.approx(0.75 * 4.0)
    many = torch.randn(150, 2, 1, 2, generator=torch.Generator().manual_seed(0))  # > one chunk
    direct = torch.stack([alignment_loss([block0, block1], m, m.abs()) for m in many])
    torch.testing.assert_close(class_distances([block0, block1], many, many.abs()), direct)


def test_discrimination_loss_by_hand() -> None:
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised: e1, e2
    text = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # normalised: (1,1)/√2, e2
    c = 1 / math.sqrt(2)
    tau = 0.5
    # rows prototype → text: [c, 0] / τ and [c, 1] / τ; targets 0 and 1
    ce0 = -(2 * c) + math.log(math.exp(2 * c) + math.exp(0))
    ce1 = -2 + math.log(math.exp(2 * c) + math.exp(2))
    assert float(discrimination_loss(prototypes, text, tau)) == pytest.approx((ce0 + ce1) / 2)
    # text → prototype: columns [c, c] (target 0) and [0, 1] (target 1)
    ct0 = -(2 * c) + math.log(2 * math.exp(2 * c))
    ct1 = -2 + math.log(1 + math.exp(2))
    sym = discrimination_loss(prototypes, text, tau, symmetric=True)
    assert float(sym) == pytest.approx(0.5 * ((ce0 + ce1) / 2 + (ct0 + ct1) / 2))


def test_class_weights_by_hand(tiny: Backbone, images: Tensor, stats_file: Path) -> None:
    method = promptsync(tiny, source_stats=str(stats_file))
    text = method.text_features("pets")
    with torch.no_grad():
        kept_logits = method.logits("pets", images[1:3])
        original = method.logits("pets", images[:1])
    w = method.weights(method, images[:3], torch.tensor([1, 2]), kept_logits, text)
    expected = torch.cat([original, kept_logits]).softmax(-1).mean(0)  # 3 images: {x} ∪ S
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    assert float(w.sum()) == pytest.approx(1.0)
    only_kept = kept_logits.softmax(-1).mean(0)
    torch.testing.assert_close(method.class_weights(kept_logits), only_kept)
    # the original is not counted twice where the selection kept it
    torch.testing.assert_close(
        method.weights(method, images[:3], torch.tensor([0, 2]), kept_logits, text), only_kept
    )
    # G images at once: each its own weights, the original added only where it was not kept
    both = method.class_weights(
        torch.stack([kept_logits, kept_logits]), torch.cat([original, original]), torch.tensor([True, False])
    )
    torch.testing.assert_close(both, torch.stack([expected, only_kept]))
    selected = promptsync(tiny, source_stats=str(stats_file), weights_over="selected", detach_weights=False)
    logits = selected.logits("pets", images[1:3])
    w = selected.weights(selected, images[:3], torch.tensor([1, 2]), logits, selected.text_features("pets"))
    torch.testing.assert_close(w, logits.softmax(-1).mean(0))
    assert w.requires_grad  # the gradient flows through w


def _entropy_of_mean(logits: Tensor) -> Tensor:
    p = logits.softmax(dim=-1).mean(dim=0)
    return -(p * p.log()).sum()


def hand_loss(method: PromptSync, batch: Tensor, joint: bool) -> Tensor:
    """L_ent + β·L_PA (+ γ·L_PD) at the current prompts, written out with autograd."""
    with torch.no_grad():
        logits = method.logits("pets", batch)
    kept = torch.argsort(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), stable=True)[:2]
    features, tokens = method.observe(batch[kept], [0, 1])
    text = method.text_features("pets")
    kept_logits = 100 * F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T
    rows = kept_logits if 0 in kept.tolist() else torch.cat([logits[:1], kept_logits])
    w = rows.softmax(-1).mean(0).detach()
    mean, var, proto = method.prototypes["pets"]
    d = torch.stack([alignment_loss([tokens[0], tokens[1]], mean[c], var[c]) for c in range(len(HAVE))])
    loss = _entropy_of_mean(kept_logits) + 100 / 3 * (w * d).sum()
    if joint:
        sim = F.normalize(proto, dim=-1) @ F.normalize(text, dim=-1).T / 0.01
        loss = loss + F.cross_entropy(sim, torch.arange(len(HAVE)))
    return loss


# ---------------------------------------------------------------- β = γ = 0 is TPT on MaPLe
def test_without_alignment_and_discrimination_it_is_promptalign_without_alignment(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    sync = promptsync(tiny, align_weight=0.0, discrimination_weight=0.0)  # no file needed
    align = build_method(
        "promptalign", tiny, {"pets": HAVE}, {"n_views": V, "selection_p": 0.25, "align_weight": 0}
    )
    align.load_state_dict(sync.state_dict())
    batch = Batch("pets", images=images[:3], views=views[:3])
    got = sync.predict(batch)
    torch.testing.assert_close(got, align.predict(batch), rtol=0, atol=1e-5)
    assert float((got - sync.maple.predict(Batch("pets", images=images[:3]))).abs().max()) > 1e-2


# ---------------------------------------------------------------- the step, both modes
def test_joint_mode_with_the_cached_gradient_is_the_joint_loss_recomputed_per_image(
    tiny: Backbone, images: Tensor, views: Tensor, stats_file: Path
) -> None:
    lr = 0.01
    method = promptsync(tiny, source_stats=str(stats_file), discrimination="joint", lr=lr)
    reference = promptsync(tiny, source_stats=str(stats_file), lr=lr)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    for b in range(2):  # the second image reuses the first one's cached gradient
        reference.load_state_dict(start)
        batch = torch.cat([images[b : b + 1], views[b]])
        optimizer = torch.optim.AdamW(reference.parameters(), lr=lr)
        loss = hand_loss(reference, batch, joint=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            expected = reference.logits("pets", images[b : b + 1])
        got = method.predict(Batch("pets", images=images[b : b + 1], views=views[b : b + 1]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert len(method._cache) == 1
    reference.load_state_dict(start)
    first = torch.cat([images[:1], views[0]])
    (loss,) = method.adapt("pets", first)  # the reported loss includes the cached γ·L_PD(P₀)
    assert loss == pytest.approx(float(hand_loss(reference, first, joint=True)), rel=1e-4)


def test_cached_discrimination_is_the_recomputed_reset_state(
    tiny: Backbone, images: Tensor, views: Tensor, stats_file: Path
) -> None:
    lr = 0.01
    method = promptsync(tiny, source_stats=str(stats_file), lr=lr, discrimination_steps=2)
    reference = promptsync(tiny, source_stats=str(stats_file), lr=lr)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr)
    for _ in range(2):  # P₀*: M = 2 AdamW steps of γ·L_PD from P₀, by hand
        sim = (
            F.normalize(reference.prototypes["pets"][2], dim=-1)
            @ F.normalize(reference.text_features("pets"), dim=-1).T
        )
        loss = F.cross_entropy(sim / 0.01, torch.arange(len(HAVE)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recomputed = [p.detach().clone() for p in reference.parameters()]
    cached = method.discriminated_start("pets")
    assert all(torch.equal(a, b) for a, b in zip(cached, recomputed, strict=True))
    assert all(torch.equal(v, start[k]) for k, v in method.state_dict().items())  # P₀ restored
    assert max(float((a - s).abs().max()) for a, s in zip(cached, start.values(), strict=True)) > 1e-3
    for b in range(2):  # each image: one L_ent + β·L_PA step from P₀*
        with torch.no_grad():
            for p, r in zip(reference.parameters(), recomputed, strict=True):
                p.copy_(r)
        batch = torch.cat([images[b : b + 1], views[b]])
        optimizer = torch.optim.AdamW(reference.parameters(), lr=lr)
        loss = hand_loss(reference, batch, joint=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            expected = reference.logits("pets", images[b : b + 1])
        got = method.predict(Batch("pets", images=images[b : b + 1], views=views[b : b + 1]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert method.discriminated_start("pets") is cached  # made once per task
    with torch.no_grad():
        next(method.parameters()).add_(0.1)  # other starting prompts: recomputed
    assert method.discriminated_start("pets") is not cached


@pytest.mark.parametrize(
    "opts",
    [
        {"discrimination": "cached"},
        {"discrimination": "joint"},
        {"discrimination": "joint", "top_k_classes": 2, "weights_over": "selected", "symmetric": True},
    ],
    ids=["cached", "joint", "joint-top2-selected-symmetric"],
)
def test_images_adapted_together_equal_one_at_a_time(
    tiny: Backbone, images: Tensor, views: Tensor, stats_file: Path, opts: dict
) -> None:
    opts = {"source_stats": str(stats_file), "steps": 2, "lr": 0.01, **opts}
    together = promptsync(tiny, images_per_step=4, **opts)  # four images: one group, then the rest
    batch = Batch("pets", images=images, views=torch.cat([views, views[:2]]))
    assert_same_as_one_at_a_time(promptsync(tiny, **opts), together, batch)


def test_predict_resets_and_leaks_nothing_between_images(
    tiny: Backbone, images: Tensor, views: Tensor, stats_file: Path
) -> None:
    method = promptsync(tiny, source_stats=str(stats_file), steps=2)
    start = {k: v.clone() for k, v in method.state_dict().items()}
    second = Batch("pets", images=images[1:2], views=views[1:2])
    alone = promptsync(tiny, source_stats=str(stats_file), steps=2).predict(second)
    method.predict(Batch("pets", images=images[:1], views=views[:1]))
    assert all(torch.equal(v, start[k]) for k, v in method.state_dict().items())
    assert all(p.grad is None for p in method.parameters())
    assert torch.equal(method.predict(second), alone)
    both = method.predict(Batch("pets", images=images[:2], views=views[:2]))
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- refusals, options, registry
def test_a_file_without_a_needed_class_is_refused_naming_it(tiny: Backbone, stats_file: Path) -> None:
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(stats_file))} have no images of 1 of the 5 classes needed: 'tree'.*"
        rf"{re.escape(MAKE_COMMAND)}",
    ):
        promptsync(tiny, classes=["cat", "dog", "car", "tree", "x"], source_stats=str(stats_file))


def test_discrimination_without_statistics_says_how_to_make_them(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = promptsync(tiny, align_weight=0.0)
    with pytest.raises(ValueError, match=r"discrimination_weight=1 read per-class.*source_stats\.py"):
        method.predict(Batch("pets", images=images[:1], views=views[:1]))


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        ({"weights_over": "all"}, "weights_over"),
        ({"discrimination": "never"}, "discrimination"),
        ({"discrimination_tau": 0.0}, "discrimination_tau"),
        ({"top_k_classes": -1}, "top_k_classes"),
        ({"align_layers": [0, 0]}, "align_layers"),
    ],
)
def test_config_checks(opts: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"promptsync {field}"):
        PromptSyncConfig(**opts)


def test_registered_with_the_specs_defaults() -> None:
    spec = METHODS["promptsync"]
    assert spec.options is PromptSyncConfig and spec.capabilities == capabilities("promptsync")
    cfg = PromptSyncConfig()
    assert (cfg.n_ctx, cfg.prompt_depth, cfg.lr, cfg.steps, cfg.align_layers) == (2, 3, 4e-2, 1, [0, 1])
    assert cfg.align_weight == pytest.approx(100 / 3)
    assert (cfg.weights_over, cfg.detach_weights, cfg.top_k_classes) == ("original_and_selected", True, 0)
    assert (cfg.discrimination, cfg.discrimination_steps, cfg.discrimination_weight) == ("cached", 1, 1.0)
    assert (cfg.discrimination_tau, cfg.symmetric) == (0.01, False)
    caps = spec.capabilities
    assert not caps.learns and caps.test_time_views(cfg) == capabilities("promptalign").test_time_views(cfg)
    wanted = caps.source_stats(cfg)
    assert wanted.required and wanted.per_class
    assert caps.source_stats(PromptSyncConfig(align_weight=0.0)).required  # L_PD still reads it
    off = caps.source_stats(PromptSyncConfig(align_weight=0.0, discrimination_weight=0.0))
    assert not off.required and not off.per_class
    assert not capabilities("promptalign").source_stats(options.PromptAlignConfig()).per_class

"""Linear probe: a real logistic-regression solve, C chosen on val (CoOp ``lpclip``), one head per task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, FeatureSet
from vlprompt.methods.clip import Backbone
from vlprompt.methods.linear_probe import LinearProbeConfig, select_c, solve

K = 5
CLASSES = [f"class_{i}" for i in range(K)]


def clusters(dim: int, n_per: int, seed: int, outliers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed class means, a few directions noisier than the rest.

    ``outliers`` per class: extra samples drawn from the *next* class's cluster but labelled
    as this class (label noise that keeps the classes balanced).
    """
    means = torch.randn(K, dim, generator=torch.Generator().manual_seed(0))
    scale = torch.ones(dim)
    scale[:4] = 2.5
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(n_per)
    source = labels.clone()
    if outliers:
        extra = torch.arange(K).repeat_interleave(outliers)
        labels, source = torch.cat([labels, extra]), torch.cat([source, (extra + 1) % K])
    features = 3.0 * (means[source] + torch.randn(len(labels), dim, generator=gen) * scale)
    return features, labels


def probe(backbone: Backbone, **options):
    return build_method("linear_probe", backbone, {"t": CLASSES}, options)


def test_one_row_and_bias_per_class(tiny: Backbone) -> None:
    method = probe(tiny)
    state = method.learned_state()
    assert state["weight"].shape == (K, tiny.embed_dim) and state["bias"].shape == (K,)
    assert sum(p.numel() for p in method.parameters() if p.requires_grad) == K * tiny.embed_dim + K


def test_separable_clusters_are_learned_and_predicted_from_features_or_images(tiny: Backbone, images) -> None:
    method = probe(tiny)
    x_train, y_train = clusters(tiny.embed_dim, 60, seed=1)
    x_val, y_val = clusters(tiny.embed_dim, 20, seed=2)
    stats = method.fit(FeatureSet("t", x_train, y_train), FeatureSet("t", x_val, y_val))
    x_test, y_test = clusters(tiny.embed_dim, 100, seed=3)
    acc = (method.predict(Batch("t", features=x_test)).argmax(-1) == y_test).double().mean()
    assert acc >= 0.95
    assert stats["probe_val_acc"] >= 95.0 and stats["probe_fits"] > len(method.cfg.c_grid)
    assert stats[f"probe_val_acc/log10c_{math.log10(stats['probe_c']):.3f}"] == stats["probe_val_acc"]
    # images go through the frozen image tower: same logits as their cached features
    with torch.no_grad():
        feats = tiny.encode_image(images)
    from_images = method.predict(Batch("t", images=images))
    assert torch.allclose(from_images, method.predict(Batch("t", features=feats)))


def test_tiny_noisy_train_sets_choose_stronger_regularisation_than_large_clean_ones(tiny: Backbone) -> None:
    """With 2 images + 1 mislabelled outlier per class, weak regularisation memorises the outliers;
    with 100 clean images per class it pays off. C is the *inverse* strength."""
    chosen = {}
    for name, (n_per, outliers) in {"tiny_noisy": (2, 1), "large_clean": (100, 0)}.items():
        for seed in (0, 1, 2):
            method = probe(tiny)
            stats = method.fit(
                FeatureSet("t", *clusters(tiny.embed_dim, n_per, 10 + seed, outliers)),
                FeatureSet("t", *clusters(tiny.embed_dim, 100, 20 + seed)),
            )
            chosen[name, seed] = stats["probe_c"]
    for seed in (0, 1, 2):
        assert chosen["tiny_noisy", seed] < 1.0 and chosen["large_clean", seed] >= 100.0, chosen


def test_solver_matches_scikit_learn_logistic_regression() -> None:
    """Same objective as ``LogisticRegression(C=c)`` (CoOp's lpclip): same optimum."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = clusters(16, 30, seed=4)
    x = F.normalize(x, dim=-1).double()
    for c in (0.1, 1.0):
        ours = solve(x, y, K, c, tol=1e-10)
        ref = linear_model.LogisticRegression(C=c, tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
        assert torch.allclose(ours.weight, torch.from_numpy(ref.coef_), atol=1e-4)
        assert torch.allclose(ours.bias, torch.from_numpy(ref.intercept_), atol=1e-4)


def test_search_follows_coop_lpclip_grid_then_bisection() -> None:
    """A val accuracy peaked at C = 10^0.3: the grid finds 1, bisection closes in on 10^0.3."""
    calls = []

    def val_accuracy(c: float) -> float:
        calls.append(c)
        return -abs(math.log10(c) - 0.3)

    chosen, tried = select_c(val_accuracy, [1e2, 1.0, 1e-2], steps=8)
    assert calls[:3] == [1e2, 1.0, 1e-2] and calls[3:5] == pytest.approx([0.1, 10.0])
    assert math.log10(chosen) == pytest.approx(0.3, abs=2 / 2**7)
    assert len(tried) == len(set(calls)) == len(calls)  # each C fitted once
    # ties: the grid keeps the first best, bisection keeps the left (smaller) end
    assert select_c(lambda c: 1.0, [1e2, 1.0], steps=0)[0] == 1e2
    assert select_c(lambda c: 1.0, [1.0], steps=1)[0] == pytest.approx(0.1)


def test_deterministic_and_one_head_per_task(tiny: Backbone) -> None:
    tasks = {"a": CLASSES, "b": ["x", "y", "z"]}
    x_a, y_a = clusters(tiny.embed_dim, 10, seed=5)
    x_b, y_b = x_a[y_a < 3], y_a[y_a < 3]
    states = []
    for _ in range(2):
        method = build_method("linear_probe", tiny, tasks, {"c_grid": [10, 0.1], "search_steps": 2})
        method.fit(FeatureSet("a", x_a, y_a), FeatureSet("a", x_a, y_a))
        before_b = method.learned_state()["weight"][K:].clone()
        method.fit(FeatureSet("b", x_b, y_b), FeatureSet("b", x_b, y_b))
        states.append(method.learned_state())
        assert torch.equal(before_b, torch.zeros_like(before_b))  # fitting task a left b's head alone
        assert method.predict(Batch("b", features=x_b)).shape == (len(x_b), 3)
    assert all(torch.equal(states[0][k], states[1][k]) for k in ("weight", "bias"))


def test_config_is_checked() -> None:
    assert LinearProbeConfig(c_grid=[1, 2]).c_grid == [1.0, 2.0]
    for bad in ({"c_grid": []}, {"c_grid": [0.0]}, {"c_grid": "1e3"}, {"search_steps": -1}, {"tol": 0}):
        with pytest.raises(ValueError, match="linear_probe"):
            LinearProbeConfig(**bad)
    method = LinearProbeConfig(c_grid=[1.0], search_steps=0)
    assert method.search_steps == 0


def test_empty_val_needs_a_single_c(tiny: Backbone) -> None:
    x, y = clusters(tiny.embed_dim, 4, seed=6)
    empty = FeatureSet("t", x[:0], y[:0])
    with pytest.raises(ValueError, match="val split"):
        probe(tiny).fit(FeatureSet("t", x, y), empty)
    stats = probe(tiny, c_grid=[1.0], search_steps=0).fit(FeatureSet("t", x, y), empty)
    assert stats["probe_c"] == 1.0

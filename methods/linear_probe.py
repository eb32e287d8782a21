"""Linear-probe CLIP: logistic regression on frozen CLIP image features.

The baseline of CLIP (Radford et al., ICML 2021, Appendix A.3: L-BFGS logistic regression,
L2 strength swept on the validation split) and of CoOp's few-shot figures (Zhou et al.,
IJCV 2022, Fig. 3 "Linear probe CLIP"), reproduced after ``KaiyangZhou/CoOp lpclip/``
(``feat_extractor.py``, ``linear_probe.py``, read at 61a9cd3):

* features: the frozen image tower's output on the **test** transform, one view per image,
  for the few-shot train split as well (``build_transform(cfg, is_train=False)``);
* the classifier: ``sklearn.linear_model.LogisticRegression(solver="lbfgs", penalty="l2",
  C=c, max_iter=1000)`` -- multinomial cross-entropy with an unpenalised intercept; scikit-learn
  minimises ``mean CE + ||W||² / (2·C·N)`` (N training samples), and so does :func:`solve`,
  with torch's L-BFGS (strong-Wolfe line search, history 10, gradient tolerance 1e-4 as
  scikit-learn's defaults) from zero weights;
* choosing C on the few-shot val split: val accuracy for ``C ∈ [1e6, 1e4, 1e2, 1, 1e-2,
  1e-4, 1e-6]`` (first best wins, so ties go to the weaker regularisation), then
  ``--num_step 8`` rounds of CoOp's bisection in log10(C) starting from
  ``[peak / 10, peak · 10]``: fit both ends, keep the better (ties: the left, smaller C),
  halve the interval towards it; the last kept end is the chosen C;
* the classifier evaluated on test is the one **fitted on the few-shot train split alone**
  with the chosen C (the reference never refits on train + val; val only picks C).

Deliberate changes:

* features are L2-normalised before the probe (``normalize=True``; CLIP's linear-probe
  text and CoOp's ``lpclip`` feed the raw embeddings -- set ``normalize=false`` for that);
  normalised features make one C grid fit every backbone's feature scale.
* torch L-BFGS in float64 instead of scikit-learn's scipy L-BFGS-B (no new dependency;
  same objective, so the same optimum up to the tolerance).
* fits are memoised per C within one search (the reference refits the kept end).
* multi-task: one linear head per task (rows of ``weight``/``bias`` per task, as
  :class:`~vlprompt.methods.common.TaskClasses`); ``fit`` solves one task at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods.base import Batch, FeatureSet
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import TaskClasses, cross_entropy, hold_backbone, image_features
from vlprompt.methods.options import LinearProbeConfig


@dataclass(frozen=True)
class Fit:
    """One solved logistic regression: ``logits = x @ weight.T + bias``."""

    c: float
    weight: Tensor  # (K, D) float64
    bias: Tensor  # (K,) float64
    iterations: int

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Top-1 accuracy in percent (argmax ties go to the lower class index, as scikit-learn)."""
        return float(100.0 * ((x @ self.weight.T + self.bias).argmax(dim=-1) == y).double().mean())


def solve(x: Tensor, y: Tensor, n_classes: int, c: float, *, max_iter: int = 1000, tol: float = 1e-4) -> Fit:
    """Multinomial logistic regression, L2 on the weights only, full-batch L-BFGS from zero.

    Minimises ``mean_i CE(x_i W^T + b, y_i) + ||W||² / (2 C N)`` -- scikit-learn's objective for
    ``LogisticRegression(C=c)``. ``x`` ``(N, D)`` and ``y`` ``(N,)``; solved in float64 on ``x``'s device.
    """
    x = x.double()
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=64 * torch.finfo(torch.float64).eps,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    penalty = 1.0 / (2.0 * c * len(y))

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + penalty * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return Fit(c, weight.detach(), bias.detach(), iterations)


def select_c(
    val_accuracy: Callable[[float], float], grid: Sequence[float], steps: int
) -> tuple[float, dict[float, float]]:
    """CoOp ``lpclip``'s search for C: grid, then ``steps`` rounds of bisection in log10(C).

    ``val_accuracy(c)`` fits on train with ``c`` and scores on val. Returns the chosen C and
    every C tried with its val accuracy.
    """
    tried: dict[float, float] = {}

    def score(c: float) -> float:
        if c not in tried:
            tried[c] = val_accuracy(c)
        return tried[c]

    accs = [score(c) for c in grid]
    chosen = grid[accs.index(max(accs))]
    lo, hi = math.log10(chosen) - 1.0, math.log10(chosen) + 1.0
    for _ in range(steps):
        c_lo, c_hi = 10.0**lo, 10.0**hi
        mid = 0.5 * (lo + hi)
        if score(c_lo) < score(c_hi):
            chosen, lo = c_hi, mid
        else:
            chosen, hi = c_lo, mid
    return chosen, tried


class LinearProbe(nn.Module):
    """One linear head per task on (normalised) frozen image features."""

    def __init__(self, backbone: Backbone, classes: TaskClasses, cfg: LinearProbeConfig) -> None:
        super().__init__()
        hold_backbone(self, backbone)
        self.classes = classes
        self.cfg = cfg
        n_rows, dim = len(classes.names), backbone.embed_dim
        self.weight = nn.Parameter(torch.zeros(n_rows, dim, device=backbone.device))  # (C_all, D)
        self.bias = nn.Parameter(torch.zeros(n_rows, device=backbone.device))  # (C_all,)

    def _inputs(self, features: Tensor) -> Tensor:
        x = features.float()
        return F.normalize(x, dim=-1) if self.cfg.normalize else x

    def logits(self, features: Tensor, task: str) -> Tensor:
        rows = self.classes.rows(task)
        x = self._inputs(features.to(self.weight.device))
        return x @ self.weight[rows].T + self.bias[rows]

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        return self.logits(image_features(self.backbone, batch), batch.task)

    def training_loss(self, batch: Batch) -> Tensor:
        """Unregularised batch cross-entropy (the protocol's SGD path; the loop uses :meth:`fit`)."""
        return cross_entropy(self.logits(image_features(self.backbone, batch), batch.task), batch.labels)

    def fit(self, train: FeatureSet, val: FeatureSet) -> dict[str, float]:
        """Choose C on ``val`` (CoOp ``lpclip`` search), keep the train-only fit with that C."""
        rows = self.classes.rows(train.task)
        if val.task != train.task:
            raise ValueError(f"linear_probe: train is task {train.task!r} but val is task {val.task!r}")
        n_classes = rows.stop - rows.start
        for split in (train, val):
            if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= n_classes):
                raise ValueError(f"linear_probe: labels of task {train.task!r} must lie in [0, {n_classes})")
        if not len(train):
            raise ValueError(f"linear_probe: task {train.task!r} has no training samples")
        device = self.weight.device
        x_train, y_train = self._inputs(train.features.to(device)), train.labels.to(device)
        x_val, y_val = self._inputs(val.features.to(device)), val.labels.to(device)
        if not len(val) and (len(self.cfg.c_grid) > 1 or self.cfg.search_steps > 0):
            raise ValueError(
                "linear_probe chooses C on the val split, which is empty; give a single value "
                "(method.c_grid=[1.0]) and method.search_steps=0"
            )
        fits: dict[float, Fit] = {}

        def val_accuracy(c: float) -> float:
            fits[c] = solve(x_train, y_train, n_classes, c, max_iter=self.cfg.max_iter, tol=self.cfg.tol)
            return fits[c].accuracy(x_val.double(), y_val) if len(val) else float("nan")

        chosen, tried = select_c(val_accuracy, self.cfg.c_grid, self.cfg.search_steps)
        best = fits[chosen]
        with torch.no_grad():
            self.weight[rows] = best.weight.to(self.weight.dtype)
            self.bias[rows] = best.bias.to(self.bias.dtype)
        stats = {
            "probe_c": chosen,
            "probe_log10_c": math.log10(chosen),
            "probe_val_acc": tried[chosen],
            "probe_train_acc": best.accuracy(x_train.double(), y_train),
            "probe_iterations": float(best.iterations),
            "probe_fits": float(len(fits)),
        }
        for c, acc in sorted(tried.items()):
            stats[f"probe_val_acc/log10c_{round(math.log10(c), 3) + 0.0:.3f}"] = acc
        return stats

    def learned_state(self) -> dict[str, Tensor]:
        return {"weight": self.weight.detach().clone(), "bias": self.bias.detach().clone()}


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: LinearProbeConfig) -> LinearProbe:
    """Zero-initialised heads for every class of every task; :meth:`LinearProbe.fit` solves them."""
    return LinearProbe(backbone, TaskClasses.of(tasks), cfg)

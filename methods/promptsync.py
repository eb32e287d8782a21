"""PromptSync -- class-aware prototype alignment and discrimination at test time (A. Khandelwal,
CVPR 2024 Workshops (LIMIT), "PromptSync: Bridging Domain Gaps in Vision-Language Models through
Class-Aware Prototype Alignment and Discrimination", arXiv 2404.07520).

No code is released and the paper's body could not be read: this follows the spec
``/work/shared/reference/PROMPTSYNC.md`` ([V] facts of the abstract, [R] reconstructions) on top of
PromptAlign (``methods/promptalign.py``, ``jameelhassan/PromptAlign`` ``trainers/prompt_align.py``),
whose episode it keeps: per test image, from the reset state, the original and 63 crop+flip views
(no AugMix), the lowest-entropy ``int(64 · 0.1) = 6`` chosen at the first step (S), AdamW with
torch's defaults (lr 4e-2 DG / 5e-4 fine-grained), one step, the original predicted with the
tuned prompts. The loss (§1.3) is::

    L = L_ent + β · L_PA + γ · L_PD
    L_ent = H( mean_{a ∈ S} p(·|a) )                                         (TPT / PromptAlign)
    w_c   = mean_{a ∈ {x} ∪ S} p(c|a), detached                              ([R] §1.3.1)
    L_PA  = Σ_c w_c Σ_{l ∈ blocks} ½·mean|μ_l(S) − μ̂_{l,c}| + ½·mean|σ²_l(S) − σ̂²_{l,c}|   (§1.3.2)
    L_PD  = −(1/C) Σ_c log softmax_c( cos(v̂_c, f_t(·; P)) / τ )               (§1.3.3)

``μ_l(S)``, ``σ²_l(S)``: PromptAlign's per-token statistics of block ``l``'s inputs over S;
``μ̂_{l,c}``, ``σ̂²_{l,c}``, ``v̂_c`` (normalised): the per-class rows of the statistics file
(``methods/source_stats.py``; ``experiments/source_stats.py`` makes it with the reset prompts).

**The reusable discrimination step** (§3 step 8). L_PD depends on the prompts and the fixed
prototypes only, never on the image, and every episode starts from the same state P₀, so:
``discrimination="cached"`` (default) runs ``discrimination_steps`` M AdamW steps of γ·L_PD from
P₀ once per task, keeps P₀* and resets every image to it (each image then pays L_ent + β·L_PA,
PromptAlign's cost); ``"joint"`` keeps γ·L_PD in each image's loss, and since its gradient at P₀ is
the same for every image, computes it (and its value) once per task and adds it to each image's
first-step gradient (later steps, at other prompts, compute it afresh). Both caches are keyed by
the task and by P₀ itself: new starting prompts recompute them.

Every [R] choice is an option of ``PromptSyncConfig`` with the spec's default (§6): ``weights_over``
("original_and_selected" | "selected"), ``detach_weights`` (True), ``top_k_classes`` (0: all),
``align_weight`` β (100/3, PromptAlign's), ``align_layers`` ([0, 1]), ``discrimination_weight`` γ
(1), ``discrimination_tau`` τ (0.01), ``symmetric`` (False), ``discrimination`` ("cached"),
``discrimination_steps`` M (1). β = γ = 0 is TPT on MaPLe (PromptAlign with β = 0).

Deliberate changes (beyond PromptAlign's, which all hold here): the cached P₀* is a second
reset state -- the statistics are still checked against P₀, the prompts they were made with;
``predict`` without views does no tuning and uses the current prompts (not P₀*); the L_PA of C
classes is computed in chunks of classes (the same sum, bounded memory); ``top_k_classes`` drops the
smallest terms without renormalising the kept weights; ``images_per_step`` test images may be
adapted at once, as PromptAlign's (every term is computed per image copy: the weights, the
distances, the cached gradient added to each copy). Trainable per image on ViT-B/16 (depth 3,
2 ctx): 1,185,024.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods import maple
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import cosine_logits, observed_image_features
from vlprompt.methods.options import PromptSyncConfig
from vlprompt.methods.promptalign import (
    Tower,
    build_prompt,
    read_stats,
    same_tensors,
    select_views,
    stats_inputs,
    token_statistics,
    tune_each,
    verify_start,
)
from vlprompt.methods.source_stats import SourceStats, fingerprint
from vlprompt.methods.test_time import average_entropy_stacked, take

__all__ = ["PromptSync", "build", "class_distances", "discrimination_loss", "prototype_alignment_loss"]

CHUNK = 64  # classes per chunk of the L_PA distances


# ---------------------------------------------------------------- the objective
def class_distances(tokens: Sequence[Tensor], class_mean: Tensor, class_var: Tensor) -> Tensor:
    """``D_c = Σ_l ½·mean|μ_l − μ̂_{l,c}| + ½·mean|σ²_l − σ̂²_{l,c}|`` for every class: ``(C,)``.
    ``tokens[l]`` ``(N, T, W)``: block ``l``'s inputs over the kept images; ``class_mean`` /
    ``class_var`` ``(C, L, T, W)``. Chunked over classes: C = 1000 is 1.2 G values. G images
    adapted at once: ``(G, N, T, W)`` tokens give ``(G, C)``, against shared ``(C, L, T, W)`` rows or
    each image's own ``(G, C, L, T, W)`` (its top-k classes)."""
    stats = [token_statistics(x) for x in tokens]
    out = []
    for lo in range(0, class_mean.shape[-4], CHUNK):
        mean_c, var_c = class_mean[..., lo : lo + CHUNK, :, :, :], class_var[..., lo : lo + CHUNK, :, :, :]
        d = class_mean.new_zeros(())
        for block, (mean, var) in enumerate(stats):
            d = d + 0.5 * (mean.unsqueeze(-3) - mean_c[..., block, :, :]).abs().mean(dim=(-2, -1))
            d = d + 0.5 * (var.unsqueeze(-3) - var_c[..., block, :, :]).abs().mean(dim=(-2, -1))
        out.append(d)
    return torch.cat(out, dim=-1)


def prototype_alignment_loss(
    tokens: Sequence[Tensor], class_mean: Tensor, class_var: Tensor, weights: Tensor, top_k: int = 0
) -> Tensor:
    """``L_PA = Σ_c w_c · D_c`` (:func:`class_distances`); with ``top_k`` > 0 over the ``top_k``
    classes of largest ``w`` only (their weights as they are). ``weights`` ``(G, C)`` and ``(G, N,
    T, W)`` tokens: each of G images' own, ``(G,)``."""
    if 0 < top_k < weights.shape[-1]:
        index = weights.detach().topk(top_k, dim=-1).indices
        class_mean, class_var, weights = class_mean[index], class_var[index], weights.gather(-1, index)
    return (weights * class_distances(tokens, class_mean, class_var)).sum(dim=-1)


def discrimination_loss(prototypes: Tensor, text: Tensor, tau: float, symmetric: bool = False) -> Tensor:
    """``L_PD``: the cross-entropy of each class prototype ``(C, D)`` against the class features
    ``text`` ``(C, D)``, cosine / τ, its own class the target, mean over classes; ``symmetric``:
    CLIP's ½ (prototype → text + text → prototype). ``(G, C, D)`` text (G prompt copies): ``(G,)``."""
    logits = F.normalize(prototypes, dim=-1) @ F.normalize(text, dim=-1).mT / tau
    loss = _mean_cross_entropy(logits)
    if symmetric:
        loss = 0.5 * (loss + _mean_cross_entropy(logits.mT))
    return loss


def _mean_cross_entropy(logits: Tensor) -> Tensor:
    """The mean over rows of the cross-entropy of row ``c`` of ``logits`` ``(..., C, C)`` for class ``c``."""
    n = logits.shape[-1]
    target = torch.arange(n, device=logits.device).repeat(logits[..., 0, 0].numel())
    rows = F.cross_entropy(logits.reshape(-1, n), target, reduction="none")
    return rows.view(logits.shape[:-1]).mean(dim=-1)


# ---------------------------------------------------------------- the method
class PromptSync(nn.Module):
    """MaPLe's prompts, tuned afresh on every test image's views inside :meth:`predict`."""

    def __init__(
        self,
        prompt: maple.MaPLe,
        cfg: PromptSyncConfig,
        stats: SourceStats | None,
        tasks: Mapping[str, Sequence[str]],
    ) -> None:
        super().__init__()
        maple.hold(self, prompt)
        self.cfg = cfg
        self.steps = cfg.steps
        self.images_per_step = cfg.images_per_step
        self.align_layers = tuple(cfg.align_layers)
        self.stats = stats
        self._verified: list[Tensor] | None = None
        self._cache: dict[str, tuple[list[Tensor], list[Tensor], float]] = {}  # task -> P₀, P₀* | ∇, L_PD(P₀)
        self.prototypes: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # task -> class mean, var, v̂
        if stats is not None:
            rows, device = stats.class_rows, self.backbone.device
            names = {c: i for i, c in enumerate(dict.fromkeys(c for cs in tasks.values() for c in cs))}
            for task, classes in tasks.items():
                index = torch.tensor([names[c] for c in classes])
                mean, var, emb = (
                    rows[k][index].float().to(device) for k in ("class_mean", "class_var", "class_embedding")
                )
                self.prototypes[task] = (mean, var, F.normalize(emb, dim=-1))

    # ------------------------------------------------------------ MaPLe's forward, observed
    def text_features(self, task: str) -> Tensor:
        return maple.held(self).text_features(task)

    def image_features(self, images: Tensor) -> Tensor:
        """Image embeddings ``(N, D)`` with the current prompts."""
        return maple.held(self).image_features(images)

    def observe(self, images: Tensor, blocks: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """Image embeddings ``(N, D)`` with the current prompts, and the input tokens of ``blocks``."""
        return observed_image_features(self.backbone, maple.held(self).vision_prompts(), images, blocks)

    def stats_fingerprint(self) -> dict[str, str]:
        """The fingerprint a statistics file made from this model, in its current state, records."""
        return fingerprint(self.backbone, self.learned_state(), self.align_layers)

    def logits(self, task: str, images: Tensor) -> Tensor:
        """Cosine logits ``(N, n_cls)`` of ``images`` under the current prompts."""
        features = maple.held(self).image_features(images.to(self.backbone.device))
        return cosine_logits(features, self.text_features(task), self.backbone.logit_scale)

    # ------------------------------------------------------------ the terms
    def class_weights(
        self, kept_logits: Tensor, original_logits: Tensor | None = None, add_original: Tensor | None = None
    ) -> Tensor:
        """``w`` ``(..., C)``: the mean softmax over the kept images' logits ``(..., k, C)`` -- and over
        the original's ``(..., C)`` too where ``add_original`` ``(...)`` is True (it is not among the
        kept); detached by default."""
        p = kept_logits.softmax(dim=-1)
        total, count = p.sum(dim=-2), p.new_full((), p.shape[-2])
        if original_logits is not None:
            add = add_original.to(p.dtype).unsqueeze(-1)
            total, count = total + add * original_logits.softmax(dim=-1), count + add
        w = total / count
        return w.detach() if self.cfg.detach_weights else w

    def weights(self, tower: Tower, images: Tensor, index: Tensor, logits: Tensor, text: Tensor) -> Tensor:
        """:meth:`class_weights` of one test image (``images`` original first, ``index`` the kept,
        ``logits`` theirs),
        or of G at once (``(G, 1 + V, ...)``, ``(G, k)``): ``weights_over`` says whether the original
        counts, and it is added only where the selection did not keep it already."""
        add = ~(index == 0).any(dim=-1)
        if self.cfg.weights_over != "original_and_selected" or not bool(add.any()):
            return self.class_weights(logits)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.detach_weights):
            features = tower.image_features(images[..., :1, :, :, :])
            original = cosine_logits(features, text, self.backbone.logit_scale)[..., 0, :]
        return self.class_weights(logits, original, add)

    def discrimination(self, task: str, text: Tensor) -> Tensor:
        """``L_PD`` of ``task``'s prototypes against its class features ``text`` (``(G, C, D)``: ``(G,)``)."""
        return discrimination_loss(
            self.prototypes[task][2], text, self.cfg.discrimination_tau, self.cfg.symmetric
        )

    def loss(self, tower: Tower, task: str, images: Tensor, index: Tensor, text: Tensor) -> Tensor:
        """``L_ent + β·L_PA`` of the kept images ``index`` of ``images`` (original first), under
        ``tower``'s prompts (this method's, or G copies': ``(G, 1 + V, ...)`` images give ``(G,)``)."""
        scale = self.backbone.logit_scale
        kept = take(images, index)
        if self.cfg.align_weight == 0:
            return average_entropy_stacked(cosine_logits(tower.image_features(kept), text, scale))
        features, tokens = tower.observe(kept, self.align_layers)
        logits = cosine_logits(features, text, scale)
        mean, var, _ = self.prototypes[task]
        align = prototype_alignment_loss(
            [tokens[b] for b in self.align_layers],
            mean,
            var,
            self.weights(tower, images, index, logits, text),
            self.cfg.top_k_classes,
        )
        return average_entropy_stacked(logits) + self.cfg.align_weight * align

    # ------------------------------------------------------------ one test image, or G at once
    def adapt(self, task: str, images: Tensor) -> list[float]:
        """Tune the prompts in place, from their current values, on one test image's ``images``
        ``(1 + V, C, H, W)`` (original first): ``steps`` AdamW steps of ``L_ent + β·L_PA``
        (+ γ·L_PD in ``joint`` mode, its first-step gradient the task's cached one). A fresh
        optimiser each call. Returns the loss before each step."""
        return self.tune(self, [p for p in self.parameters() if p.requires_grad], task, images)

    def tune(self, tower: Tower, params: Sequence[Tensor], task: str, images: Tensor) -> list[float]:
        """:meth:`adapt`'s steps on ``params``, the tensors ``tower``'s prompts are made of: this
        method's own, or the stacked copies of G images (``images`` ``(G, 1 + V, ...)``; the
        losses are summed over them, the cached γ·L_PD gradient added to each copy's)."""
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr)
        joint = self.cfg.discrimination == "joint" and self.cfg.discrimination_weight > 0
        gamma, copies = self.cfg.discrimination_weight, images.shape[0] if images.dim() == 5 else 1
        index, losses = None, []
        with torch.enable_grad():
            for step in range(self.steps):
                text = tower.text_features(task)
                if index is None:
                    index, _ = select_views(tower, images, text, self.cfg.selection_p)
                loss = self.loss(tower, task, images, index, text)
                if joint and step > 0:
                    loss = loss + gamma * self.discrimination(task, text)
                loss = loss.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = float(loss.detach())
                if joint and step == 0:
                    _, grads, pd = self._cached(task, self._discrimination_gradient)
                    add_gradients(params, grads)
                    value += copies * pd
                optimizer.step()
                losses.append(value)
        return losses

    # ------------------------------------------------------------ the reusable discrimination step
    def _cached(self, task: str, make) -> tuple[list[Tensor], list[Tensor], float]:
        """The task's cache entry, (re)made by ``make(task)`` unless made from the current prompts."""
        start = [p.detach() for p in self.parameters()]
        entry = self._cache.get(task)
        if entry is None or not same_tensors(start, entry[0]):
            entry = ([p.clone() for p in start], *make(task))
            self._cache[task] = entry
        return entry

    def _discrimination_gradient(self, task: str) -> tuple[list[Tensor], float]:
        """∇ γ·L_PD at the current prompts (one per trainable tensor), and γ·L_PD."""
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.cfg.discrimination_weight * self.discrimination(task, self.text_features(task))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [
            torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
        ], float(loss.detach())

    def _discriminated_start(self, task: str) -> tuple[list[Tensor], float]:
        """P₀*: ``discrimination_steps`` AdamW steps of γ·L_PD from the current prompts (which are
        restored), and γ·L_PD at P₀."""
        params = list(self.parameters())
        saved = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=self.cfg.lr)
        first = None
        with torch.enable_grad():
            for _ in range(self.cfg.discrimination_steps):
                loss = self.cfg.discrimination_weight * self.discrimination(task, self.text_features(task))
                first = float(loss.detach()) if first is None else first
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            done = [p.detach().clone() for p in params]
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None
        return done, first or 0.0

    def discriminated_start(self, task: str) -> list[Tensor] | None:
        """The reset state of ``task``'s images: the cached P₀* (``cached`` mode, γ > 0, M > 0),
        else None (the current prompts)."""
        cfg = self.cfg
        if cfg.discrimination != "cached" or cfg.discrimination_weight == 0 or cfg.discrimination_steps == 0:
            return None
        return self._cached(task, self._discriminated_start)[1]

    def _require_stats(self) -> None:
        """The statistics exist when β or γ is above 0, and were taken with the current prompts (P₀)."""
        if not (self.cfg.align_weight > 0 and self.steps > 0) and self.cfg.discrimination_weight == 0:
            return
        if self.stats is None:
            raise ValueError(
                f"promptsync: align_weight={self.cfg.align_weight:g} / discrimination_weight="
                f"{self.cfg.discrimination_weight:g} read per-class source statistics, but "
                "method.source_stats is empty: make the file with `python experiments/source_stats.py "
                "--config CONFIG` and set method.source_stats to it (or both 0: TPT on MaPLe)"
            )
        verify_start(self)

    def predict(self, batch: Batch) -> Tensor:
        """Logits ``(B, n_cls)`` of the originals; each sample tuned on its own ``Batch.views``
        from the task's reset state (P₀*, or the current prompts). Without views: MaPLe's
        prediction with the current prompts. The prompts are unchanged by the call, bit for bit."""
        if getattr(batch, "views", None) is None:
            return maple.held(self).predict(batch)
        self._require_stats()
        return tune_each(self, "promptsync", batch, self.discriminated_start(batch.task))

    def training_loss(self, batch: Batch) -> Tensor:
        """MaPLe's cross-entropy (the ``test_time`` protocol trains nothing)."""
        return maple.held(self).training_loss(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """The starting prompts P₀: exactly a MaPLe checkpoint's keys and shapes."""
        return maple.held(self).learned_state()

    def run_inputs(self) -> dict[str, str]:
        """The statistics file it read and its fingerprint, logged with the run."""
        return stats_inputs(self.stats)


def add_gradients(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """``p.grad += g`` for each pair (``p.grad`` None counts as 0); ``g`` is broadcast over the
    leading axis of stacked copies (every copy starts where the gradient was taken)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.expand_as(p).clone() if p.grad is None else p.grad + g


# ---------------------------------------------------------------- building it
def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: PromptSyncConfig) -> PromptSync:
    """MaPLe for ``tasks``, started from ``init_state``, with the per-class rows of every class the
    tasks classify (a file lacking one is refused, naming it)."""
    classes = list(dict.fromkeys(c for names in tasks.values() for c in names))
    stats = read_stats(backbone, cfg, "promptsync", classes=classes)
    return PromptSync(build_prompt(backbone, tasks, cfg, "promptsync"), cfg, stats, tasks)

"""TPT -- Test-time Prompt Tuning (Shu, Nie, Huang, Yu, Goldstein, Anandkumar, Xiao; NeurIPS 2022,
"Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models", arXiv 2209.07511).

For every test image, a CoOp context is tuned on that image alone, without its label: the
original and N augmented views are classified, the ``ρ`` fraction with the lowest prediction
entropy is kept (confidence selection), and the entropy of their *average* prediction is
minimised (paper Eq. 3-4, ``H(p̃) = −Σ_c p̃_c log p̃_c`` with ``p̃ = 1/(ρN) Σ_selected p``);
the original is then classified with the tuned context, and the context is reset.

Matches ``azshue/TPT tpt_classification.py`` (``test_time_tuning``, ``test_time_adapt_eval``) and
``clip/custom_clip.py`` (``ClipTestTimeTuning``, ``PromptLearner``): context initialised from
``"a photo of a"`` (4 tokens), class token at the end; a batch of ``1 + 63`` images (the original
first, then the views of :mod:`vlprompt.datasets.views`); ``int(64 · 0.1) = 6`` lowest-entropy
images kept, counted over that whole batch -- the original competes like a view -- and chosen once,
at the first step (``select_confident_samples``); loss ``avg_entropy`` (``logsumexp`` of the
log-probabilities − ``log N``, clamped at the smallest float); ``AdamW(ctx, lr=5e-3)`` with torch's
defaults (weight decay 0.01), one step; context and optimiser state reset before every test image;
the prediction is the original's logits with the tuned context. TPT+CoOp (``init_state``) starts
from a trained CoOp context instead of the words.

Built on CoOp by composition (``coop.build``, ``coop.hold``): the prompt assembly, text encoding,
cached evaluation and cross-entropy are CoOp's, not re-typed. The CoOp is *held* like the backbone
and its one parameter ``ctx`` is registered here, so TPT's ``state_dict``/``learned_state`` are
exactly a generic CoOp checkpoint (``{"ctx"}``) in both directions.

Deliberate changes:

* fp32 context, losses and AdamW state. The reference keeps CLIP and ``ctx`` in fp16, runs under
  AMP autocast with ``GradScaler(init_scale=1000)`` (which would skip a step on inf gradients; in
  fp32 none is skipped). The backbone may still run in fp16/bf16 (``load_backbone(precision=...)``).
* image features of the original and the views are computed once per image, before tuning (the
  reference re-runs the frozen image tower at every step and for the final prediction: equal).
* ties in the entropy ranking go to the earlier image (stable sort; the reference's is unstable).
* ``predict`` without ``Batch.views`` does no tuning: CoOp's prediction with the current context
  (cached features work there). With views, every sample of the batch is tuned independently from
  the same starting context (the reference's batch is one image).
* ``training_loss`` is CoOp's cross-entropy rather than an error: the ``test_time`` protocol does
  not train, but a training protocol trains the context first (TPT+CoOp in one run; without views
  the evaluation is then plain CoOp), and ``predict`` tunes from whatever the context is when it is
  called, restoring it afterwards.
* ``init_state`` reads a vlprompt ``learned_state.pt`` (``{"ctx"}``) or a CoOp/Dassl checkpoint
  (``{"state_dict": {"ctx"}}``, the reference's ``--load``); its full shape must match (the
  reference asserts only ``n_ctx``), with an error naming the file.
* word init counts tokens, not words (same for ``"a photo of a"``); ``steps=0`` is allowed
  (prediction with the initial context: CLIP with ``"<ctx_init> {}."``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from vlprompt.methods import coop
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import cosine_logits, image_features, read_saved_state
from vlprompt.methods.options import TPTConfig
from vlprompt.methods.test_time import (
    average_entropy,
    average_entropy_stacked,
    pick,
    select_confident,
    select_confident_stacked,
    stacked_copies,
)

__all__ = ["TPT", "average_entropy", "build", "load_context", "select_confident"]


# ---------------------------------------------------------------- the method
class TPT(nn.Module):
    """A CoOp context, tuned afresh on every test image's views inside :meth:`predict`."""

    def __init__(self, prompt: coop.CoOp, cfg: TPTConfig) -> None:
        super().__init__()
        coop.hold(self, prompt)  # self.coop (held), its self.ctx and self.prompts (registered)
        self.selection_p = cfg.selection_p
        self.lr = cfg.lr
        self.steps = cfg.steps
        self.images_per_step = cfg.images_per_step

    def logits(self, task: str, features: Tensor) -> Tensor:
        """``(N, n_cls)`` logits of image embeddings ``features`` with the current context."""
        return cosine_logits(features, coop.held(self).text_features(task), self.backbone.logit_scale)

    def adapt(self, task: str, features: Tensor) -> list[float]:
        """Tune ``ctx`` in place, from its current value, on one image's embeddings ``features``
        ``(1 + V, D)`` (original first, then its views): ``steps`` AdamW steps on the average
        entropy of the images selected at the first step. A fresh optimiser each call. Returns the
        loss before each step."""
        optimizer = torch.optim.AdamW([self.ctx], lr=self.lr)
        selected: Tensor | None = None
        losses = []
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.logits(task, features)
                if selected is None:
                    selected = select_confident(logits.detach(), self.selection_p)
                loss = average_entropy(logits[selected])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        return losses

    def stacked_logits(self, task: str, ctx: Tensor, features: Tensor) -> Tensor:
        """``(G, N, n_cls)`` logits of each image's embeddings ``features`` ``(G, N, D)`` under its
        own context ``ctx[g]`` ``(G, n_ctx, W)``: CLIP's cosine logits, one classifier per image."""
        text = coop.held(self).prompts.text_features_stacked(ctx, task)
        return cosine_logits(features, text, self.backbone.logit_scale)

    def adapt_stacked(self, task: str, features: Tensor) -> Tensor:
        """The tuned contexts ``(G, n_ctx, W)`` of ``G`` images at once (``methods/test_time.py``):
        ``features`` ``(G, 1 + V, D)``, each image tuned from the current ``ctx`` exactly as
        :meth:`adapt` tunes it alone -- the per-image losses are summed, so every copy gets its own
        gradient, and AdamW is element-wise."""
        ctx = stacked_copies(self.ctx, features.shape[0])
        optimizer = torch.optim.AdamW([ctx], lr=self.lr)
        selected: Tensor | None = None
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.stacked_logits(task, ctx, features)
                if selected is None:
                    selected = select_confident_stacked(logits.detach(), self.selection_p)
                loss = average_entropy_stacked(pick(logits, selected)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return ctx.detach()

    def _predict_stacked(self, batch: Batch, originals: Tensor, views: Tensor) -> Tensor:
        """Logits of the originals, ``images_per_step`` images adapted together at a time."""
        out = []
        for lo in range(0, len(batch), self.images_per_step):
            hi = min(lo + self.images_per_step, len(batch))
            with torch.no_grad():
                flat = views[lo:hi].flatten(0, 1).to(self.backbone.device)
                seen = self.backbone.encode_image(flat).view(hi - lo, views.shape[1], -1)
            features = torch.cat([originals[lo:hi, None], seen.to(originals.dtype)], dim=1)
            ctx = self.adapt_stacked(batch.task, features)  # steps=0: the reset context, G times
            with torch.no_grad():
                out.append(self.stacked_logits(batch.task, ctx, originals[lo:hi, None])[:, 0])
        return torch.cat(out)

    def predict(self, batch: Batch) -> Tensor:
        """Logits ``(B, n_cls)`` of the originals; each sample tuned on its own ``Batch.views``.

        Without views: CoOp's prediction with the current context, no tuning. The context (and
        its ``.grad``) is the same after the call as before it, bit for bit.
        """
        views = getattr(batch, "views", None)
        if views is None:
            return coop.held(self).predict(batch)
        if views.dim() != 5 or views.shape[0] != len(batch):
            raise ValueError(
                f"tpt: Batch.views must be (B, V, C, H, W) with B = {len(batch)} samples, "
                f"got {tuple(views.shape)}"
            )
        originals = image_features(self.backbone, batch)  # (B, D), no grad
        if self.images_per_step > 1:
            return self._predict_stacked(batch, originals, views)
        start, grad = self.ctx.detach().clone(), self.ctx.grad
        out = []
        try:
            for b in range(len(batch)):
                with torch.no_grad():
                    self.ctx.copy_(start)
                if self.steps > 0:
                    with torch.no_grad():
                        seen = self.backbone.encode_image(views[b].to(self.backbone.device))
                    self.adapt(batch.task, torch.cat([originals[b : b + 1], seen.to(originals.dtype)]))
                with torch.no_grad():
                    out.append(self.logits(batch.task, originals[b : b + 1]))
        finally:
            with torch.no_grad():
                self.ctx.copy_(start)
            self.ctx.grad = grad
        return torch.cat(out)

    def training_loss(self, batch: Batch) -> Tensor:
        """CoOp's cross-entropy (training the starting context; the ``test_time`` protocol does not)."""
        return coop.held(self).training_loss(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """The starting context ``{"ctx"}``: the same key and shape as a generic CoOp checkpoint."""
        return coop.held(self).learned_state()


def load_context(path: str, shape: Sequence[int]) -> Tensor:
    """The ``ctx`` tensor saved at ``path`` (``{"ctx"}`` or ``{"state_dict": {"ctx"}}``), fp32 on the
    CPU, after checking it has ``shape``; errors name the file."""
    file = Path(path).expanduser()
    state = read_saved_state(path, "tpt init_state")
    if isinstance(state, dict) and "ctx" not in state and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a CoOp/Dassl checkpoint (prompt_learner/model.pth.tar-N)
    ctx = state.get("ctx") if isinstance(state, dict) else None
    if not isinstance(ctx, Tensor):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"tpt init_state: {file} holds no 'ctx' tensor (found {keys}); "
            "expected the learned_state.pt of a CoOp run"
        )
    if tuple(ctx.shape) != tuple(shape):
        raise ValueError(
            f"tpt init_state: the context in {file} has shape {tuple(ctx.shape)}, but this TPT's is "
            f"{tuple(shape)} (n_ctx x text width); it needs a generic (not class-specific) context "
            "with the same number of tokens: set method.ctx_init / method.n_ctx to match"
        )
    return ctx.float()


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: TPTConfig) -> TPT:
    """CoOp's prompt for ``tasks`` with ``ctx_init``/``n_ctx``, optionally started from ``init_state``."""
    prompt = coop.build(
        backbone, tasks, coop.CoOpConfig(n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init), method="tpt"
    )
    if cfg.init_state:
        ctx = load_context(cfg.init_state, prompt.ctx.shape)
        with torch.no_grad():
            prompt.ctx.copy_(ctx)
    return TPT(prompt, cfg)

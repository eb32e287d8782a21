"""PromptSRC -- Prompting with Self-Regulating Constraints (Khattak, Wasim, Naseer, Khan, Yang, Khan;
ICCV 2023, "Self-regulating Prompts: Foundational Model Adaptation without Forgetting", arXiv
2307.06948).

IVLP's deep prompts in both towers (4 + 4 tokens, depth 9/9: 46,080 parameters on ViT-B/16), kept
close to the frozen CLIP they are learned on by three self-consistency terms, and averaged over
the epochs of training. For a batch of images ``x`` with labels ``y`` of a task with C classes::

    L = CE(z, y) + λ_text · L1(norm t, norm t̃) + λ_image · L1(norm f, norm f̃) + λ_logit · KL(z̃ ‖ z)

* ``t`` (C, D): the prompted text features; ``t̃``: the frozen text tower's features of the class
  names in every template of ``text_templates``, averaged over the templates (raw features, as
  the reference; ``normalise_templates`` averages normalised ones) -- "textual diversity";
* ``f`` (B, D): the prompted image features; ``f̃``: the *un-prompted* image tower's, of the same
  augmented images (computed per batch: the image tower is prompted, so features cannot be cached);
* ``z = s · norm f @ norm tᵀ`` the prompted logits, ``z̃ = s · norm f̃ @ norm t̃ᵀ`` the frozen
  zero-shot logits (``s`` CLIP's logit scale);
* L1 is the mean absolute difference over all elements (``F.l1_loss(reduction="mean")``); the
  logit term is ``F.kl_div(log_softmax(z), log_softmax(z̃), reduction="sum", log_target=True) / (B·C)``
  -- i.e. ``KL(softmax z̃ ‖ softmax z)``, zero-shot as the target -- with temperature 1.

**Gaussian prompt aggregation (GPA).** After epoch ``e = 1 .. E`` the prompts are added to a running
aggregate with weight ``w_e = N(e; μ, σ) / Σ_e' N(e'; μ, σ)`` (:func:`~vlprompt.methods.options.
gpa_weights`); after the last epoch the aggregate replaces the prompts, so evaluation and
``learned_state`` use it. The loop tells the method of epoch ends (``EpochHooks``, capability
``epoch_hooks``); the aggregate is a persistent buffer, so checkpoints hold it and a resumed run
aggregates as an unbroken one. μ/σ that put no weight on any epoch are refused with the config.

Matches ``muzairkhattak/PromptSRC`` ``trainers/promptsrc.py`` (commit bb95c77; the same code as
``zhengli97/PromptKD`` ``trainers/promptsrc.py`` in every part cited): the frozen text targets
of ``VLPromptLearner`` (lines 113-128: ``encode_text`` of every template of ``trainers/imagenet_templates.py``
``IMAGENET_TEMPLATES``, mean over templates, normalised at line 200); ``CustomCLIP.forward``
(lines 185-211: zero-shot image features and logits under ``no_grad``); the losses of
``forward_backward`` (lines 297-313: ``F.l1_loss(..., reduction='mean')`` weighted by
``TEXT_LOSS_WEIGHT`` 25 and ``IMAGE_LOSS_WEIGHT`` 10, ``F.kl_div(..., reduction='sum',
log_target=True) * (1 * 1) / logits.numel()`` unweighted); GPA (``get_gauss`` lines 358-360, the
weights over epochs 1 .. ``MAX_EPOCH`` normalised at lines 265-270, accumulated after each epoch's
last batch at lines 320-330, loaded after the last epoch at lines 332-335); the defaults of
``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml`` (``GPA_MEAN`` 15, ``GPA_STD`` 1).
The prompts and their forward are IVLP's (:mod:`~vlprompt.methods.ivlp`, held by composition):
a PromptSRC state is an IVLP state and loads into ``ivlp`` with the same options (PromptKD's
reference teacher is a PromptSRC model: ``teacher_method`` ``promptsrc`` or ``ivlp``).

Templates: the reference's 60 (:data:`IMAGENET60`) are 60 of the 80 of CLIP's ImageNet notebook,
taken from open_clip's ``OPENAI_IMAGENET_TEMPLATES`` rather than re-typed: its first 60, with
``"a photo of a {}."`` (its 40th) moved to the front, which is the reference's list in its order.

Deliberate changes:

* fp32 prompts, features and logits (the reference trains in fp16: its zero-shot logits use
  ``fixed_embeddings.half()``, and its GPA weights fp16 tensors).
* GPA aggregates the learned prompts only; the reference weights and sums the *whole* state dict,
  frozen CLIP weights included (Σ w_e = 1, so they come back up to fp16 rounding).
* the un-prompted image tower is the same frozen backbone without hooks (the reference loads a
  second CLIP copy, ``ZS_image_encoder``), and the text targets are computed on the first
  training step, not at build time: a method built only to be evaluated on other classes
  (novel classes, transfer targets) never encodes the C × 60 template sentences.
* ``logit_loss_weight`` (the reference's implicit 1), ``gpa`` (off: the last epoch's prompts) and
  ``normalise_templates`` are options; the logit temperature stays the reference's 1.
* the IVLP changes (:mod:`~vlprompt.methods.ivlp`): depth capped at a tower's blocks, random-init
  order, text prompts cut at their longest EOS; multi-task: one set of prompts for every task, a
  batch's terms over its task's classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn

from vlprompt.methods import ivlp
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import TaskClasses, cosine_logits, cross_entropy, require_images
from vlprompt.methods.options import PromptSRCConfig, gpa_weights

_OPENAI = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
IMAGENET60: tuple[str, ...] = (_OPENAI[39], *_OPENAI[:39], *_OPENAI[40:60])
"""The reference's ``IMAGENET_TEMPLATES`` (60 sentences with one ``{}``), in its order."""

AGGREGATE = "gpa_aggregate"
"""The persistent buffer holding the running GPA sum (all prompts, flattened in parameter order)."""


def template_targets(
    backbone: Backbone, names: Sequence[str], templates: Sequence[str], normalise_each: bool = False
) -> Tensor:
    """``t̃`` ``(C, D)``: the frozen text tower's features of every name in every template, averaged
    over the templates (each normalised first with ``normalise_each``), then L2-normalised."""
    sentences = [template.replace("{}", name) for template in templates for name in names]
    with torch.no_grad():
        features = backbone.encode_text(backbone.tokenize(sentences)).float()
    features = features.view(len(templates), len(names), -1)
    if normalise_each:
        features = F.normalize(features, dim=-1)
    return F.normalize(features.mean(dim=0), dim=-1)


def l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference over all elements (the reference's ``F.l1_loss(reduction='mean')``)."""
    return F.l1_loss(a, b, reduction="mean")


def logit_consistency(logits: Tensor, zero_shot_logits: Tensor) -> Tensor:
    """``KL(softmax z̃ ‖ softmax z)`` summed over batch and classes, divided by ``B · C`` (T = 1)."""
    return (
        F.kl_div(
            F.log_softmax(logits.float(), dim=1),
            F.log_softmax(zero_shot_logits.float(), dim=1),
            reduction="sum",
            log_target=True,
        )
        / logits.numel()
    )


def _forgive_missing_aggregate(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict(learned_state())`` leaves the GPA aggregate as it is: a learned state holds
    the prompts (which the aggregate has become), not the training-time sum (checkpoints do)."""
    for key in [k for k in incompatible.missing_keys if k == AGGREGATE or k.endswith("." + AGGREGATE)]:
        incompatible.missing_keys.remove(key)


class PromptSRC(nn.Module):
    """IVLP's prompts (held, registered under IVLP's names), the frozen targets, the GPA aggregate."""

    def __init__(self, prompts: ivlp.IVLP, classes: TaskClasses, cfg: PromptSRCConfig) -> None:
        super().__init__()
        ivlp.hold(self, prompts)  # self.ivlp (held); self.ctx, text_deep, vision_prompts, towers
        self.classes = classes
        self.cfg = cfg
        self.templates = tuple(cfg.text_templates) or IMAGENET60
        self.register_buffer("targets", None, persistent=False)  # (C, D) t̃, on the first training step
        size = sum(p.numel() for p in self.parameters())
        self.register_buffer(AGGREGATE, torch.zeros(size, device=self.backbone.device))
        self.register_load_state_dict_post_hook(_forgive_missing_aggregate)

    def text_features(self, task: str) -> Tensor:
        """The prompted text features ``(n_cls, D)`` of ``task`` (not normalised)."""
        return ivlp.held(self).text_features(task)

    def text_targets(self, task: str) -> Tensor:
        """``t̃`` of ``task``'s classes; every task's computed once, when first needed."""
        if self.targets is None:
            names = self.classes.names
            self.targets = template_targets(
                self.backbone, names, self.templates, self.cfg.normalise_templates
            )
        return self.targets[self.classes.rows(task)]

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """The four terms, unweighted: ``ce``, ``text`` and ``image`` (L1s), ``logits`` (KL)."""
        images = require_images("promptsrc", batch)
        prompts = ivlp.held(self)
        text = prompts.text_features(batch.task)
        image = prompts.image_features(images)
        logits = cosine_logits(image, text, self.backbone.logit_scale)
        targets = self.text_targets(batch.task)
        with torch.no_grad():
            frozen = F.normalize(self.backbone.encode_image(images.to(self.backbone.device)).float(), dim=-1)
            zero_shot = self.backbone.logit_scale * frozen @ targets.T
        return {
            "ce": cross_entropy(logits, batch.labels),
            "text": l1(F.normalize(text.float(), dim=-1), targets),
            "image": l1(F.normalize(image.float(), dim=-1), frozen),
            "logits": logit_consistency(logits, zero_shot),
        }

    def training_loss(self, batch: Batch) -> Tensor:
        terms = self.losses(batch)
        cfg = self.cfg
        return (
            terms["ce"]
            + cfg.text_loss_weight * terms["text"]
            + cfg.image_loss_weight * terms["image"]
            + cfg.logit_loss_weight * terms["logits"]
        )

    def predict(self, batch: Batch) -> Tensor:
        """IVLP's prediction with the current (after training: the aggregated) prompts."""
        return ivlp.held(self).predict(batch)

    def epoch_end(self, epoch: int, epochs: int) -> None:
        """GPA: add ``w_epoch`` × the prompts to the aggregate; after the last epoch it becomes the
        prompts (and is cleared, the aggregation being over)."""
        if not self.cfg.gpa:
            return
        if not 1 <= epoch <= epochs:
            raise ValueError(f"promptsrc: epoch {epoch} is not one of 1 .. {epochs}")
        weight = gpa_weights(self.cfg.gpa_mean, self.cfg.gpa_std, epochs)[epoch - 1]
        aggregate: Tensor = getattr(self, AGGREGATE)
        params = list(self.parameters())
        with torch.no_grad():
            aggregate.add_(torch.cat([p.reshape(-1) for p in params]) * weight)
            if epoch < epochs:
                return
            for p, value in zip(params, aggregate.split([p.numel() for p in params]), strict=True):
                p.copy_(value.view_as(p))
            aggregate.zero_()

    def learned_state(self) -> dict[str, Tensor]:
        """IVLP's keys: ``ctx``, ``text_deep.<k>``, ``vision_prompts.<k>`` (not the aggregate)."""
        return ivlp.held(self).learned_state()


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: PromptSRCConfig) -> PromptSRC:
    """IVLP's prompts with PromptSRC's options; the frozen targets wait for the first training step."""
    prompts = ivlp.build(backbone, tasks, cfg.ivlp(), method="promptsrc")
    return PromptSRC(prompts, TaskClasses.of(tasks), cfg)

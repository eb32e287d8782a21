"""KgCoOp -- Knowledge-guided Context Optimization (Yao, Zhang, Xu; CVPR 2023, "Visual-Language
Prompt Tuning with Knowledge-guided Context Optimization", arXiv 2303.13283).

CoOp's learned prompts, kept close to the hand-crafted ones: besides cross-entropy, training
penalises the distance between each class's learned text feature ``w_i`` and the frozen
feature ``w_i^clip`` of the dataset's hand-crafted template, ``L = L_ce + λ · L_kg``.

Matches ``htyao89/KgCoOp KgCoOp/trainers/kgcoop.py`` and its ``vit_b16_ep100_ctxv1`` setup: a
generic CoOp context initialised from ``"a photo of a"`` (4 tokens), class token at the end, only
``ctx`` trained (2,048 parameters on ViT-B/16); targets = L2-normalised CLIP text features of
``template.format(class name)`` computed once at build; ``L_kg = 1 − mean_i cos(w_i, w_i^clip)``
(the code's form; the paper writes the squared distance of unit vectors, ``2 (1 − cos)``) with
``λ = 8`` (``TRAINER.COOP.W`` in ``scripts/run.sh``); prediction uses the learned prompts only.

Built on CoOp by composition (``coop.build``, held as TPT holds it): the prompt assembly, text
encoding, cached evaluation and logits are CoOp's; KgCoOp adds the frozen targets and the knowledge
term. Its state is exactly a generic CoOp checkpoint (``{"ctx"}``).

Deliberate changes:

* the template is the one the dataset catalog passes (``build_method(..., templates=...)``,
  CoOp's ``zsclip.py`` table). KgCoOp ships its own ``CUSTOM_TEMPLATES``, identical except for
  DTD (``"a photo of a {}, a type of texture."`` there, ``"{} texture."`` in CoOp's table): set
  ``method.template`` to reproduce it.
* ``ctx_init`` is honoured; the reference replaces any non-empty ``CTX_INIT`` by ``"a photo of a"``.
* the targets come from the same frozen backbone (the reference loads a second CLIP copy).
* the reference's ``bias_vectors``, ``meta_net`` and ``adapter`` are never trained or used in
  the loss; they are left out (the trainable count is the same).
* the knowledge term is always in the loss (the reference's AMP branch drops it).
* fp32 context and logits; prompts truncated at their longest EOS and encoded in chunks
  (re-computed in backward when there are several, as CoOp's); evaluation caches the text
  features until ``ctx`` changes (all exact, as CoOp here).
* multi-task: one ``ctx`` for every task; a batch's loss (both terms) covers its task's classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods import coop
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import TaskClasses, cross_entropy, template_sentences
from vlprompt.methods.options import KgCoOpConfig


class KgCoOp(nn.Module):
    """A CoOp context ``ctx`` and the frozen hand-crafted targets it is kept near."""

    def __init__(self, prompt: coop.CoOp, targets: Tensor, lam: float) -> None:
        super().__init__()
        coop.hold(self, prompt)  # self.coop (held), its self.ctx and self.prompts (registered)
        self.register_buffer("targets", targets, persistent=False)  # (C, D): normalised w^clip
        self.lam = lam

    def text_features(self, task: str) -> Tensor:
        """Learned classifier weights ``(n_cls, D)`` of ``task`` (not normalised)."""
        return coop.held(self).text_features(task)

    def knowledge_loss(self, task: str, text_features: Tensor | None = None) -> Tensor:
        """``L_kg = 1 − mean_i cos(w_i, w_i^clip)`` over ``task``'s classes."""
        text = self.text_features(task) if text_features is None else text_features
        cos = (F.normalize(text.float(), dim=-1) * self.targets[self.prompts.rows(task)]).sum(dim=-1)
        return 1.0 - cos.mean()

    def training_loss(self, batch: Batch) -> Tensor:
        text = self.text_features(batch.task)
        logits = coop.held(self).logits(batch, text)
        return cross_entropy(logits, batch.labels) + self.lam * self.knowledge_loss(batch.task, text)

    def predict(self, batch: Batch) -> Tensor:
        """CoOp's prediction (under ``no_grad``, text features cached while ``ctx`` is unchanged)."""
        return coop.held(self).predict(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """Only ``ctx`` -- the same key and shape as a generic CoOp checkpoint."""
        return coop.held(self).learned_state()


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: KgCoOpConfig) -> KgCoOp:
    """Encode the hand-crafted targets once, then CoOp's context and prompts (generic, class at the end)."""
    sentences = template_sentences("kgcoop", TaskClasses.of(tasks), cfg.template, cfg.templates)
    with torch.no_grad():
        targets = F.normalize(backbone.encode_text(backbone.tokenize(sentences)).float(), dim=-1)
    prompt = coop.build(
        backbone, tasks, coop.CoOpConfig(n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init), method="kgcoop"
    )
    return KgCoOp(prompt, targets, cfg.lam)

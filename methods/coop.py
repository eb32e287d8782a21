"""CoOp -- Context Optimization (Zhou, Yang, Loy, Liu; IJCV 2022, "Learning to Prompt for
Vision-Language Models", arXiv 2109.01134).

The class prompt ``[SOS] [V]_1 ... [V]_M [CLASS] . [EOS]`` has M learnable context vectors
in the token-embedding space (paper Eq. 2); the frozen text tower turns each class's prompt
into a classifier weight, and training minimises cross-entropy of CLIP's cosine logits.

Matches ``KaiyangZhou/CoOp trainers/coop.py`` (``PromptLearner``, ``TextEncoder``,
``CustomCLIP``): defaults ``n_ctx=16, ctx_init="", csc=False, class_token_position="end"``;
random init N(0, 0.02²) of shape ``(n_ctx, W)`` or, class-specific, ``(n_cls, n_ctx, W)``; word
init from the embeddings of ``ctx_init``; the prompt text ``"<prefix> <class name>."`` tokenised
once, its SOS kept as ``token_prefix`` and everything after the context (class tokens, ".", EOS,
padding) as ``token_suffix``; class token at the end, in the middle (context split at
``n_ctx // 2``) or in front, using the class names' token counts; the feature is read at the EOS
position of the tokenised prompt. The prompt plumbing is
:class:`~vlprompt.methods.prompts.PromptEmbeddings`, shared with the methods built like CoOp;
KgCoOp and TPT hold a CoOp (:func:`hold`).

Deliberate changes:

* fp32 context and logits (the reference keeps the whole CLIP and ``ctx`` in fp16); the
  backbone may still run in fp16/bf16 (``load_backbone(precision=...)``).
* the text tower runs on prompts truncated at their longest EOS (exact; the tower is causal)
  and in chunks of ``backbone.text_chunk_size`` prompts; in training, with more than one chunk,
  each chunk is re-computed in backward instead of kept (``backbone.text_checkpoint``), so a
  1000-class step holds one chunk's activations, not all (gradients bit-equal, tested).
* multi-task: one generic ``ctx`` shared by every task (class-specific: one row per class
  of every task); a batch uses its task's prompts only.
* a prompt that does not fit the context length is an error naming the class, where the
  reference's tokenizer silently cuts it.
* word init counts tokens, not words (same for ``"a photo of a"``); with ``csc`` the word
  init is copied to every class (the reference ignores ``csc`` when ``ctx_init`` is set).
* evaluation caches each task's text features until ``ctx`` changes (exact; the reference
  re-encodes every class for every test batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import (
    TaskClasses,
    cosine_logits,
    cross_entropy,
    hold_backbone,
    image_features,
    init_context,
    text_features_while_unchanged,
)
from vlprompt.methods.options import CoOpConfig
from vlprompt.methods.prompts import PromptEmbeddings, class_prompts


class CoOp(nn.Module):
    """The learnable context ``ctx``; the fixed token embeddings around it are :attr:`prompts`."""

    def __init__(self, prompts: PromptEmbeddings, ctx: Tensor) -> None:
        super().__init__()
        hold_backbone(self, prompts.backbone)
        self.prompts = prompts  # buffers only, none persistent: the state is {"ctx"}
        self.ctx = nn.Parameter(ctx)  # (n_ctx, W), or (n_cls_all_tasks, n_ctx, W) with csc
        self._eval_cache: dict[str, tuple[tuple[int, int], Tensor]] = {}

    def text_features(self, task: str) -> Tensor:
        """Classifier weights ``(n_cls, D)`` of ``task`` (not normalised)."""
        return self.prompts.text_features(self.ctx, task)

    def logits(self, batch: Batch, text_features: Tensor) -> Tensor:
        """CLIP's cosine logits of the batch's images against ``text_features``."""
        return cosine_logits(image_features(self.backbone, batch), text_features, self.backbone.logit_scale)

    def training_loss(self, batch: Batch) -> Tensor:
        return cross_entropy(self.logits(batch, self.text_features(batch.task)), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        text = text_features_while_unchanged(self._eval_cache, self.ctx, batch.task, self.text_features)
        return self.logits(batch, text)

    def learned_state(self) -> dict[str, Tensor]:
        return {"ctx": self.ctx.detach().clone()}


def build(
    backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: CoOpConfig, *, method: str = "coop"
) -> CoOp:
    """Initialise the context and tokenise ``"<prefix> <class name>."`` for every class.

    ``method`` names the method in errors, for those built on a CoOp (KgCoOp, TPT).
    """
    classes = TaskClasses.of(tasks)
    ctx, prompt_prefix = init_context(
        backbone, cfg.n_ctx, cfg.ctx_init, n_rows=len(classes.names) if cfg.csc else None
    )
    n_ctx = int(ctx.shape[-2])
    return CoOp(class_prompts(backbone, classes, prompt_prefix, n_ctx, method, cfg.class_token_position), ctx)


def hold(owner: nn.Module, prompt: CoOp) -> None:
    """Build ``owner`` on ``prompt`` by composition (not a subclass: the house style allows no
    inheritance beyond ``nn.Module``). ``owner.coop`` is a plain reference, like the backbone; the
    CoOp's one parameter is registered as ``owner.ctx`` and its fixed buffers as ``owner.prompts``
    (so ``.to()`` moves them), so the owner's ``state_dict`` is exactly a generic CoOp checkpoint
    (``{"ctx"}``) in both directions."""
    hold_backbone(owner, prompt.backbone)
    object.__setattr__(owner, "coop", prompt)
    owner.ctx = prompt.ctx
    owner.prompts = prompt.prompts


def held(owner: nn.Module) -> CoOp:
    """The CoOp :func:`hold` gave ``owner``, reading ``owner.ctx`` (re-linked if it was replaced)."""
    prompt: CoOp = owner.coop
    if prompt.ctx is not owner.ctx:
        prompt.ctx = owner.ctx
    return prompt

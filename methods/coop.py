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
position of the tokenised prompt.

Deliberate changes:

* fp32 context and logits (the reference keeps the whole CLIP and ``ctx`` in fp16); the
  backbone may still run in fp16/bf16 (``load_backbone(precision=...)``).
* the text tower runs on prompts truncated at their longest EOS (exact; the tower is causal)
  and in chunks of ``backbone.text_chunk_size`` prompts.
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
    class_prompts,
    cosine_logits,
    cross_entropy,
    hold_backbone,
    image_features,
    init_context,
    text_features_while_unchanged,
)
from vlprompt.methods.options import CoOpConfig


class CoOp(nn.Module):
    """The learnable context ``ctx`` plus the fixed token embeddings around it."""

    def __init__(
        self,
        backbone: Backbone,
        classes: TaskClasses,
        ctx: Tensor,
        token_prefix: Tensor,
        token_suffix: Tensor,
        eot: Tensor,
        name_lens: Sequence[int],
        class_token_position: str,
    ) -> None:
        super().__init__()
        hold_backbone(self, backbone)
        self.classes = classes
        self.ctx = nn.Parameter(ctx)  # (n_ctx, W), or (n_cls_all_tasks, n_ctx, W) with csc
        self.register_buffer("token_prefix", token_prefix, persistent=False)  # (C, 1, W): SOS
        self.register_buffer("token_suffix", token_suffix, persistent=False)  # (C, L-1-n_ctx, W)
        self.register_buffer("eot", eot, persistent=False)  # (C,) EOS position in each prompt
        self.name_lens = list(name_lens)
        self.class_token_position = class_token_position
        self._eval_cache: dict[str, tuple[tuple[int, int], Tensor]] = {}

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[-2])

    def prompts(self, task: str) -> tuple[Tensor, Tensor]:
        """Prompt embeddings ``(n_cls, L, W)`` of ``task``'s classes and their EOS positions."""
        rows = self.classes.rows(task)
        prefix, suffix = self.token_prefix[rows], self.token_suffix[rows]
        n_cls = prefix.shape[0]
        ctx = self.ctx[rows] if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(n_cls, -1, -1)
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1), self.eot[rows]
        half = self.n_ctx // 2
        out = []
        for i, name_len in enumerate(self.name_lens[rows]):
            cls_tokens, rest = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
            if self.class_token_position == "middle":
                parts = [prefix[i : i + 1], ctx[i : i + 1, :half], cls_tokens, ctx[i : i + 1, half:], rest]
            else:  # front
                parts = [prefix[i : i + 1], cls_tokens, ctx[i : i + 1], rest]
            out.append(torch.cat(parts, dim=1))
        return torch.cat(out, dim=0), self.eot[rows]

    def text_features(self, task: str) -> Tensor:
        """Classifier weights ``(n_cls, D)`` of ``task`` (not normalised)."""
        x, eot = self.prompts(task)
        return self.backbone.encode_text_embeddings(x, eot)

    def training_loss(self, batch: Batch) -> Tensor:
        logits = cosine_logits(
            image_features(self.backbone, batch), self.text_features(batch.task), self.backbone.logit_scale
        )
        return cross_entropy(logits, batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        text = text_features_while_unchanged(self._eval_cache, self.ctx, batch.task, self.text_features)
        return cosine_logits(image_features(self.backbone, batch), text, self.backbone.logit_scale)

    def learned_state(self) -> dict[str, Tensor]:
        return {"ctx": self.ctx.detach().clone()}


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: CoOpConfig) -> CoOp:
    """Initialise the context and tokenise ``"<prefix> <class name>."`` for every class."""
    classes = TaskClasses.of(tasks)
    ctx, prompt_prefix = init_context(
        backbone, cfg.n_ctx, cfg.ctx_init, n_rows=len(classes.names) if cfg.csc else None
    )
    n_ctx = int(ctx.shape[-2])
    fixed = class_prompts(backbone, classes, prompt_prefix, n_ctx, "coop")
    if cfg.class_token_position != "end":
        # middle/front cut the class tokens out of the suffix by their standalone count;
        # that is only right if the name is tokenised the same inside the prompt.
        expected = torch.tensor(fixed.name_lens, device=fixed.eot.device) + n_ctx + 2
        bad = (fixed.eot != expected).nonzero().flatten().tolist()
        if bad:
            name = classes.names[bad[0]]
            raise ValueError(
                f"coop: class name {name!r} tokenises differently inside '{prompt_prefix} {name}.'; "
                "class_token_position middle/front needs names that do not merge with the final '.'"
            )
    return CoOp(
        backbone,
        classes,
        ctx,
        token_prefix=fixed.prefix,
        token_suffix=fixed.suffix,
        eot=fixed.eot,
        name_lens=fixed.name_lens,
        class_token_position=cfg.class_token_position,
    )

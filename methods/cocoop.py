"""CoCoOp -- Conditional Context Optimization (Zhou, Yang, Loy, Liu; CVPR 2022, "Conditional
Prompt Learning for Vision-Language Models", arXiv 2203.05557).

CoOp's M context vectors are shifted, per image, by a token ``π = h_θ(x)`` that a small
Meta-Net computes from the image feature ``x``: ``v_m(x) = v_m + π`` (paper §3.2). Each image
thus gets its own prompts ``[SOS] v_1(x) ... v_M(x) [CLASS] . [EOS]`` for every class, and its
logits are CLIP's cosine logits against those prompts' text features (the paper's
``p(y | x)`` with ``t_i(x)``).

Matches ``KaiyangZhou/CoOp trainers/cocoop.py`` (``PromptLearner``, ``CustomCLIP``) and
``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``:
defaults ``n_ctx=4, ctx_init="a photo of a"``, generic context only, class token at the end;
Meta-Net ``linear1 Linear(d, d // 16) → ReLU → linear2 Linear(d // 16, ctx_dim)`` with torch's
default ``nn.Linear`` init, fed the **L2-normalised** image feature (``d`` = the joint
embedding dimension, 512→32→512 on ViT-B/16); the same ``π`` added to every context token;
cross-entropy of ``logit_scale · cos``. Only ``ctx`` and the Meta-Net are trained (35,360
parameters on ViT-B/16). The prompts' fixed token embeddings are CoOp's
(:class:`~vlprompt.methods.prompts.PromptEmbeddings`), paired here with one context per image.

Deliberate changes:

* batches of any size: the reference trains at batch size 1 because it runs the text tower
  once per image (``n_cls`` prompts each). Here the ``B × n_cls`` image-conditioned prompts of
  a batch go through the tower together, in passes of at most ``max_prompts_per_pass``
  prompts (a pass may end inside one image's classes). With more than one pass and
  gradients on, each pass is re-computed in the backward pass (activation checkpointing,
  the backbone's ``text_checkpoint`` rule applied to the passes: ``never`` keeps them all,
  ``always`` checkpoints a single pass too), so training memory is bounded by one pass, not
  the batch. Logits and gradients equal the
  per-image maths (tested); the mean loss over a batch is what the loop optimises.
* fp32 context, Meta-Net and logits (the reference halves the Meta-Net with the fp16 CLIP).
* prompts cut at their longest EOS before the tower (exact; the tower is causal).
* multi-task: one ``ctx`` and one Meta-Net shared by every task; a batch uses its task's
  classes only.
* word init counts tokens, not words (the same for ``"a photo of a"``); a prompt too long for
  the context is an error naming the class.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import (
    TaskClasses,
    cross_entropy,
    hold_backbone,
    image_features,
    init_context,
    learned_tensors,
)
from vlprompt.methods.options import CoCoOpConfig
from vlprompt.methods.prompts import PromptEmbeddings, class_prompts

#: Meta-Net bottleneck: hidden width = image feature dimension // this (reference: 16).
META_NET_REDUCTION = 16


def meta_net(vis_dim: int, ctx_dim: int) -> nn.Sequential:
    """The reference Meta-Net ``h_θ``: ``Linear(d, d // 16) → ReLU → Linear(d // 16, ctx_dim)``."""
    hidden = vis_dim // META_NET_REDUCTION
    if hidden < 1:
        raise ValueError(
            f"cocoop: image features of dimension {vis_dim} are too narrow for the Meta-Net "
            f"bottleneck (dimension // {META_NET_REDUCTION} = 0)"
        )
    return nn.Sequential(
        OrderedDict(
            [
                ("linear1", nn.Linear(vis_dim, hidden)),
                ("relu", nn.ReLU()),
                ("linear2", nn.Linear(hidden, ctx_dim)),
            ]
        )
    )


class CoCoOp(nn.Module):
    """The context ``ctx`` and the Meta-Net; :attr:`prompts` holds the fixed token embeddings around it."""

    def __init__(
        self, prompts: PromptEmbeddings, ctx: Tensor, meta_net: nn.Module, max_prompts_per_pass: int | None
    ) -> None:
        super().__init__()
        hold_backbone(self, prompts.backbone)
        self.prompts = prompts  # buffers only, none persistent
        self.ctx = nn.Parameter(ctx)  # (n_ctx, W)
        self.meta_net = meta_net
        self.max_prompts_per_pass = max_prompts_per_pass or prompts.backbone.text_chunk_size

    def logits(self, batch: Batch) -> Tensor:
        """Logits ``(B, n_cls)``: each image against the prompts conditioned on itself."""
        image = F.normalize(image_features(self.backbone, batch).float(), dim=-1)  # (B, D)
        ctx = self.ctx + self.meta_net(image).unsqueeze(1)  # v_m(x) = v_m + π(x): (B, n_ctx, W)
        rows = self.prompts.rows(batch.task)
        text = F.normalize(self._encode_pairs(ctx, rows).float(), dim=-1)  # (B, C, D)
        return self.backbone.logit_scale * torch.einsum("bd,bcd->bc", image, text)

    def _encode_pairs(self, ctx: Tensor, rows: slice) -> Tensor:
        """Text features ``(B, C, D)`` of every (image, class) prompt, in bounded passes."""
        n_images, n_cls = ctx.shape[0], rows.stop - rows.start
        length = int(self.prompts.eot[rows].max()) + 1  # the tower is causal: later positions never matter
        total, budget = n_images * n_cls, self.max_prompts_per_pass
        args = (ctx, rows.start, n_cls, length)
        if total <= budget:  # one pass: the backbone's text_checkpoint rule decides, as for CoOp
            return self._encode_span(0, total, *args, None).view(n_images, n_cls, -1)
        # Keep only each pass's output, re-running the pass in backward: memory ~ one pass.
        # The passes are this method's chunks, so the backbone's rule is asked about them and
        # the tower is told not to checkpoint again inside a pass.
        recompute = self.backbone.checkpoints_text(-(-total // budget))
        parts = []
        for start in range(0, total, budget):
            stop = min(start + budget, total)
            if recompute:
                parts.append(
                    checkpoint(
                        self._encode_span,
                        start,
                        stop,
                        *args,
                        False,
                        use_reentrant=False,
                        preserve_rng_state=False,
                    )
                )
            else:
                parts.append(self._encode_span(start, stop, *args, False))
        return torch.cat(parts).view(n_images, n_cls, -1)

    def _encode_span(
        self,
        start: int,
        stop: int,
        ctx: Tensor,
        first_row: int,
        n_cls: int,
        length: int,
        tower_checkpoint: bool | None,
    ) -> Tensor:
        """Prompts ``start:stop`` of the image-major (image, class) list, encoded in one pass
        (``tower_checkpoint``: the tower's own checkpointing, :meth:`Backbone.encode_text_embeddings`)."""
        pairs = torch.arange(start, stop, device=ctx.device)
        image, row = pairs // n_cls, first_row + pairs % n_cls
        x = self.prompts.embed(ctx[image], row, length)
        return self.backbone.encode_text_embeddings(
            x, self.prompts.eot[row], chunk_size=stop - start, checkpoint=tower_checkpoint
        )

    def training_loss(self, batch: Batch) -> Tensor:
        return cross_entropy(self.logits(batch), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        return self.logits(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """``ctx`` and the Meta-Net's weights (``meta_net.linear1.weight``, ...)."""
        return learned_tensors(self)


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: CoCoOpConfig) -> CoCoOp:
    """Initialise context and Meta-Net (in the reference's RNG order) and tokenise the prompts."""
    classes = TaskClasses.of(tasks)
    ctx, prompt_prefix = init_context(backbone, cfg.n_ctx, cfg.ctx_init)
    net = meta_net(backbone.embed_dim, backbone.text_width).to(backbone.device)
    prompts = class_prompts(backbone, classes, prompt_prefix, int(ctx.shape[0]), "cocoop")
    return CoCoOp(prompts, ctx, net, cfg.max_prompts_per_pass)

"""IVLP -- Independent Vision-Language Prompting, the deep two-tower baseline of MaPLe (Khattak,
Rasheed, Maaz, Khan, Khan; CVPR 2023, "MaPLe: Multi-modal Prompt Learning", arXiv 2210.03117, §4
"Independent V-L prompting").

Text: CoOp-style context after SOS in the token embeddings (layer 0); before each text block
``i = 1 .. depth_text - 1`` the context positions ``1 .. n_ctx_text`` are replaced by that layer's
own learned prompt. Vision: ``n_ctx_vision`` prompt tokens appended after the positional embedding
(layer 0, before ``ln_pre``); before each image block ``i = 1 .. depth_vision - 1`` they are
replaced by that layer's prompt. The two towers' prompts are independent (no coupling); the image
feature is read at the class token as usual; logits are CLIP's cosine logits, loss cross-entropy.

Matches ``muzairkhattak/multimodal-prompt-learning`` ``trainers/independentVL.py``
(``VLPromptLearner``, ``CustomCLIP``) and ``clip/model.py`` (``ResidualAttentionBlock_IVLP``,
``VisionTransformer``): defaults of ``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml`` (2
text + 2 vision tokens, depth 12/12, ``ctx_init "a photo of a"``: 30,720 parameters on ViT-B/16; the
PromptSRC 4+4 depth 9/9 config gives 46,080); word init only for ``n_ctx_text <= 4`` with the whole
init text kept in the prompt (:func:`~vlprompt.methods.common.deep_prompt_context`); every deep and
visual prompt N(0, 0.02²); prompts carry no positional embedding. The forward is
:class:`~vlprompt.methods.prompts.DeepPrompts`, shared with MaPLe; IVLP supplies its own visual
prompts.

Deliberate changes:

* fp32 prompts and logits (the reference halves the prompts into its fp16 CLIP).
* ``depth_vision = 0`` or ``n_ctx_vision = 0`` (both together) switch visual prompts off, like
  the reference's ``PROMPT_DEPTH_VISION 0``; a depth beyond a tower's blocks means every block
  (capped, so the 12-layer defaults also build on small test models).
* the random-init order differs from the reference (its visual prompts are drawn while CLIP is
  built); the distributions are the same.
* text prompts cut at their longest EOS (exact; causal tower); multi-task: one set of prompts
  shared by every task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import (
    TaskClasses,
    cross_entropy,
    deep_prompt_context,
    hold_backbone,
    learned_tensors,
    normal_prompts,
)
from vlprompt.methods.options import IVLPConfig
from vlprompt.methods.prompts import DeepPrompts, class_prompts


def capped_depth(depth: int, blocks: int) -> int:
    """A prompt depth beyond the tower means "every block": capped at its number of blocks."""
    return min(depth, blocks)


class IVLP(nn.Module):
    """Layer-0 text context, deep text prompts and per-layer visual prompts, all free."""

    def __init__(
        self, towers: DeepPrompts, ctx: Tensor, text_deep: nn.ParameterList, vision_prompts: nn.ParameterList
    ) -> None:
        super().__init__()
        hold_backbone(self, towers.backbone)
        self.towers = towers  # the shared forward and the class prompts' fixed buffers (not persistent)
        self.ctx = nn.Parameter(ctx)  # (n_ctx_text, W_text): layer-0 text context
        self.text_deep = text_deep  # [i - 1]: text prompt of layer i = 1 .. depth_text - 1
        self.vision_prompts = vision_prompts  # [i]: visual prompt of layer i = 0 .. depth_vision - 1

    def text_features(self, task: str) -> Tensor:
        """Text features ``(n_cls, D)`` of ``task``'s classes under the current prompts."""
        return self.towers.text_features(self.ctx, self.text_deep, task)

    def image_features(self, images: Tensor) -> Tensor:
        """Image features ``(B, D)`` with the visual prompts (the frozen tower when there are none)."""
        return self.towers.image_features(self.vision_prompts, images)

    def logits(self, batch: Batch) -> Tensor:
        return self.towers.logits(self.ctx, self.text_deep, self.vision_prompts, batch)

    def training_loss(self, batch: Batch) -> Tensor:
        return cross_entropy(self.logits(batch), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        return self.logits(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """``ctx``, ``text_deep.<k>`` and ``vision_prompts.<k>``."""
        return learned_tensors(self)


def hold(owner: nn.Module, prompts: IVLP) -> None:
    """Build ``owner`` on ``prompts`` by composition (as :func:`vlprompt.methods.coop.hold`):
    ``owner.ivlp`` is a plain reference; the IVLP's ``ctx``, ``text_deep``, ``vision_prompts`` and
    ``towers`` are registered on ``owner`` under the same names, so the owner's parameters are the
    IVLP's and its ``state_dict`` holds an IVLP checkpoint's keys."""
    hold_backbone(owner, prompts.backbone)
    object.__setattr__(owner, "ivlp", prompts)
    owner.ctx = prompts.ctx
    owner.text_deep = prompts.text_deep
    owner.vision_prompts = prompts.vision_prompts
    owner.towers = prompts.towers


def held(owner: nn.Module) -> IVLP:
    """The IVLP :func:`hold` gave ``owner``, reading the owner's prompts (re-linked if replaced)."""
    prompts: IVLP = owner.ivlp
    for name in ("ctx", "text_deep", "vision_prompts"):
        if getattr(prompts, name) is not getattr(owner, name):
            setattr(prompts, name, getattr(owner, name))
    return prompts


def build(
    backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: IVLPConfig, *, method: str = "ivlp"
) -> IVLP:
    """Initialise the prompts of both towers and tokenise the class prompts.

    ``method`` names the method in errors, for those built on an IVLP (PromptSRC)."""
    depth_text = capped_depth(cfg.depth_text, backbone.text_layers)
    depth_vision = capped_depth(cfg.depth_vision, backbone.vision_layers) if cfg.depth_vision else 0
    classes = TaskClasses.of(tasks)
    ctx, prompt_prefix = deep_prompt_context(backbone, cfg.n_ctx_text, cfg.ctx_init)
    device = backbone.device
    text_deep = normal_prompts(depth_text - 1, cfg.n_ctx_text, backbone.text_width, device)
    vision = normal_prompts(depth_vision, cfg.n_ctx_vision, backbone.vision_width, device)
    prompts = class_prompts(backbone, classes, prompt_prefix, cfg.n_ctx_text, method)
    return IVLP(DeepPrompts(method, prompts), ctx, text_deep, vision)

"""MaPLe -- Multi-modal Prompt Learning (Khattak, Rasheed, Maaz, Khan, Khan; CVPR 2023,
arXiv 2210.03117).

Deep text prompts as IVLP -- a layer-0 context ``P_0`` after SOS and, before each text block
``i = 1 .. J-1``, positions ``1 .. n_ctx`` replaced by a learned ``P_i`` -- but the visual prompts
are not free: they are **coupled** to the text prompts through per-layer projections,
``P̃_i = F_i(P_i)`` with ``F_i = Linear(W_text → W_vision)`` (paper Eq. 3-5, "vision-language
coupling function"). ``P̃_0`` is appended to the image tokens after the positional embedding,
``P̃_i`` replaces them before image block ``i``. Cosine logits, cross-entropy.

Matches ``muzairkhattak/multimodal-prompt-learning`` ``trainers/maple.py``
(``MultiModalPromptLearner``, ``CustomCLIP``) and ``clip/model.py`` (``ResidualAttentionBlock_MaPLe``,
``VisionTransformer_MaPLe``): defaults of
``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`` (``N_CTX 2``, ``CTX_INIT "a photo of a"``,
``PROMPT_DEPTH 9``); word init for ``n_ctx <= 4`` learns the first ``n_ctx`` tokens of the init
text and keeps the rest as fixed words (``[SOS][a photo] of a {class}.``); deep text prompts
N(0, 0.02²); ``proj`` (layer 0) and the ``J-1`` deep projections are ``nn.Linear`` with torch's
default init, the deep ones deep copies of **one** initialised layer (``_get_clones``), so they
start equal. Parameters on ViT-B/16 (n_ctx 2, J 9): 3,555,072. The forward is IVLP's
(:class:`~vlprompt.methods.prompts.DeepPrompts`); MaPLe supplies the coupled visual prompts.

Deliberate changes:

* fp32 prompts, projections and logits (the reference halves them into its fp16 CLIP).
* the projection widths are the backbone's (the reference hard-codes 512 → 768).
* ``prompt_depth`` beyond either tower's blocks means every block (capped; the reference would
  train deep prompts that no layer uses).
* text prompts cut at their longest EOS (exact; causal tower); multi-task: one set of prompts and
  projections shared by every task.
"""

from __future__ import annotations

import copy
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
from vlprompt.methods.ivlp import capped_depth
from vlprompt.methods.options import MaPLeConfig
from vlprompt.methods.prompts import DeepPrompts, class_prompts


class MaPLe(nn.Module):
    """Text prompts of every prompted layer and the text → vision coupling projections."""

    def __init__(
        self,
        towers: DeepPrompts,
        ctx: Tensor,
        proj: nn.Linear,
        compound_prompts_text: nn.ParameterList,
        compound_prompt_projections: nn.ModuleList,
    ) -> None:
        super().__init__()
        hold_backbone(self, towers.backbone)
        self.towers = towers  # the shared forward and the class prompts' fixed buffers (not persistent)
        self.ctx = nn.Parameter(ctx)  # (n_ctx, W_text): P_0
        self.proj = proj  # F_0: W_text -> W_vision
        self.compound_prompts_text = compound_prompts_text  # [i - 1]: P_i, i = 1 .. J-1
        self.compound_prompt_projections = compound_prompt_projections  # [i - 1]: F_i

    def vision_prompts(self) -> list[Tensor]:
        """``[F_0(P_0), F_1(P_1), ...]``: the visual prompt of each prompted image layer."""
        deep = zip(self.compound_prompt_projections, self.compound_prompts_text, strict=True)
        return [self.proj(self.ctx), *(f(p) for f, p in deep)]

    def text_features(self, task: str) -> Tensor:
        """Text features ``(n_cls, D)`` of ``task``'s classes under the current prompts."""
        return self.towers.text_features(self.ctx, self.compound_prompts_text, task)

    def image_features(self, images: Tensor) -> Tensor:
        """Image features ``(B, D)`` with the coupled visual prompts."""
        return self.towers.image_features(self.vision_prompts(), images)

    def logits(self, batch: Batch) -> Tensor:
        return self.towers.logits(self.ctx, self.compound_prompts_text, self.vision_prompts(), batch)

    def training_loss(self, batch: Batch) -> Tensor:
        return cross_entropy(self.logits(batch), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        return self.logits(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """``ctx``, ``proj.*``, ``compound_prompts_text.<k>``, ``compound_prompt_projections.<k>.*``."""
        return learned_tensors(self)


#: What a MaPLe learns, by attribute: what :func:`hold` registers on a method built on one.
LEARNED = ("ctx", "proj", "compound_prompts_text", "compound_prompt_projections")


def hold(owner: nn.Module, prompt: MaPLe) -> None:
    """Build ``owner`` on ``prompt`` by composition (as ``coop.hold``): ``owner.maple`` is a plain
    reference, like the backbone; the MaPLe's parameters and projections are registered on
    ``owner`` under MaPLe's own names (and its fixed class prompts as ``owner.towers``), so the
    owner's ``state_dict`` is exactly a MaPLe checkpoint in both directions."""
    hold_backbone(owner, prompt.backbone)
    object.__setattr__(owner, "maple", prompt)
    owner.towers = prompt.towers
    for name in LEARNED:
        setattr(owner, name, getattr(prompt, name))


def held(owner: nn.Module) -> MaPLe:
    """The MaPLe :func:`hold` gave ``owner``, re-linked to the owner's tensors if one was replaced."""
    prompt: MaPLe = owner.maple
    for name in LEARNED:
        if getattr(prompt, name) is not getattr(owner, name):
            setattr(prompt, name, getattr(owner, name))
    return prompt


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: MaPLeConfig) -> MaPLe:
    """Initialise prompts and projections in the reference's order and tokenise the class prompts."""
    depth = capped_depth(cfg.prompt_depth, min(backbone.text_layers, backbone.vision_layers))
    classes = TaskClasses.of(tasks)
    device = backbone.device
    ctx, prompt_prefix = deep_prompt_context(backbone, cfg.n_ctx, cfg.ctx_init)
    width_t, width_v = backbone.text_width, backbone.vision_width
    proj = nn.Linear(width_t, width_v).to(device)
    deep_text = normal_prompts(depth - 1, cfg.n_ctx, width_t, device)
    single = nn.Linear(width_t, width_v).to(device)
    projections = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])
    prompts = class_prompts(backbone, classes, prompt_prefix, cfg.n_ctx, "maple")
    return MaPLe(DeepPrompts("maple", prompts), ctx, proj, deep_text, projections)

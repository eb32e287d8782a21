"""Bias tuning -- learnable biases inside the frozen transformer blocks, in place of prompts
(Ma, Xie, Wei, Sun, Fan, Bao, Guo, Zheng; "Understanding the Multi-modal Prompts of the
Pre-trained Vision-Language Model", arXiv 2312.11570).

The paper's analysis splits what a deep prompt does to self-attention into (1) prompt keys
re-weighting attention and (2) prompt values adding ``Σ_p a_ip v_p`` to every token's update --
an (input-dependent) *bias*; it finds (2) carries most of the gain and proposes learning biases
directly, with as many parameters as the prompts they replace (read from the paper's abstract: no
reference code was followed, so the placement below is this file's reading of it).

Here: zero-initialised vectors ``b`` added to the residual stream of chosen blocks, right after
the attention update (``site="attn"``, the reading closest to the analysis: ``b`` adds to
``x + attn(ln_1(x))`` as the prompts' value term does) and/or after the MLP update
(``site="mlp"``), in the text tower, the image tower or both. With ``slots = k`` a block has
``k`` vectors: ``b_j`` for token position ``j < k-1`` and ``b_{k-1}`` for every later position
(``k = 1``: one bias for all tokens; positions are absolute, so text truncation stays exact).
Text prompts are the hand-crafted template (``"a photo of a {}."``), so at zero init the logits
are exactly zero-shot CLIP's with that template. Parameters: one tower width per vector.

Not public, so chosen here and configurable: the exact insertion point (after attention vs.
MLP), which layers, one bias for all tokens vs. per position, and how counts are matched to a
prompt configuration (see :mod:`vlprompt.methods.param_match`). Default: both towers, layers
0..8 (MaPLe's prompt depth 9), after attention, one bias per layer -- 9 · (512 + 768) = 11,520
parameters on ViT-B/16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone, BlockHooks, LayerHook
from vlprompt.methods.common import (
    TaskClasses,
    cosine_logits,
    cross_entropy,
    hold_backbone,
    learned_tensors,
    require_images,
    template_sentences,
)
from vlprompt.methods.options import BiasTuningConfig, parse_match
from vlprompt.methods.param_match import match_bias_tuning


def bias_hook(layers: Sequence[int], bias: Tensor) -> LayerHook:
    """Block hook adding ``bias[k]`` ``(slots, W)`` to block ``layers[k]``'s stream, by position."""
    where = {layer: k for k, layer in enumerate(layers)}

    def hook(i: int, x: Tensor) -> Tensor:
        k = where.get(i)
        if k is None:
            return x
        b = bias[k]
        if b.shape[0] > 1:
            positions = torch.arange(x.shape[1], device=x.device).clamp(max=b.shape[0] - 1)
            b = b[positions]  # (L, W)
        return x + b.to(x.dtype)

    return hook


class BiasTuning(nn.Module):
    """The bias vectors (``biases["<tower>_<site>"]`` of shape ``(n_layers, slots, W)``)."""

    def __init__(
        self,
        backbone: Backbone,
        classes: TaskClasses,
        prompts: Tensor,
        eot: Tensor,
        layers: Mapping[str, tuple[int, ...]],
        biases: nn.ParameterDict,
    ) -> None:
        super().__init__()
        hold_backbone(self, backbone)
        self.classes = classes
        self.layers = dict(layers)  # tower -> block indices with biases
        self.biases = biases
        self.register_buffer("prompts", prompts, persistent=False)  # (C, L, W) template embeddings
        self.register_buffer("eot", eot, persistent=False)  # (C,)

    def block_hooks(self, tower: str) -> BlockHooks | None:
        """The :class:`BlockHooks` adding this method's biases in ``tower`` (None: no biases there)."""
        if tower not in self.layers:
            return None
        hooks = {
            f"after_{site}": bias_hook(self.layers[tower], self.biases[f"{tower}_{site}"])
            for site in ("attn", "mlp")
            if f"{tower}_{site}" in self.biases
        }
        return BlockHooks(**hooks)

    def text_features(self, task: str) -> Tensor:
        rows = self.classes.rows(task)
        return self.backbone.encode_text_embeddings(
            self.prompts[rows], self.eot[rows], block_hooks=self.block_hooks("text")
        )

    def image_features(self, batch: Batch) -> Tensor:
        hooks = self.block_hooks("vision")
        if hooks is None and batch.features is not None:
            return batch.features.to(self.backbone.device)  # the image tower is untouched
        images = require_images("bias_tuning", batch).to(self.backbone.device)
        return self.backbone.encode_image(images, block_hooks=hooks)

    def logits(self, batch: Batch) -> Tensor:
        return cosine_logits(
            self.image_features(batch), self.text_features(batch.task), self.backbone.logit_scale
        )

    def training_loss(self, batch: Batch) -> Tensor:
        return cross_entropy(self.logits(batch), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        return self.logits(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """``biases.<tower>_<site>`` tensors."""
        return learned_tensors(self)


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: BiasTuningConfig) -> BiasTuning:
    """Zero biases at the configured places; the template prompts embedded once."""
    if cfg.match is not None:
        method, options = parse_match(cfg.match)
        placement = match_bias_tuning(backbone, method, options).config
        cfg = replace(placement, template=cfg.template, templates=cfg.templates)
    classes = TaskClasses.of(tasks)
    texts = template_sentences("bias_tuning", classes, cfg.template, cfg.templates)
    layers: dict[str, tuple[int, ...]] = {}
    biases = nn.ParameterDict()
    for tower in cfg.towers:
        n_blocks = backbone.text_layers if tower == "text" else backbone.vision_layers
        width = backbone.text_width if tower == "text" else backbone.vision_width
        slots, positions = cfg.slots_of(tower), backbone.token_positions(tower)
        if slots > positions:
            raise ValueError(f"bias_tuning: {slots} {tower} slots exceed its {positions} token positions")
        layers[tower] = cfg.layer_indices(tower, n_blocks)
        for site in cfg.sites:
            zeros = torch.zeros(len(layers[tower]), slots, width, device=backbone.device)
            biases[f"{tower}_{site}"] = nn.Parameter(zeros)
    ids = backbone.tokenize(texts)
    with torch.no_grad():
        prompts = backbone.token_embedding(ids).float()
    return BiasTuning(backbone, classes, prompts, backbone.eot_positions(ids), layers, biases)

"""Zero-shot CLIP (Radford et al., ICML 2021): classify by the text features of fixed prompts.

The baseline every prompt-learning paper reports; matches CoOp's ``trainers/zsclip.py``
``ZeroshotCLIP``: one hand-crafted template per dataset (its ``CUSTOM_TEMPLATES``), class
names with ``"_"`` → ``" "``, logits ``logit_scale · cos(image, text)``. Nothing is learned;
the text features are computed once at build time and kept as a buffer.

Where the template comes from: the dataset catalog knows each dataset's hand-crafted
template, the method does not. The orchestrator passes it as
``build_method("zeroshot", ..., templates={task: template})``, which fills
``ZeroShotConfig.templates`` unless the user set it; ``method.template`` set by the user
overrides every task's template.

Prompt ensembles (``ensemble``): CLIP's 80 ImageNet templates (``imagenet80``) or CoOp's 7
selected ones (``imagenet7``, ``IMAGENET_TEMPLATES_SELECT``), both taken from open_clip's
``zero_shot_metadata`` rather than re-typed. A class's weight is the mean of its
L2-normalised sentence features (the CLIP notebook's ensembling). ``imagenet7+dataset``
adds each task's own hand-crafted template, which is CoOp's ``ZeroshotCLIP2`` on every
dataset but ImageNet (there the reference uses the 7 alone: choose ``imagenet7``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import (
    TaskClasses,
    cosine_logits,
    hold_backbone,
    image_features,
    template_sentences,
)
from vlprompt.methods.options import ZeroShotConfig

ENSEMBLES: dict[str, tuple[str, ...]] = {
    "imagenet80": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    "imagenet7": tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES),
}
"""Template ensembles by name (``options.ENSEMBLE_NAMES``), sentences with one ``{}`` for the class."""


class ZeroShotCLIP(nn.Module):
    """Fixed text classifier per task; no trainable parameters."""

    def __init__(self, backbone: Backbone, classes: TaskClasses, classifier: Tensor) -> None:
        super().__init__()
        hold_backbone(self, backbone)
        self.classes = classes
        self.register_buffer("classifier", classifier, persistent=False)  # (C_all, D) text features

    def text_features(self, task: str) -> Tensor:
        """The class weights ``(n_cls, D)`` of ``task`` (``TextClassifier``)."""
        return self.classifier[self.classes.rows(task)]

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        text = self.text_features(batch.task)
        return cosine_logits(image_features(self.backbone, batch), text, self.backbone.logit_scale)

    def training_loss(self, batch: Batch) -> Tensor:
        raise RuntimeError(
            "zeroshot has nothing to train (no parameters); evaluate it without training epochs"
        )

    def learned_state(self) -> dict[str, Tensor]:
        return {}


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: ZeroShotConfig) -> ZeroShotCLIP:
    """Encode ``template.format(class name)`` for every class of every task, once."""
    classes = TaskClasses.of(tasks)
    if not cfg.ensemble:
        prompts = template_sentences("zeroshot", classes, cfg.template, cfg.templates)
        with torch.no_grad():
            text_features = backbone.encode_text(backbone.tokenize(prompts)).float()
        return ZeroShotCLIP(backbone, classes, text_features)
    base, _, extra = cfg.ensemble.partition("+")
    sets = [[t.format(name) for name in classes.names] for t in ENSEMBLES[base]]
    if extra == "dataset":
        sets.append(template_sentences("zeroshot", classes, cfg.template, cfg.templates))
    with torch.no_grad():
        features = [F.normalize(backbone.encode_text(backbone.tokenize(s)).float(), dim=-1) for s in sets]
    return ZeroShotCLIP(backbone, classes, torch.stack(features).mean(dim=0))

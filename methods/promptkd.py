"""PromptKD -- unsupervised prompt distillation (Li, Li, Fu, Cheng, Yang, Yang; CVPR 2024,
"PromptKD: Unsupervised Prompt Distillation for Vision-Language Models", arXiv 2403.02781, §3).

A frozen, prompted *teacher* CLIP provides two things: the L2-normalised text features of **all**
classes, which are the classifier of both teacher and student (the student has no text encoder
use at all), and the soft targets ``z_t = s_t · norm(f_t) @ T_tᵀ`` (its own image features and
logit scale). The *student* is this method's backbone with IVLP visual prompts (layer 0 appended
after the positional embedding, replaced before blocks 1 .. depth-1) and a projector
``Conv1x1(d_s→d_t) → BN(d_t) → ReLU → Conv1x1(d_t→d_t)`` on its image embedding, then L2
normalisation; student logits ``z_s = s_s · f_s @ T_tᵀ`` (Eq. 3) and loss (Eq. 4)::

    L = kd_weight · KL(softmax(z_t / τ) ‖ softmax(z_s / τ)) · τ² / (B · C)      (sum over B and C)

Labels are never used (the reference's CE weight is 0).

Matches ``zhengli97/PromptKD`` ``trainers/promptkd.py``:
``Feature_Trans_Module_two_layer`` (``nn.Conv2d`` 1x1 layers, PyTorch default init, so its
checkpoint shapes load as they are), ``CustomCLIP`` (student), ``CustomCLIP_teacher`` and
``PromptKD.forward_backward``; ``s_s`` is the *student CLIP's* frozen ``logit_scale`` (the
reference's ``CustomCLIP.logit_scale = clip_model.logit_scale``, not a learned or separate one);
defaults 4 visual tokens, depth 9, ``KD_WEIGHT`` 1000 (the reference uses 200 for FGVCAircraft,
Flowers102 and DTD: set ``kd_weight``), ``TEMPERATURE`` 1. Trainable: the visual prompts and the
projector -- 27,648 + 986,112 = 1,013,760 on ViT-B/16 with a ViT-L/14 teacher. Evaluation uses
the projector's BatchNorm running statistics (``eval()``, as the reference's test loop).

Deliberate changes:

* the teacher is *any* vlprompt method (``teacher_method``, built on ``teacher_model`` /
  ``teacher_pretrained`` with ``teacher_options`` and optionally the ``learned_state.pt`` of a
  vlprompt run in ``teacher_state``) instead of the reference's PromptSRC ViT-L/14 checkpoint
  (``teacher_model/<Dataset>/VLPromptLearner/model-best.pth.tar``); a PromptSRC-like teacher is an
  ``ivlp`` teacher with 4+4 tokens, depth 9/9. Supported teachers are the methods that declare a
  fixed text classifier (the ``text_classifier`` capability: zero-shot, CoOp, KgCoOp, IVLP, MaPLe,
  bias tuning, SoftCPT); image-conditioned (CoCoOp), classifier-free (linear probe) and test-time
  (TPT) methods are refused when the options are checked.
* the teacher's text features are computed once at build time and cached (the paper "pre-stores"
  them; the reference code recomputes them each step under ``no_grad`` -- identical, as the
  teacher is frozen). Teacher logits come from the teacher method's own ``predict``.
* fp32 prompts, projector and logits (the reference halves the projector into its fp16 CLIP).
* the transductive, unlabelled data protocol (the whole train split of *all* classes, base and
  novel, labels withheld: the reference's ``DATASET.NUM_SHOTS 0``) is the orchestrator's
  ``data.protocol=transductive_base_to_novel``; this method declares ``unlabelled`` to run under it.
  Base and novel are scored over their own classes' test splits; ``val_acc`` uses the base classes'
  val split, never the test split the reference's ``best_val`` selects on.
* a prompt depth beyond the student's blocks means every block (as :mod:`~vlprompt.methods.ivlp`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, TextClassifier
from vlprompt.methods.clip import Backbone, load_backbone
from vlprompt.methods.common import (
    TaskClasses,
    hold_backbone,
    learned_tensors,
    normal_prompts,
    prompted_image_features,
    read_saved_state,
    require_images,
)
from vlprompt.methods.ivlp import capped_depth
from vlprompt.methods.options import PromptKDConfig


# ---------------------------------------------------------------- the objective
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) · τ² / numel`` -- the reference's ``L_ukd`` (Eq. 4).

    Summed over batch and classes, then divided by ``B · C`` (``stu_logits.numel()``), not by B.
    """
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=1),
            F.softmax(teacher_logits.float() / t, dim=1),
            reduction="sum",
        )
        * (t * t)
        / student_logits.numel()
    )


class Projector(nn.Module):
    """``Feature_Trans_Module_two_layer``: 1x1 conv → BN → ReLU → 1x1 conv on a ``(B, d)`` feature."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_dim, out_dim, 1),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(x[:, :, None, None]).flatten(1)


def teacher_text_features(teacher: TextClassifier, classes: TaskClasses, method: str) -> Tensor:
    """L2-normalised text features ``(C, D_t)`` of every class of every task, under no grad.

    The teacher is a method with the ``text_classifier`` capability (checked when the options are),
    so its ``text_features(task)`` are its fixed classifier.
    """
    if not isinstance(teacher, TextClassifier):
        raise TypeError(f"promptkd: teacher method {method!r} has no text_features(task)")
    with torch.no_grad():
        features = torch.cat([teacher.text_features(task) for task in classes.spans])
    if features.shape[0] != len(classes.names):
        raise ValueError(
            f"promptkd: teacher {method!r} gave {features.shape[0]} text features "
            f"for {len(classes.names)} classes"
        )
    return F.normalize(features.detach().float(), dim=-1)


def load_teacher_state(teacher: nn.Module, path: str, method: str) -> None:
    """``teacher.load_state_dict`` from a vlprompt ``learned_state.pt``; every error names the file."""
    file = Path(path).expanduser()
    state = read_saved_state(path, "promptkd teacher_state")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"promptkd teacher_state: {file} is not a learned_state.pt (name -> tensor)")
    try:
        result = teacher.load_state_dict(dict(state), strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(
            f"promptkd teacher_state: {file} does not fit the {method} teacher: {str(err).strip()}"
        ) from err
    if result.unexpected_keys or (state and len(result.missing_keys) == len(teacher.state_dict())):
        raise ValueError(
            f"promptkd teacher_state: {file} holds {sorted(state)}, not the learned state of the "
            f"{method} teacher (expects {sorted(teacher.state_dict())})"
        )


class PromptKD(nn.Module):
    """Student visual prompts and projector; holds (does not own) the frozen teacher."""

    def __init__(
        self,
        backbone: Backbone,
        classes: TaskClasses,
        teacher: nn.Module,
        classifier: Tensor,
        vision_prompts: nn.ParameterList,
        cfg: PromptKDConfig,
    ) -> None:
        super().__init__()
        hold_backbone(self, backbone)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never saved nor trained
        self.classes = classes
        self.kd_weight = cfg.kd_weight
        self.temperature = cfg.temperature
        self.vision_prompts = vision_prompts  # [i]: visual prompt of layer i = 0 .. depth - 1
        self.projector = Projector(backbone.embed_dim, classifier.shape[1]).to(backbone.device)
        self.register_buffer("classifier", classifier, persistent=False)  # (C, D_t): teacher text

    def image_features(self, images: Tensor) -> Tensor:
        """Normalised student features ``(B, D_t)``: prompted image tower → projector."""
        feats = prompted_image_features(self.backbone, self.vision_prompts, images)
        return F.normalize(self.projector(feats.float()), dim=-1)

    def logits(self, images: Tensor, task: str) -> Tensor:
        """``s_s · f_s @ T_tᵀ`` over ``task``'s classes (Eq. 3)."""
        text = self.classifier[self.classes.rows(task)]
        return self.backbone.logit_scale * self.image_features(images) @ text.T

    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> Tensor:
        """The frozen teacher's own logits for the batch's images."""
        images = require_images("promptkd", batch)
        return self.teacher.predict(Batch(batch.task, images=images)).float()

    def training_loss(self, batch: Batch) -> Tensor:
        """The distillation loss; ``batch.labels`` is ignored (unlabelled training)."""
        images = require_images("promptkd", batch)
        if self.training and len(batch) < 2:
            raise ValueError(
                "promptkd trains its projector's BatchNorm on batch statistics: use batches of >= 2"
            )
        z_t = self.teacher_logits(batch)
        z_s = self.logits(images, batch.task)
        return self.kd_weight * kd_loss(z_s, z_t.to(z_s.device), self.temperature)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        return self.logits(require_images("promptkd", batch), batch.task)

    def learned_state(self) -> dict[str, Tensor]:
        """``vision_prompts.<k>`` and ``projector.*`` (BatchNorm running statistics included)."""
        return learned_tensors(self)


def build_teacher(
    backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: PromptKDConfig
) -> tuple[nn.Module, Tensor]:
    """Load the teacher CLIP, build ``teacher_method`` on it, freeze it; its cached classifier."""
    teacher_backbone = load_backbone(cfg.teacher_model, cfg.teacher_pretrained, device=backbone.device)
    for fact in ("image_size", "image_mean", "image_std"):
        if getattr(teacher_backbone, fact) != getattr(backbone, fact):
            raise ValueError(
                f"promptkd: teacher {cfg.teacher_model} and student {backbone.name} see the same images, "
                f"but their {fact} differ ({getattr(teacher_backbone, fact)} vs {getattr(backbone, fact)})"
            )
    templates = cfg.templates or None
    teacher = build_method(
        cfg.teacher_method, teacher_backbone, tasks, cfg.teacher_options, templates=templates
    )
    if cfg.teacher_state:
        load_teacher_state(teacher, cfg.teacher_state, cfg.teacher_method)
    teacher.requires_grad_(False)
    teacher.eval()
    classifier = teacher_text_features(teacher, TaskClasses.of(tasks), cfg.teacher_method)
    return teacher, classifier


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: PromptKDConfig) -> PromptKD:
    """The frozen teacher and its classifier once, then the student's prompts and projector."""
    classes = TaskClasses.of(tasks)
    teacher, classifier = build_teacher(backbone, tasks, cfg)
    depth = capped_depth(cfg.depth_vision, backbone.vision_layers)
    prompts = normal_prompts(depth, cfg.n_ctx_vision, backbone.vision_width, backbone.device)
    return PromptKD(backbone, classes, teacher, classifier.to(backbone.device), prompts, cfg)

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

Matches ``zhengli97/PromptKD`` ``trainers/promptkd.py`` (``reference/METHODS.md`` §6):
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
  ``ivlp`` teacher with 4+4 tokens, depth 9/9. Supported teachers are those with a fixed text
  classifier: methods with ``text_features(task)`` (``coop``, ``kgcoop``, ``ivlp``, ``maple``,
  ``bias_tuning``, ``softcpt``) and ``zeroshot`` (its ``text_features`` buffer). Image-conditioned
  (``cocoop``), classifier-free (``linear_probe``) and test-time (``tpt``) methods are refused.
* the teacher's text features are computed once at build time and cached (the paper "pre-stores"
  them; the reference code recomputes them each step under ``no_grad`` -- identical, as the
  teacher is frozen). Teacher logits come from the teacher method's own ``predict``.
* fp32 prompts, projector and logits (the reference halves the projector into its fp16 CLIP).
* the transductive, unlabelled data protocol (the whole train split of *all* classes, base and
  novel, labels ignored: the reference's ``DATASET.NUM_SHOTS 0``) is the data pipeline's job:
  ``data.shots=0``. The loop still passes labels today; this method ignores them.
* a prompt depth beyond the student's blocks means every block (as :mod:`~vlprompt.methods.ivlp`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone, load_backbone
from vlprompt.methods.common import (
    TaskClasses,
    check_templates,
    hold_backbone,
    normal_prompts,
    read_saved_state,
    require_images,
    vision_prompt_hooks,
)
from vlprompt.methods.ivlp import capped_depth

#: Teacher methods refused, with the reason (everything else needs a fixed text classifier).
UNSUPPORTED_TEACHERS: dict[str, str] = {
    "promptkd": "a PromptKD student has no text encoder of its own",
    "cocoop": "its text features depend on each image",
    "linear_probe": "it has no text classifier",
    "tpt": "it adapts its prompt to each test image",
}


@dataclass
class PromptKDConfig:
    """Options of PromptKD (``TRAINER.PROMPTKD.*`` in the reference configs, plus the teacher)."""

    teacher_model: str = "ViT-L-14"
    """open_clip architecture of the teacher (the reference: ViT-L/14)."""
    teacher_pretrained: str | None = "openai"
    """Teacher weights: an open_clip tag, a checkpoint path, ``"bundled"`` or null (random init)."""
    teacher_method: str = "zeroshot"
    """The vlprompt method the teacher runs (the reference: PromptSRC, i.e. ``ivlp`` 4+4 depth 9)."""
    teacher_options: dict[str, Any] = field(default_factory=dict)
    """Options of ``teacher_method``, validated like a method section."""
    teacher_state: str = ""
    """Path to the ``learned_state.pt`` of a vlprompt run of ``teacher_method``; empty: none."""
    templates: dict[str, str] = field(default_factory=dict)
    """Task → hand-crafted template, filled by the orchestrator; passed on to the teacher."""
    n_ctx_vision: int = 4
    """Student visual prompt tokens per prompted layer (``N_CTX_VISION``)."""
    depth_vision: int = 9
    """Student image layers with prompts, 0 .. depth-1 (``PROMPT_DEPTH_VISION``; 3 cross-dataset)."""
    kd_weight: float = 1000.0
    """Weight of the KL term (``KD_WEIGHT``; the reference uses 200 for FGVCAircraft, Flowers, DTD)."""
    temperature: float = 1.0
    """Distillation temperature τ (``TEMPERATURE``)."""

    def __post_init__(self) -> None:
        from vlprompt.methods import method_config  # the registry imports this module

        for name in ("n_ctx_vision", "depth_vision"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"promptkd {name} must be an integer >= 1, got {value!r}")
        for name in ("kd_weight", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"promptkd {name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if self.temperature <= 0 or self.kd_weight < 0:
            raise ValueError(
                "promptkd needs temperature > 0 and kd_weight >= 0, "
                f"got {self.temperature} and {self.kd_weight}"
            )
        if not isinstance(self.teacher_model, str) or not self.teacher_model:
            raise ValueError(
                f"promptkd teacher_model must be an open_clip model name, got {self.teacher_model!r}"
            )
        if self.teacher_pretrained is not None and not isinstance(self.teacher_pretrained, str):
            raise ValueError(
                "promptkd teacher_pretrained must be a tag, a path, 'bundled' or null, "
                f"got {self.teacher_pretrained!r}"
            )
        if not isinstance(self.teacher_state, str):
            raise ValueError(
                f"promptkd teacher_state must be a path string ('' for none), got {self.teacher_state!r}"
            )
        if not isinstance(self.teacher_options, Mapping):
            raise ValueError(f"promptkd teacher_options must be a mapping, got {self.teacher_options!r}")
        self.teacher_options = dict(self.teacher_options)
        check_templates("promptkd", None, self.templates)
        if self.teacher_method in UNSUPPORTED_TEACHERS:
            raise ValueError(
                f"promptkd teacher_method {self.teacher_method!r} is not supported: "
                f"{UNSUPPORTED_TEACHERS[self.teacher_method]}; a teacher needs a fixed text classifier "
                "(zeroshot, coop, kgcoop, ivlp, maple, bias_tuning, softcpt)"
            )
        try:
            method_config(self.teacher_method, self.teacher_options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"promptkd teacher ({self.teacher_method}): {err}") from err


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


def teacher_text_features(teacher: nn.Module, classes: TaskClasses, method: str) -> Tensor:
    """L2-normalised text features ``(C, D_t)`` of every class of every task, under no grad.

    ``text_features(task)`` for the prompt-learning methods; the ``text_features`` buffer
    (one row per class, :class:`TaskClasses` order) for ``zeroshot``.
    """
    encode = getattr(teacher, "text_features", None)
    with torch.no_grad():
        if callable(encode) and not getattr(teacher, "test_time_views", 0):
            rows = [encode(task) for task in classes.spans]
            features = torch.cat(rows)
        elif isinstance(encode, Tensor):
            features = encode
        else:
            raise ValueError(
                f"promptkd: teacher method {method!r} has no fixed text classifier (neither "
                "text_features(task) nor a text_features buffer); use zeroshot, coop, kgcoop, ivlp, "
                "maple, bias_tuning or softcpt"
            )
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

    frozen_image_tower: ClassVar[bool] = False
    token_space_keys: ClassVar[tuple[str, ...]] = ()

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
        embed_hook, layer_hook = vision_prompt_hooks(list(self.vision_prompts))
        feats = self.backbone.encode_image(
            images.to(self.backbone.device), embed_hook=embed_hook, layer_hook=layer_hook
        )
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
        return {name: t.detach().clone() for name, t in self.state_dict().items()}


def build_teacher(
    backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: PromptKDConfig
) -> tuple[nn.Module, Tensor]:
    """Load the teacher CLIP, build ``teacher_method`` on it, freeze it; its cached classifier."""
    from vlprompt.methods import build_method  # the registry imports this module

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

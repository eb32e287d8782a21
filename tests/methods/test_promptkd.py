"""PromptKD: the reference KL, the teacher's classifier, unlabelled training, state, teacher errors.

Student: the perturbed random ``vlp-tiny`` (embed 64); teacher: ``vlp-small`` with its bundled
pretrained weights (embed 128), so the projector really maps between two widths.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.methods import build_method, method_config
from vlprompt.methods.base import Batch, count_trainable
from vlprompt.methods.clip import Backbone
from vlprompt.methods.promptkd import PromptKD, PromptKDConfig, kd_loss

TASKS = {"t": ["golden_retriever", "airplane", "sea lion", "x"]}
TEMPLATE = "a photo of a {}."
TEACHER = {"teacher_model": "vlp-small", "teacher_pretrained": "bundled"}


def build(tiny: Backbone, **options: object) -> PromptKD:
    opts = {**TEACHER, "teacher_options": {"template": TEMPLATE}, **options}
    method = build_method("promptkd", tiny, TASKS, opts)
    assert isinstance(method, PromptKD)
    return method


@pytest.fixture(scope="module")
def student(tiny: Backbone) -> PromptKD:
    torch.manual_seed(0)
    return build(tiny)


def reference_kl(z_s: Tensor, z_t: Tensor, t: float) -> Tensor:
    """Σ p_t (log p_t − log p_s) over batch and classes, · τ² / (B · C), written out by hand."""
    p_t = torch.softmax(z_t / t, dim=1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(z_s / t, dim=1))).sum() * t * t / z_s.numel()


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_kd_loss_is_the_reference_kl(t: float) -> None:
    z_s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    z_t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]])
    torch.testing.assert_close(kd_loss(z_s, z_t, t), reference_kl(z_s, z_t, t))
    assert float(kd_loss(z_t, z_t, t)) == pytest.approx(0.0, abs=1e-7)


def test_training_loss_is_kd_weight_times_kl_of_student_and_teacher(
    student: PromptKD, images: Tensor
) -> None:
    batch = Batch("t", images=images, labels=None)
    student.eval()  # deterministic BN, so the logits below are the ones inside the loss
    with torch.no_grad():
        loss = student.training_loss(batch)
        z_s, z_t = student.predict(batch), student.teacher.predict(batch)
    torch.testing.assert_close(loss, 1000.0 * reference_kl(z_s, z_t, 1.0))
    labelled = Batch("t", images=images, labels=torch.tensor([0, 1, 2, 3, 0, 1]))
    with torch.no_grad():
        assert float(student.training_loss(labelled)) == float(loss)  # labels ignored


def test_classifier_rows_are_the_teachers_normalised_text_features(student: PromptKD, tiny: Backbone) -> None:
    teacher = student.teacher
    assert student.classifier.shape == (4, 128) and teacher.backbone.embed_dim == 128
    torch.testing.assert_close(
        student.classifier, F.normalize(teacher.text_features("t"), dim=-1), rtol=0, atol=0
    )
    ivlp = build(tiny, teacher_method="ivlp", teacher_options={"n_ctx_text": 2, "n_ctx_vision": 2})
    with torch.no_grad():
        expected = F.normalize(ivlp.teacher.text_features("t"), dim=-1)
    torch.testing.assert_close(ivlp.classifier, expected)


def test_student_logits_use_its_own_clip_logit_scale(
    student: PromptKD, tiny: Backbone, images: Tensor
) -> None:
    student.eval()
    logits = student.predict(Batch("t", images=images))
    with torch.no_grad():
        feats = F.normalize(student.image_features(images), dim=-1)
    assert logits.shape == (6, 4)
    torch.testing.assert_close(logits, tiny.logit_scale * feats @ student.classifier.T)


def test_trainable_parts_and_their_count(student: PromptKD, tiny: Backbone) -> None:
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in student.named_parameters()}
    assert {n.split(".")[0] for n in names} == {"vision_prompts", "projector"}
    # 2 layers (depth 9 capped) · 4 · 64  +  (64·128 + 128) + 2·128 + (128·128 + 128)
    assert count_trainable(student) == 2 * 4 * 64 + 8_320 + 256 + 16_512
    assert all(not p.requires_grad for p in student.teacher.parameters())


def test_unlabelled_training_reaches_only_prompts_and_projector(tiny: Backbone, images: Tensor) -> None:
    """The student's backbone stays frozen (the matrix checks it); the teacher's must too."""
    torch.manual_seed(0)
    method = build(tiny)
    teacher_before = copy.deepcopy(method.teacher.backbone.model.state_dict())
    classifier_before = method.classifier.clone()
    batch = Batch("t", images=images, labels=None)
    method.train()
    optim = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = method.training_loss(batch)
        optim.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses  # about 1080 → 100 on this batch
    for name, tensor in method.teacher.backbone.model.state_dict().items():
        assert torch.equal(tensor, teacher_before[name]), name
    assert all(p.grad is None for p in method.teacher.backbone.model.parameters())
    assert torch.equal(method.classifier, classifier_before)


def test_learned_state_round_trips_with_batchnorm_statistics(tiny: Backbone, images: Tensor) -> None:
    torch.manual_seed(0)
    method = build(tiny)
    method.train()
    with torch.no_grad():
        method.training_loss(Batch("t", images=images))  # moves the BN running statistics
    state = method.learned_state()
    assert {k for k in state if k.startswith("vision_prompts")} == {"vision_prompts.0", "vision_prompts.1"}
    assert "projector.conv1.1.running_mean" in state and "projector.conv1.1.num_batches_tracked" in state
    assert not any(k.startswith(("classifier", "teacher", "backbone")) for k in state)
    torch.manual_seed(1)
    fresh = build(tiny)
    fresh.load_state_dict(state)
    method.eval()
    fresh.eval()
    batch = Batch("t", images=images)
    torch.testing.assert_close(fresh.predict(batch), method.predict(batch), rtol=0, atol=0)


def test_teacher_state_is_loaded_and_bad_files_are_named(tiny: Backbone, tmp_path: Path) -> None:
    opts = {"teacher_method": "coop", "teacher_options": {"n_ctx": 2}}
    ctx = torch.randn(2, 64)
    good = tmp_path / "learned_state.pt"
    torch.save({"ctx": ctx}, good)
    method = build(tiny, **opts, teacher_state=str(good))
    torch.testing.assert_close(method.teacher.ctx, ctx, rtol=0, atol=0)
    assert not method.teacher.ctx.requires_grad
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build(tiny, **opts, teacher_state=str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        build(tiny, **opts, teacher_state=str(garbage))
    other = tmp_path / "other_method.pt"
    torch.save({"vision_prompts.0": torch.zeros(4, 64)}, other)
    with pytest.raises(ValueError, match=re.escape(str(other))):
        build(tiny, **opts, teacher_state=str(other))
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save({"ctx": torch.zeros(3, 64)}, wrong_shape)
    with pytest.raises(ValueError, match=re.escape(str(wrong_shape))):
        build(tiny, **opts, teacher_state=str(wrong_shape))


@pytest.mark.parametrize("teacher", ["cocoop", "linear_probe", "tpt", "promptkd"])
def test_unsupported_teacher_methods_are_refused(teacher: str) -> None:
    with pytest.raises(ValueError, match=f"teacher_method '{teacher}' is not supported"):
        method_config("promptkd", {"teacher_method": teacher})


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        method_config("promptkd", {"teacher_method": "zeroshoot"})
    with pytest.raises(ValueError, match="unknown option 'n_ctxx'"):
        method_config("promptkd", {"teacher_method": "coop", "teacher_options": {"n_ctxx": 4}})
    for bad in ({"n_ctx_vision": 0}, {"depth_vision": 0}, {"temperature": 0.0}, {"kd_weight": float("nan")}):
        with pytest.raises(ValueError, match="promptkd"):
            PromptKDConfig(**bad)
    assert PromptKDConfig(kd_weight=200).kd_weight == 200.0


def test_cached_features_and_single_image_batches_are_refused(student: PromptKD, images: Tensor) -> None:
    with pytest.raises(ValueError, match="cached image features"):
        student.training_loss(Batch("t", features=torch.randn(2, 64)))
    student.train()
    with pytest.raises(ValueError, match=">= 2"):
        student.training_loss(Batch("t", images=images[:1]))


def test_templates_reach_a_zeroshot_teacher(tiny: Backbone) -> None:
    method = build_method("promptkd", tiny, TASKS, TEACHER, templates={"t": TEMPLATE})
    reference = build(tiny)
    torch.testing.assert_close(method.classifier, reference.classifier, rtol=0, atol=0)

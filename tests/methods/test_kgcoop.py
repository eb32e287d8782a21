"""KgCoOp: the knowledge term against the template it is built from, training, counts, templates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, Method
from vlprompt.methods.clip import Backbone
from vlprompt.methods.coop import CoOp
from vlprompt.methods.kgcoop import KgCoOp, KgCoOpConfig

CLASSES = ["golden_retriever", "airplane", "sea lion", "annual crop land", "x"]
TEMPLATE = "a photo of a {}."


def kgcoop(
    backbone: Backbone,
    tasks: dict[str, list[str]] | None = None,
    templates: dict[str, str] | None = None,
    **options: object,
) -> KgCoOp:
    tasks = tasks or {"pets": CLASSES}
    templates = templates or dict.fromkeys(tasks, TEMPLATE)
    method = build_method("kgcoop", backbone, tasks, options, templates=templates)
    assert isinstance(method, KgCoOp) and isinstance(method, Method)
    return method


def perturb(method: KgCoOp, seed: int = 0) -> None:
    with torch.no_grad():
        method.ctx.add_(0.5 * torch.randn(method.ctx.shape, generator=torch.Generator().manual_seed(seed)))


def kg(method: KgCoOp, task: str) -> float:
    with torch.no_grad():
        return float(method.knowledge_loss(task))


def test_knowledge_term_vanishes_on_the_template_it_spells(tiny: Backbone, images: Tensor) -> None:
    method = kgcoop(tiny)  # ctx "a photo of a" + "{class}." spells TEMPLATE exactly
    batch = Batch("pets", images=images, labels=torch.tensor([0, 1, 2, 3, 4, 0]))
    assert kg(method, "pets") < 1e-6
    zero_shot = build_method("zeroshot", tiny, {"pets": CLASSES}, {"template": TEMPLATE}).predict(batch)
    plain_ce = F.cross_entropy(zero_shot, batch.labels)
    assert float(plain_ce) > 0.1
    torch.testing.assert_close(method.training_loss(batch), plain_ce, rtol=0, atol=1e-5)
    torch.testing.assert_close(method.predict(batch), zero_shot, rtol=0, atol=1e-5)

    perturb(method)
    assert kg(method, "pets") > 1e-3


def test_lambda_scales_the_knowledge_term_linearly(tiny: Backbone, images: Tensor) -> None:
    batch = Batch("pets", images=images, labels=torch.tensor([0, 1, 2, 3, 4, 0]))
    no_kg = kgcoop(tiny, lam=0)
    perturb(no_kg)
    losses = {}
    for lam in (0.0, 2.0, 8.0):
        method = kgcoop(tiny, lam=lam)
        method.load_state_dict(no_kg.learned_state())
        with torch.no_grad():
            losses[lam] = float(method.training_loss(batch))
    term = kg(no_kg, "pets")
    assert losses[0.0] == pytest.approx(float(F.cross_entropy(no_kg.predict(batch), batch.labels)), abs=1e-5)
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * term, rel=1e-4)
    assert losses[8.0] - losses[0.0] == pytest.approx(8 * term, rel=1e-4)
    assert KgCoOpConfig().lam == 8.0


def test_overfits_cached_features(tiny: Backbone) -> None:
    torch.manual_seed(0)
    method = kgcoop(tiny, {"t": ["cat", "dog", "car", "tree"]})
    ctx0 = method.ctx.detach().clone()
    batch = Batch(
        "t", features=torch.randn(4, 64, generator=torch.Generator().manual_seed(2)), labels=torch.arange(4)
    )
    optimizer = torch.optim.SGD(method.parameters(), lr=0.002, momentum=0.9)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = method.training_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # SGD as the reference (lr 0.002, momentum 0.9); observed 5.11 -> 0.73 (x7.0) for this backbone
    # seed, x7-x11 over seeds 0-2
    assert losses[-1] < losses[0] / 5
    assert kg(method, "t") > 0  # pulled away from the template, but held by λ
    assert not torch.equal(method.ctx.detach(), ctx0)


def test_per_task_templates_and_override(tiny: Backbone) -> None:
    tasks = {"pets": CLASSES, "cars": ["audi", "bmw"]}
    per_task = kgcoop(tiny, tasks, {"pets": TEMPLATE, "cars": "{} car."})
    assert kg(per_task, "pets") < 1e-6
    assert kg(per_task, "cars") > 1e-3  # its targets come from "{} car."
    overridden = kgcoop(tiny, tasks, {"pets": "{} pet.", "cars": "{} car."}, template=TEMPLATE)
    assert kg(overridden, "cars") < 1e-6
    assert not set(per_task.state_dict()) & {"targets", "token_prefix", "token_suffix"}


def test_checkpoint_is_a_coop_checkpoint(tiny: Backbone, images: Tensor) -> None:
    method = kgcoop(tiny)
    perturb(method)
    assert set(method.learned_state()) == set(method.state_dict()) == {"ctx"}
    coop = build_method("coop", tiny, {"pets": CLASSES}, {"ctx_init": "a photo of a"})
    assert isinstance(coop, CoOp)
    coop.load_state_dict(method.learned_state())
    batch = Batch("pets", images=images)
    torch.testing.assert_close(method.predict(batch), coop.predict(batch), rtol=0, atol=1e-5)


def test_config_and_template_errors(tiny: Backbone) -> None:
    with pytest.raises(ValueError, match=r"unknown option 'w' for method 'kgcoop'.*valid options: .*lam"):
        build_method("kgcoop", tiny, {"pets": CLASSES}, {"w": 8.0})
    with pytest.raises(ValueError, match=r"no hand-crafted template for task 'pets'"):
        build_method("kgcoop", tiny, {"pets": CLASSES}, {})
    with pytest.raises(ValueError, match=r"unknown tasks \['pts'\]"):
        build_method("kgcoop", tiny, {"pets": CLASSES}, {"templates": {"pets": TEMPLATE, "pts": TEMPLATE}})
    with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
        KgCoOpConfig(template="a photo of a dog.")
    with pytest.raises(ValueError, match="lam"):
        KgCoOpConfig(lam=-1.0)
    with pytest.raises(ValueError, match="labels"):
        kgcoop(tiny).training_loss(Batch("pets", features=torch.randn(2, 64)))

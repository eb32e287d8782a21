"""CoCoOp: batched passes equal the per-image maths, the zero-shift sentence, training, counts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vlprompt.methods import build_method, method_config
from vlprompt.methods.base import Batch, Method
from vlprompt.methods.clip import Backbone
from vlprompt.methods.cocoop import CoCoOp, CoCoOpConfig

CLASSES = ["golden_retriever", "airplane", "sea lion", "annual crop land", "x"]


def cocoop(backbone: Backbone, tasks: dict[str, list[str]] | None = None, **options: object) -> CoCoOp:
    method = build_method("cocoop", backbone, tasks or {"pets": CLASSES}, options)
    assert isinstance(method, CoCoOp) and isinstance(method, Method)
    return method


@pytest.fixture(scope="module")
def features() -> Tensor:
    """Six distinct cached image features of the tiny model's width (64)."""
    return torch.randn(6, 64, generator=torch.Generator().manual_seed(4))


def test_parameter_names_and_shapes_vit_b16(vit_b16: Backbone) -> None:
    """The reference's names (checkpoints load by them); the count is the matrix's."""
    method = cocoop(vit_b16, {"pets": ["abyssinian", "beagle"]})
    shapes = {name: tuple(p.shape) for name, p in method.named_parameters()}
    assert shapes == {
        "ctx": (4, 512),
        "meta_net.linear1.weight": (32, 512),
        "meta_net.linear1.bias": (32,),
        "meta_net.linear2.weight": (512, 32),
        "meta_net.linear2.bias": (512,),
    }


def grads(method: CoCoOp) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("budget", [1000, 7])  # 7 < 6 images x 5 classes: passes split an image's classes
def test_batched_equals_batch_of_one(tiny: Backbone, features: Tensor, budget: int) -> None:
    torch.manual_seed(0)
    method = cocoop(tiny, max_prompts_per_pass=budget)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    batched = method.predict(Batch("pets", features=features))
    single = torch.cat([method.predict(Batch("pets", features=f[None])) for f in features])
    assert batched.shape == (6, 5)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    assert float(single.std()) > 0.1

    # mean loss over the batch x B == sum of the per-image (batch-1, reference) losses
    method.zero_grad()
    (method.training_loss(Batch("pets", features=features, labels=labels)) * 6).backward()
    together = grads(method)
    method.zero_grad()
    for f, y in zip(features, labels, strict=True):
        method.training_loss(Batch("pets", features=f[None], labels=y[None])).backward()
    one_by_one = grads(method)
    assert set(together) == set(one_by_one) == {name for name, _ in method.named_parameters()}
    for name, grad in one_by_one.items():
        assert float(grad.abs().max()) > 1e-4, name  # every part of the Meta-Net is reached
        torch.testing.assert_close(together[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_zero_shift_is_the_zero_shot_sentence(tiny: Backbone, images: Tensor) -> None:
    method = cocoop(tiny, ctx_init="a photo of a")
    with torch.no_grad():
        method.meta_net.linear2.weight.zero_()
        method.meta_net.linear2.bias.zero_()
    fixed = build_method("zeroshot", tiny, {"pets": CLASSES}, {"template": "a photo of a {}."})
    batch = Batch("pets", images=images)
    expected = fixed.predict(batch)
    torch.testing.assert_close(method.predict(batch), expected, rtol=0, atol=1e-5)
    assert float(expected.std()) > 0.1


def test_overfits_cached_features(tiny: Backbone) -> None:
    torch.manual_seed(0)
    method = cocoop(tiny, {"t": ["cat", "dog", "car", "tree"]})
    start = {k: v.clone() for k, v in method.learned_state().items()}
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
    # SGD as the reference (lr 0.002, momentum 0.9); observed 5.94 -> 0.93 (x6.4) for this backbone
    # seed, x2.6-x6.4 over seeds 0-2 (seed 1 starts at 1.13)
    assert losses[-1] < losses[0] / 4
    assert all(not torch.equal(v, start[k]) for k, v in method.learned_state().items())


def test_multi_task_and_transfer_to_new_classes(tiny: Backbone, features: Tensor) -> None:
    torch.manual_seed(0)
    both = cocoop(tiny, {"pets": CLASSES, "vehicles": ["car", "bus"]})
    alone = cocoop(tiny, {"vehicles": ["car", "bus"]})
    assert (
        set(both.learned_state()) == set(both.state_dict()) == {name for name, _ in both.named_parameters()}
    )
    alone.load_state_dict(both.learned_state())
    logits = both.predict(Batch("vehicles", features=features))
    assert logits.shape == (6, 2)
    torch.testing.assert_close(logits, alone.predict(Batch("vehicles", features=features)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown task 'animals'"):
        both.predict(Batch("animals", features=features))


def test_config_and_registry_errors(tiny: Backbone) -> None:
    assert CoCoOpConfig() == CoCoOpConfig(n_ctx=4, ctx_init="a photo of a", max_prompts_per_pass=None)
    with pytest.raises(ValueError, match="max_prompts_per_pass"):
        CoCoOpConfig(max_prompts_per_pass=0)
    with pytest.raises(ValueError, match="n_ctx"):
        CoCoOpConfig(n_ctx=0)
    with pytest.raises(ValueError, match=r"unknown option 'csc' for method 'cocoop'.*valid options: n_ctx"):
        build_method("cocoop", tiny, {"pets": CLASSES}, {"csc": True})
    with pytest.raises(ValueError, match=r"unknown option 'max_prompts' .*'max_prompts_per_pass'"):
        method_config("cocoop", {"max_prompts": 8})
    with pytest.raises(ValueError, match=r"cocoop: class name .* is 80 tokens"):
        cocoop(tiny, {"pets": ["cat", " ".join(["tabby"] * 80)]})

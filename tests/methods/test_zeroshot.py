"""Zero-shot CLIP: the logits open_clip itself gives for the filled-in templates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.zeroshot import ZeroShotConfig

CLASSES = ["golden_retriever", "sea lion", "airplane"]


def test_logits_equal_open_clip(tiny: Backbone, images: Tensor) -> None:
    method = build_method(
        "zeroshot", tiny, {"pets": CLASSES}, {}, templates={"pets": "a photo of a {}, a type of pet."}
    )
    prompts = [f"a photo of a {c.replace('_', ' ')}, a type of pet." for c in CLASSES]
    with torch.no_grad():
        text = F.normalize(tiny.model.encode_text(tiny.tokenizer(prompts)), dim=-1)
        image = F.normalize(tiny.model.encode_image(images), dim=-1)
        expected = tiny.model.logit_scale.exp() * image @ text.T
    logits = method.predict(Batch("pets", images=images))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert float(expected.std()) > 0.1


def test_template_overrides_per_task_templates(tiny: Backbone, images: Tensor) -> None:
    tasks = {"pets": CLASSES, "cars": ["audi", "bmw"]}
    per_task = build_method(
        "zeroshot", tiny, tasks, {}, templates={"pets": "{}.", "cars": "a photo of a {}."}
    )
    global_ = build_method(
        "zeroshot", tiny, tasks, {"template": "a photo of a {}."}, templates={"pets": "{}."}
    )
    cars, pets = Batch("cars", images=images), Batch("pets", images=images)
    torch.testing.assert_close(per_task.predict(cars), global_.predict(cars), rtol=0, atol=1e-5)
    assert float((per_task.predict(pets) - global_.predict(pets)).abs().max()) > 1e-2
    assert per_task.predict(cars).shape == (6, 2)


def test_template_errors(tiny: Backbone, images: Tensor) -> None:
    with pytest.raises(ValueError, match=r"no hand-crafted template for task 'pets'"):
        build_method("zeroshot", tiny, {"pets": CLASSES}, {})
    with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
        ZeroShotConfig(template="a photo of a dog.")
    with pytest.raises(ValueError, match=r"unknown tasks \['pts'\]"):
        build_method("zeroshot", tiny, {"pets": CLASSES}, {"templates": {"pets": "{}", "pts": "{}"}})
    method = build_method("zeroshot", tiny, {"pets": CLASSES}, {"template": "{}"})
    with pytest.raises(RuntimeError, match="nothing to train"):
        method.training_loss(Batch("pets", images=images, labels=torch.zeros(6, dtype=torch.long)))


def test_prompt_ensembles_average_normalised_sentence_features(tiny: Backbone, images: Tensor) -> None:
    from vlprompt.methods.zeroshot import ENSEMBLES

    # CoOp's IMAGENET_TEMPLATES_SELECT (KaiyangZhou/CoOp trainers/imagenet_templates.py), in its order
    assert ENSEMBLES["imagenet7"] == (
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    )  # fmt: skip
    assert len(ENSEMBLES["imagenet80"]) == 80 and all(t.count("{}") == 1 for t in ENSEMBLES["imagenet80"])
    own = "a photo of a {}, a type of pet."
    method = build_method("zeroshot", tiny, {"pets": CLASSES}, {"ensemble": "imagenet7+dataset"},
                          templates={"pets": own})  # fmt: skip
    names = [c.replace("_", " ") for c in CLASSES]
    with torch.no_grad():
        per_template = [
            F.normalize(tiny.model.encode_text(tiny.tokenizer([t.format(n) for n in names])), dim=-1)
            for t in (*ENSEMBLES["imagenet7"], own)
        ]
        text = F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)
        image = F.normalize(tiny.model.encode_image(images), dim=-1)
        expected = tiny.model.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(method.predict(Batch("pets", images=images)), expected, rtol=0, atol=1e-4)
    single = build_method("zeroshot", tiny, {"pets": CLASSES}, {}, templates={"pets": own})
    assert not torch.allclose(single.predict(Batch("pets", images=images)), expected, atol=1e-3)


def test_every_ensemble_a_catalog_entry_names_exists() -> None:
    from vlprompt.datasets import CATALOG
    from vlprompt.methods.zeroshot import ENSEMBLES

    named = {e for entry in CATALOG.values() for e in entry.ensembles}
    assert named == set(ENSEMBLES)
    assert CATALOG["imagenet"].ensembles == ("imagenet80", "imagenet7")
    with pytest.raises(ValueError, match="ensemble"):
        ZeroShotConfig(ensemble="imagenet81")

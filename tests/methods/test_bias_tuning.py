"""Bias tuning: zero init is zero-shot CLIP, layer locality, placement, training; parameter matching."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, count_trainable
from vlprompt.methods.bias_tuning import BiasTuning, BiasTuningConfig
from vlprompt.methods.clip import Backbone
from vlprompt.methods.param_match import count_pair, match_bias_tuning

CLASSES = ["golden_retriever", "airplane", "sea lion", "x"]
TEMPLATE = "a photo of a {}."


def bias(backbone: Backbone, **options: object) -> BiasTuning:
    method = build_method("bias_tuning", backbone, {"t": CLASSES}, {"template": TEMPLATE, **options})
    assert isinstance(method, BiasTuning)
    return method


@pytest.mark.parametrize("site", ["attn", "mlp", "both"])
def test_zero_init_is_exactly_zero_shot(tiny: Backbone, images: Tensor, site: str) -> None:
    method = bias(tiny, site=site, slots=3)
    expected = build_method("zeroshot", tiny, {"t": CLASSES}, {"template": TEMPLATE}).predict(
        Batch("t", images=images)
    )
    torch.testing.assert_close(method.predict(Batch("t", images=images)), expected, rtol=0, atol=0)
    assert float(expected.std()) > 0.1


def capture(method: BiasTuning, tower: str, images: Tensor) -> list[Tensor]:
    """Input of every block of ``tower`` (hidden states) with the method's biases in place."""
    seen: list[Tensor] = []

    def record(i: int, x: Tensor) -> Tensor:
        seen.append(x.clone())
        return x

    backbone = method.backbone
    with torch.no_grad():
        if tower == "vision":
            backbone.encode_image(images, layer_hook=record, block_hooks=method.block_hooks("vision"))
        else:
            backbone.encode_text_embeddings(
                method.prompts, method.eot, layer_hook=record, block_hooks=method.block_hooks("text")
            )
    return seen


@pytest.mark.parametrize("tower", ["text", "vision"])
@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_a_bias_in_layer_k_changes_states_only_after_layer_k(
    tiny: Backbone, images: Tensor, tower: str, site: str
) -> None:
    method = bias(tiny, tower=tower, layers=[0, 1], site=site)
    reference = capture(method, tower, images)
    with torch.no_grad():
        method.biases[f"{tower}_{site}"][0].normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    moved = capture(method, tower, images)
    assert torch.equal(reference[0], moved[0])  # block 0's input: before the bias
    assert float((reference[1] - moved[1]).abs().max()) > 0.1  # block 1's input: after it
    with torch.no_grad():
        method.biases[f"{tower}_{site}"].zero_()
        method.biases[f"{tower}_{site}"][1].fill_(1.0)
    late = capture(method, tower, images)
    assert all(torch.equal(a, b) for a, b in zip(reference, late, strict=True))  # block 1 is the last


def test_slots_bias_positions(tiny: Backbone, images: Tensor) -> None:
    """Slot j < k-1 biases position j only; the last slot every later position."""
    method = bias(tiny, tower="vision", layers=[0], slots=3)
    with torch.no_grad():
        method.biases["vision_attn"][0, 1].fill_(1.0)  # position 1 only
    hooks = method.block_hooks("vision")
    assert hooks is not None and hooks.after_attn is not None and hooks.after_mlp is None
    x = torch.zeros(2, 17, 64)
    out = hooks.after_attn(0, x)
    assert out[:, 1].eq(1).all() and out[:, 0].eq(0).all() and out[:, 2:].eq(0).all()
    with torch.no_grad():
        method.biases["vision_attn"][0, 2].fill_(2.0)
    assert hooks.after_attn(0, x)[:, 2:].eq(2).all()


def test_placement_and_counts(tiny: Backbone) -> None:
    assert count_trainable(bias(tiny)) == 2 * (64 + 64)  # default depth 9, capped at 2 blocks
    method = bias(tiny, tower="text", layers=[1], site="both", slots=4)
    assert {k: tuple(v.shape) for k, v in method.biases.items()} == {
        "text_attn": (1, 4, 64),
        "text_mlp": (1, 4, 64),
    }
    assert bias(tiny, layers={"text": 1, "vision": [0, 1]}, slots={"text": 2, "vision": 5}).layers == {
        "text": (0,),
        "vision": (0, 1),
    }
    with pytest.raises(ValueError, match="exceed the tower's 2 blocks"):
        bias(tiny, layers=[3])
    with pytest.raises(ValueError, match="slots exceed its 17 token positions"):
        bias(tiny, tower="vision", slots=18)
    with pytest.raises(ValueError, match="site"):
        BiasTuningConfig(site="ffn")
    with pytest.raises(ValueError, match="layers"):
        BiasTuningConfig(layers=[0, 0])
    with pytest.raises(ValueError, match="template"):
        build_method("bias_tuning", tiny, {"t": CLASSES}, {})


def test_text_only_biases_accept_cached_features(tiny: Backbone, images: Tensor) -> None:
    method = bias(tiny, tower="text")
    with torch.no_grad():
        features = tiny.encode_image(images)
    torch.testing.assert_close(
        method.predict(Batch("t", features=features)),
        method.predict(Batch("t", images=images)),
        rtol=0,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="cached image features cannot be used"):
        bias(tiny).predict(Batch("t", features=features))


def test_training_overfits(tiny: Backbone, images: Tensor) -> None:
    torch.manual_seed(0)
    method = build_method("bias_tuning", tiny, {"t": ["cat", "dog", "car", "tree"]}, {"template": TEMPLATE})
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    batch = Batch("t", images=images[:4], labels=torch.arange(4))
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = method.training_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]  # observed 1.55 -> 0.0035
    assert all(float(b.detach().abs().max()) > 0 for b in method.biases.values())


GRID = [
    ("ivlp", {}),
    ("ivlp", {"n_ctx_text": 4, "n_ctx_vision": 4, "depth_text": 9, "depth_vision": 9}),
    ("ivlp", {"n_ctx_text": 3, "depth_text": 1, "n_ctx_vision": 5, "depth_vision": 2}),
    ("ivlp", {"n_ctx_text": 2, "depth_text": 2, "n_ctx_vision": 0, "depth_vision": 0}),
    ("maple", {}),
    ("maple", {"n_ctx": 3, "ctx_init": "", "prompt_depth": 1}),
    ("coop", {"n_ctx": 16}),
    ("coop", {"ctx_init": "a photo of a"}),
    ("coop", {"n_ctx": 4, "csc": True}),
]


@pytest.mark.parametrize(("name", "options"), GRID)
def test_parameter_matching_is_exact_on_the_tiny_model(tiny: Backbone, name: str, options: dict) -> None:
    match = match_bias_tuning(tiny, name, options)
    assert match.exact and match.prompt_params == match.bias_params > 0
    # recount both from freshly built modules
    assert count_pair(tiny, name, options, match.config) == (match.prompt_params, match.prompt_params)


def test_parameter_matching_on_vit_b16(vit_b16: Backbone) -> None:
    ivlp = match_bias_tuning(
        vit_b16, "ivlp", {"n_ctx_text": 4, "n_ctx_vision": 4, "depth_text": 9, "depth_vision": 9}
    )
    assert (ivlp.prompt_params, ivlp.bias_params) == (46_080, 46_080)
    assert ivlp.config.slots == {"text": 4, "vision": 4} and ivlp.config.layers == {"text": 9, "vision": 9}
    assert match_bias_tuning(vit_b16, "ivlp", {}).bias_params == 30_720
    assert match_bias_tuning(vit_b16, "coop", {"n_ctx": 16}).bias_params == 8_192
    # MaPLe: 3,555,072 = 256 * 13,887 (odd) is out of reach of 512/768-wide vectors here; 256 short
    maple = match_bias_tuning(vit_b16, "maple", {})
    assert (maple.prompt_params, maple.bias_params, maple.difference) == (3_555_072, 3_554_816, 256)
    assert count_pair(vit_b16, "maple", {}, maple.config) == (3_555_072, 3_554_816)


@pytest.mark.parametrize(
    "spec",
    [
        "ivlp n_ctx_text=2 n_ctx_vision=2 depth_text=2 depth_vision=2",
        "coop n_ctx=4",
        "maple n_ctx=2 prompt_depth=2",
    ],
)
def test_match_option_builds_the_parameter_matched_placement(tiny: Backbone, spec: str) -> None:
    """``match`` is how a sweep asks for "the bias configuration of this prompt configuration"."""
    name, *pairs = spec.split()
    options = {k: int(v) for k, v in (p.split("=") for p in pairs)}
    prompt = build_method(name, tiny, {"t": CLASSES}, options)
    expected = match_bias_tuning(tiny, name, options)
    method = bias(tiny, match=spec, tower="text", layers=1)  # placement fields are replaced
    assert count_trainable(method) == expected.bias_params
    assert expected.exact and count_trainable(method) == count_trainable(prompt)


@pytest.mark.parametrize("spec", ["", "n_ctx=2", "ivlp n_ctx_text", "ivlp depth=9 =3"])
def test_match_option_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="match"):
        BiasTuningConfig(match=spec)

"""The method registry: explicit names, config validation, and the package's layering."""

from __future__ import annotations

import pytest

from vlprompt.methods import METHODS, build_method, get_method, method_config, method_option_names
from vlprompt.methods.base import Method
from vlprompt.methods.clip import Backbone
from vlprompt.methods.coop import CoOpConfig

# PromptKD's default teacher is ViT-L-14 "openai" (a download); tests use the bundled small CLIP
OFFLINE_OPTIONS = {"promptkd": {"teacher_model": "vlp-small", "teacher_pretrained": "bundled"}}


def test_registry_names() -> None:
    assert {"ivlp", "maple", "bias_tuning"} <= set(METHODS)
    assert {"cocoop", "coop", "kgcoop", "zeroshot"} <= set(METHODS)
    assert get_method("coop").config is CoOpConfig
    assert method_option_names("coop") == ("n_ctx", "ctx_init", "class_token_position", "csc")
    assert method_option_names("zeroshot") == ("template", "templates", "ensemble")


def test_unknown_method_lists_names_and_suggests() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown method 'coopp' \(did you mean 'coop'\?\); "
        r"known methods: bias_tuning, cocoop, coop, ivlp, kgcoop, linear_probe, maple, promptkd, softcpt, "
        r"tpt, zeroshot",
    ):
        get_method("coopp")


def test_unknown_option_names_key_and_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown option 'n_ctxx' for method 'coop' \(did you mean 'n_ctx'\?\).*"
        r"valid options: n_ctx, ctx_init, class_token_position, csc",
    ):
        method_config("coop", {"n_ctxx": 4})
    with pytest.raises(ValueError, match="class_token_position"):
        method_config("coop", {"class_token_position": "start"})
    assert method_config("coop", {"n_ctx": 4, "csc": True}) == CoOpConfig(n_ctx=4, csc=True)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_and_follows_the_protocol(tiny: Backbone, name: str) -> None:
    options = OFFLINE_OPTIONS.get(name, {})
    method = build_method(name, tiny, {"t": ["cat", "dog"]}, options, templates={"t": "a photo of a {}."})
    assert isinstance(method, Method)
    assert method.frozen_image_tower is (name not in {"ivlp", "maple", "bias_tuning", "promptkd"})
    assert not any(p is q for p in method.parameters() for q in tiny.parameters())  # backbone not owned
    assert set(method.learned_state()) <= set(method.state_dict())

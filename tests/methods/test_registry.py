"""The method registry: explicit names, config validation, and the package's layering."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlprompt.methods import METHODS, get_method, method_config, method_option_names, pretrained
from vlprompt.methods.coop import CoOpConfig


def test_registry_names() -> None:
    assert get_method("coop").options is CoOpConfig
    assert method_option_names("coop") == ("n_ctx", "ctx_init", "class_token_position", "csc")
    assert method_option_names("zeroshot") == ("template", "templates", "ensemble")


def test_unknown_method_lists_names_and_suggests() -> None:
    known = ", ".join(sorted(METHODS))
    with pytest.raises(
        ValueError, match=rf"unknown method 'coopp' \(did you mean 'coop'\?\); known methods: {known}$"
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


def test_the_registry_options_and_model_names_import_without_torch() -> None:
    """The experiment driver validates configs against these before torch is worth importing."""
    code = (
        "import sys; import vlprompt.methods, vlprompt.methods.options, vlprompt.methods.pretrained; "
        "heavy = [m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_model_names_are_what_open_clip_lists() -> None:
    import open_clip

    from vlprompt.methods import clip  # noqa: F401 - registers vlprompt's model configs

    assert set(pretrained.model_names()) == set(open_clip.list_models())
    assert {"ViT-B-16", "vlp-tiny", "vlp-small"} <= set(pretrained.model_names())
    assert pretrained.bundled_models() == ("vlp-small",)


@pytest.mark.parametrize(
    ("value", "is_path"),
    [
        ("openai", False),
        ("bundled", False),
        (None, False),
        ("laion2b_s34b_b88k", False),
        ("weights.ckpt", True),
        ("ViT-B-16.pt", True),
        ("model.SAFETENSORS", True),
        ("./openai", True),
        ("~/models/clip.bin", True),
        ("/abs/clip", True),
        ("sub/dir/clip", True),
    ],
)
def test_one_checkpoint_path_rule(value: str | None, is_path: bool) -> None:
    assert pretrained.is_checkpoint_path(value) is is_path

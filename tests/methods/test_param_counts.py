"""Exact trainable-parameter counts on ViT-B/16 (``reference/METHODS.md`` §1 and §11).

A random-init ``ViT-B-16`` (open_clip's built-in config, nothing downloaded) has the real
shapes; counting needs no weights.
"""

from __future__ import annotations

import pytest

from vlprompt.methods import build_method
from vlprompt.methods.base import count_trainable
from vlprompt.methods.clip import Backbone, load_backbone

TASKS = {"pets": ["abyssinian", "beagle"]}


@pytest.fixture(scope="module")
def vit_b16() -> Backbone:
    return load_backbone("ViT-B-16", None)


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("coop", {"n_ctx": 16}, 8_192),
        ("coop", {"n_ctx": 4}, 2_048),
        ("coop", {"ctx_init": "a photo of a"}, 2_048),
        ("coop", {"n_ctx": 16, "csc": True}, 2 * 16 * 512),
        # SoftCPT-NATA: proj 512 x (16 * 512) + task context 4 x 512 (METHODS.md §5, §11)
        ("softcpt", {}, 4_196_352),
        ("zeroshot", {"template": "a photo of a {}."}, 0),
        # PromptKD student, random ViT-L-14 teacher: vision prompts 9 x 4 x 768 + projector
        # Conv1x1(512->768) 393,984 + BN 1,536 + Conv1x1(768->768) 590,592 (METHODS.md §6, §11)
        (
            "promptkd",
            {"teacher_pretrained": None, "teacher_options": {"template": "a photo of a {}."}},
            1_013_760,
        ),
    ],
)
def test_trainable_parameters_vit_b16(vit_b16: Backbone, name: str, options: dict, expected: int) -> None:
    assert vit_b16.text_width == 512 and vit_b16.embed_dim == 512
    assert count_trainable(build_method(name, vit_b16, TASKS, options)) == expected

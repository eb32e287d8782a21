"""The attention decomposition of prompted blocks and the prompt-as-bias ablations (``methods/attention.py``).

On the perturbed random ``vlp-tiny`` (every weight matters): the two terms add up to the block's
own attention output in both towers, causal mask included; masking the prompt keys equals running
the block without the prompt tokens; the hooked forward of every method declaring
``block_prompts`` equals its ``predict``; the dataset means equal hand-computed ones; an ablation
by the mean of a term that does not vary is no ablation at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from tests.methods.test_matrix import CASES, TASKS, TEMPLATES
from vlprompt.methods import build_method, capabilities, method_config, methods_with
from vlprompt.methods.attention import (
    ABLATIONS,
    PromptSlots,
    TowerStats,
    attention_hook,
    decompose,
    prompt_slots,
)
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import AttentionCall, Backbone, BlockHooks

IMAGE_TOKENS = 17  # vlp-tiny: 32 px, patch 8 -> 16 patches + the class token
BLOCK_PROMPTED = sorted(methods_with("block_prompts"))


def text_block(tiny: Backbone, length: int) -> tuple[nn.Module, Tensor]:
    """Text block 1 and the causal mask of a ``length``-position sequence."""
    return tiny.model.transformer.resblocks[1], tiny.model.attn_mask[:length, :length]


def normalised_input(n: int, length: int, seed: int = 0) -> Tensor:
    return torch.randn(n, length, 64, generator=torch.Generator().manual_seed(seed))


def build(name: str, tiny: Backbone) -> nn.Module:
    torch.manual_seed(0)
    return build_method(name, tiny, TASKS, CASES[name].options, templates=TEMPLATES).eval()


def slots_of(name: str, tiny: Backbone) -> dict[str, PromptSlots]:
    declared = capabilities(name).block_prompts(method_config(name, CASES[name].options))
    return prompt_slots(tiny, declared)


def hooks(slots: dict[str, PromptSlots], ablation: str = "none", stats=None, means=None) -> dict:
    """``scoped_block_hooks`` keyword arguments: one attention hook per tower."""
    return {
        tower: BlockHooks(
            attention=attention_hook(
                s,
                ablation,
                means=None if means is None else means[tower],
                observe=None if stats is None else stats[tower].observe,
            )
        )
        for tower, s in slots.items()
    }


# ------------------------------------------------------------------------------ the decomposition


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_token_and_prompt_terms_add_up_to_the_blocks_attention(tiny: Backbone, tower: str) -> None:
    if tower == "text":
        block, mask = text_block(tiny, 9)
        slots, x = PromptSlots("text", 2, 2), normalised_input(4, 9)
    else:
        block, mask = tiny.model.visual.transformer.resblocks[1], None
        slots, x = PromptSlots("vision", 3, 2, IMAGE_TOKENS), normalised_input(4, IMAGE_TOKENS + 3)
    is_prompt = slots.positions(x.shape[1], x.device)
    with torch.no_grad():
        expected = block.attention(q_x=x, attn_mask=mask)
        parts = decompose(block.attn, x, mask, is_prompt)
        # masking the prompt keys is running the block on the input tokens alone
        alone = block.attention(
            q_x=x[:, ~is_prompt], attn_mask=None if mask is None else mask[~is_prompt][:, ~is_prompt]
        )
    torch.testing.assert_close(parts.output, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.unprompted[:, ~is_prompt], alone, rtol=0, atol=1e-5)
    assert float(parts.prompt.norm(dim=-1).mean()) > 0.05  # the prompts do contribute
    share = parts.share[:, ~is_prompt]
    assert float(share.min()) >= 0.0 and float(share.max()) < 1.0
    if tower == "text":  # SOS sees only itself: no prompt share, no prompt term (causal mask)
        assert float(parts.share[:, 0].abs().max()) == 0.0
        assert float(parts.prompt[:, 0].abs().max()) == 0.0
    else:  # the class token's share is the softmax mass on the appended keys
        assert float(share[:, 0].min()) > 0.01


def test_zero_prompt_values_give_no_prompt_term_and_no_prompts_no_share(tiny: Backbone) -> None:
    block, mask = text_block(tiny, 9)
    attn = copy.deepcopy(block.attn)
    with torch.no_grad():
        attn.in_proj_bias[128:] = 0.0  # v = W_v x: zero at a zero input
        x = normalised_input(3, 9)
        x[:, 1:3] = 0.0  # the prompts' values are zero; their keys (q·k = q·b_k) still draw attention
        parts = decompose(attn, x, mask, PromptSlots("text", 2, 2).positions(9, x.device))
        expected = attn(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert float(parts.prompt.abs().max()) == 0.0
    assert float(parts.share[:, 3:].min()) > 0.01
    torch.testing.assert_close(parts.token, expected, rtol=0, atol=1e-5)
    vision = tiny.model.visual.transformer.resblocks[0]
    images_only = normalised_input(3, IMAGE_TOKENS)
    with torch.no_grad():
        bare = decompose(
            vision.attn,
            images_only,
            None,
            PromptSlots("vision", 2, 2, IMAGE_TOKENS).positions(IMAGE_TOKENS, images_only.device),
        )
        own = vision.attention(q_x=images_only)
    assert float(bare.share.abs().max()) == 0.0 and float(bare.prompt.abs().max()) == 0.0
    torch.testing.assert_close(bare.unprompted, own, rtol=0, atol=1e-5)
    torch.testing.assert_close(bare.token, own, rtol=0, atol=1e-5)


def test_declared_positions_that_do_not_fit_are_named() -> None:
    vision = PromptSlots("vision", 2, 2, IMAGE_TOKENS)
    with pytest.raises(ValueError, match=r"20 tokens, expected 17 image tokens \+ 2 prompts"):
        vision.positions(20, torch.device("cpu"))
    assert vision.positions(19, torch.device("cpu")).nonzero().flatten().tolist() == [17, 18]
    assert PromptSlots("text", 3, 1).positions(6, torch.device("cpu")).nonzero().flatten().tolist() == [
        1,
        2,
        3,
    ]


def test_other_attention_modules_are_refused_by_type(tiny: Backbone) -> None:
    class Custom(nn.Module):
        pass

    with pytest.raises(NotImplementedError, match="got Custom"):
        decompose(Custom(), normalised_input(1, 5), None, torch.zeros(5, dtype=torch.bool))
    split_qkv = nn.MultiheadAttention(64, 2, kdim=32, vdim=32)
    with pytest.raises(NotImplementedError, match="packed in_proj_weight"):
        decompose(split_qkv, normalised_input(1, 5), None, torch.zeros(5, dtype=torch.bool))


# ------------------------------------------------------------------------------ on trained methods


@pytest.mark.parametrize("name", BLOCK_PROMPTED)
def test_the_decomposed_forward_is_the_methods_own_predict(tiny: Backbone, images: Tensor, name: str) -> None:
    """Every method declaring block_prompts: the hooked forward (ablation none) gives its logits,
    the hooks run in every block of every declared tower, and the declared positions fit."""
    method, batch = build(name, tiny), Batch("t", images=images)
    slots = slots_of(name, tiny)
    seen: dict[str, set[int]] = {tower: set() for tower in slots}

    def counting(tower: str):
        def observe(call: AttentionCall, parts) -> None:
            seen[tower].add(call.block)
            assert bool(parts.is_prompt.any())

        return observe

    scoped = {t: BlockHooks(attention=attention_hook(s, observe=counting(t))) for t, s in slots.items()}
    with torch.no_grad():
        plain = method.predict(batch)
        with tiny.scoped_block_hooks(**scoped):
            hooked = method.predict(batch)
        again = method.predict(batch)  # the scope closed: the plain forward again, bit for bit
    scale = float(tiny.logit_scale)
    torch.testing.assert_close(hooked / scale, plain / scale, rtol=0, atol=1e-6)
    assert torch.equal(again, plain)
    blocks = {"text": tiny.text_layers, "vision": tiny.vision_layers}
    assert seen == {tower: set(range(blocks[tower])) for tower in slots}


def test_no_prompts_in_the_attention_is_the_frozen_image_tower(tiny: Backbone, images: Tensor) -> None:
    method = build("ivlp", tiny)
    slots = slots_of("ivlp", tiny)
    with torch.no_grad():
        frozen = tiny.encode_image(images)
        prompted = method.image_features(images)
        out = {}
        for ablation in ("zero", "keys_only"):
            with tiny.scoped_block_hooks(vision=hooks(slots, ablation)["vision"]):
                out[ablation] = method.image_features(images)
    torch.testing.assert_close(out["zero"], frozen, rtol=0, atol=1e-5)
    assert float((prompted - frozen).abs().max()) > 1e-2
    # keys kept: the attention is re-weighted, so the features are neither frozen nor prompted
    assert float((out["keys_only"] - frozen).abs().max()) > 1e-3
    assert float((out["keys_only"] - prompted).abs().max()) > 1e-3


def dataset_stats(tiny: Backbone, method: nn.Module, slots, images: Tensor, task: str = "t") -> dict:
    stats = {tower: TowerStats(s) for tower, s in slots.items()}
    with torch.no_grad(), tiny.scoped_block_hooks(**hooks(slots, stats=stats)):
        method.predict(Batch(task, images=images))
    return stats


@pytest.mark.parametrize("ablation", ["mean_bias", "mean_values"])
def test_a_constant_prompt_contribution_replaced_by_its_mean_changes_nothing(
    tiny: Backbone, images: Tensor, ablation: str
) -> None:
    """Identical images (and one class: the text tower's dataset) make every block's prompt
    contribution constant: its dataset mean is then the contribution itself."""
    torch.manual_seed(0)
    method = build_method("ivlp", tiny, {"one": ["cat"]}, {}, templates={"one": "a photo of a {}."}).eval()
    slots = slots_of("ivlp", tiny)
    same = images[:1].expand(4, -1, -1, -1)
    stats = dataset_stats(tiny, method, slots, same, "one")
    means = {tower: s.means() for tower, s in stats.items()}
    with torch.no_grad():
        plain = method.image_features(same), method.text_features("one")
        with tiny.scoped_block_hooks(**hooks(slots, ablation, means=means)):
            ablated = method.image_features(same), method.text_features("one")
        with tiny.scoped_block_hooks(**hooks(slots, ablation, means=means)):
            other = method.image_features(images)  # images that differ from the mean's
        plain_other = method.image_features(images)
    torch.testing.assert_close(ablated[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ablated[1], plain[1], rtol=0, atol=1e-5)
    assert float((other - plain_other).abs().max()) > 1e-3
    rows = stats["vision"].rows()
    assert [r["dependence_readout"] for r in rows] == pytest.approx([0.0, 0.0], abs=1e-4)


def test_dataset_means_and_statistics_equal_hand_computed_ones(tiny: Backbone) -> None:
    """Text sequences of different lengths, encoded two per chunk (each chunk cut at its own
    longest EOT): the streaming means and statistics equal those of the sequences one at a time,
    each position averaged over the sequences that reach it."""
    slots = PromptSlots("text", 2, 2)
    ids = tiny.tokenize(["a cat.", "a photo of a dog on a mat.", "x y z", "the big red car is here."])
    x, eot = tiny.token_embedding(ids), tiny.eot_positions(ids)
    stats = TowerStats(slots)
    per_row: list[dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]] = []
    with torch.no_grad():
        with tiny.scoped_block_hooks(text=BlockHooks(attention=attention_hook(slots, observe=stats.observe))):
            tiny.encode_text_embeddings(x, eot, chunk_size=2)
        for row in range(4):
            seen = {}

            def keep(call: AttentionCall, parts, seen=seen) -> None:
                seen[call.block] = (parts.contribution[0], parts.prompt[0], parts.share[0], parts.token[0])

            with tiny.scoped_block_hooks(text=BlockHooks(attention=attention_hook(slots, observe=keep))):
                tiny.encode_text_embeddings(x[row : row + 1], eot[row : row + 1])
            per_row.append(seen)
    means, rows, ends = stats.means(), stats.rows(), eot.tolist()
    for block in range(tiny.text_layers):
        for position in range(max(ends) + 1):
            reach = [r for r in range(4) if ends[r] >= position]
            hand = torch.stack([per_row[r][block][0][position] for r in reach]).mean(dim=0)
            torch.testing.assert_close(means[block].contribution[position], hand, rtol=0, atol=1e-5)
        at_eot = torch.stack([per_row[r][block][1][ends[r]] for r in range(4)])
        mean = at_eot.mean(dim=0)
        spread = (at_eot - mean).square().sum(dim=-1).mean().sqrt() / mean.norm()
        assert rows[block]["dependence_readout"] == pytest.approx(float(spread), rel=1e-4)
        shares = [float(per_row[r][block][2][ends[r]]) for r in range(4)]
        assert rows[block]["share_readout"] == pytest.approx(sum(shares) / 4, rel=1e-5)
        token_norms = [
            float(per_row[r][block][3][: ends[r] + 1][[0, *range(3, ends[r] + 1)]].norm(dim=-1).sum())
            for r in range(4)
        ]
        live_inputs = sum(ends[r] + 1 - 2 for r in range(4))
        assert rows[block]["token_norm_all"] == pytest.approx(sum(token_norms) / live_inputs, rel=1e-5)
        assert rows[block]["sequences"] == 4 and rows[block]["fresh"] == (block < 2)


def test_ablations_that_need_means_say_so_and_unknown_ones_are_listed() -> None:
    slots = PromptSlots("text", 2, 2)
    with pytest.raises(ValueError, match="needs the dataset means"):
        attention_hook(slots, "mean_bias")
    with pytest.raises(ValueError, match=r"unknown ablation 'mean'.*mean_bias"):
        attention_hook(slots, "mean")
    assert set(ABLATIONS) == {"none", "mean_bias", "zero", "keys_only", "mean_values"}


def test_scoped_hooks_refuse_a_slot_filled_twice_and_nesting(tiny: Backbone, images: Tensor) -> None:
    mine = BlockHooks(attention=lambda call: call.attention(call.x, call.x, call.x, need_weights=False)[0])
    with tiny.scoped_block_hooks(vision=mine):
        with pytest.raises(ValueError, match="both set attention"):
            tiny.encode_image(images, block_hooks=mine)
        with pytest.raises(RuntimeError, match="already open"), tiny.scoped_block_hooks(text=mine):
            pass
    with torch.no_grad():  # closed again: nothing left behind
        assert torch.equal(tiny.encode_image(images), tiny.model.encode_image(images))

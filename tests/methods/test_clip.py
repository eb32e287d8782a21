"""The frozen backbone wrapper: exact text encoding, tokenisation, loading, interpretation."""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
from torch import Tensor, nn

from vlprompt.methods.clip import Backbone, load_backbone, tag_needs_quick_gelu

PROMPTS = [
    "a photo of a dog.",
    "a photo of a golden retriever, a type of pet.",
    "x",
    "a centered satellite photo of annual crop land with a very long tail of extra words.",
]


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def test_preprocessing_facts_come_from_open_clip(tiny: Backbone) -> None:
    cfg = open_clip.get_model_preprocess_cfg(tiny.model)
    assert tiny.image_size == 32 == cfg["size"][0]
    assert tiny.image_mean == tuple(cfg["mean"]) and tiny.image_std == tuple(cfg["std"])
    assert (tiny.embed_dim, tiny.text_width, tiny.context_length, tiny.text_layers) == (64, 64, 77, 2)
    assert float(tiny.logit_scale) == pytest.approx(100.0, rel=1e-5)


def test_truncated_encoding_equals_full_length(tiny: Backbone) -> None:
    ids = tiny.tokenize(PROMPTS)
    eot = tiny.eot_positions(ids)
    assert len(set(eot.tolist())) == len(PROMPTS)  # genuinely different lengths
    x = tiny.token_embedding(ids)
    with torch.no_grad():
        full = tiny.encode_text_embeddings(x, eot, truncate=False)
        cut = tiny.encode_text_embeddings(x, eot, truncate=True)
    assert full.shape == (len(PROMPTS), 64)
    assert max_diff(full, cut) < 1e-5
    # the padding really is ignored: garbage after the EOT changes nothing
    noisy = x.clone()
    for row, pos in enumerate(eot.tolist()):
        noisy[row, pos + 1 :] += torch.randn_like(noisy[row, pos + 1 :])
    with torch.no_grad():
        assert max_diff(tiny.encode_text_embeddings(noisy, eot, truncate=False), full) < 1e-5


def test_encode_text_equals_open_clip(tiny: Backbone) -> None:
    ids = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        ours = tiny.encode_text(ids)
        theirs = tiny.model.encode_text(ids)
    assert max_diff(ours, theirs) < 1e-5
    assert float(theirs.abs().mean()) > 1e-2  # not a degenerate all-zero comparison


def test_chunked_encoding_equals_one_pass(tiny: Backbone) -> None:
    ids = tiny.tokenize(PROMPTS * 2)
    x, eot = tiny.token_embedding(ids), tiny.eot_positions(ids)
    with torch.no_grad():
        whole = tiny.encode_text_embeddings(x, eot, chunk_size=100)
        chunked = tiny.encode_text_embeddings(x, eot, chunk_size=3)
    assert max_diff(whole, chunked) < 1e-5


def test_layer_hook_sees_each_block_batch_first(tiny: Backbone) -> None:
    ids = tiny.tokenize(PROMPTS[:2])
    x, eot = tiny.token_embedding(ids), tiny.eot_positions(ids)
    delta = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, tuple[int, ...]]] = []

    def hook(i: int, h: Tensor) -> Tensor:
        seen.append((i, tuple(h.shape)))
        return h + delta[:, : h.shape[1]] if i == 0 else h

    with torch.no_grad():
        hooked = tiny.encode_text_embeddings(x, eot, layer_hook=hook)
        shifted = tiny.encode_text_embeddings(x + delta, eot)
    length = int(eot.max()) + 1
    assert seen == [(0, (2, length, 64)), (1, (2, length, 64))]
    assert max_diff(hooked, shifted) < 1e-5  # a hook at block 0 = shifting the input embeddings


def test_sequence_first_transformer_layout(tiny: Backbone) -> None:
    model = copy.deepcopy(tiny.model)
    model.transformer.batch_first = False
    for block in model.transformer.resblocks:
        block.attn.batch_first = False
    seq_first = Backbone(model, tiny.tokenizer, name="vlp-tiny-seq-first")
    ids = tiny.tokenize(PROMPTS)
    shapes: list[tuple[int, ...]] = []

    def hook(i: int, h: Tensor) -> Tensor:
        shapes.append(tuple(h.shape))
        return h

    with torch.no_grad():
        reference = tiny.encode_text(ids)
        assert max_diff(model.encode_text(ids), reference) < 1e-5  # open_clip agrees the copy is equivalent
        ours = seq_first.encode_text_embeddings(
            seq_first.token_embedding(ids), ids.argmax(-1), layer_hook=hook
        )
    assert max_diff(ours, reference) < 1e-5
    assert all(s[0] == len(PROMPTS) for s in shapes)  # hooks always get (N, L, W)


def test_tokenize_matches_open_clip_and_refuses_to_truncate(tiny: Backbone) -> None:
    assert torch.equal(tiny.tokenize(PROMPTS), tiny.tokenizer(PROMPTS))
    too_long = "very " * 80 + "long class"
    with pytest.raises(ValueError, match=r"very very .* is 84 tokens .* fits 77"):
        tiny.tokenize(["a photo of a dog.", too_long])
    exactly = " ".join(["x"] * 75)  # 75 + start + end = 77 fits
    assert int(tiny.tokenize([exactly])[0].argmax()) == 76
    with pytest.raises(TypeError):
        tiny.tokenize("a photo of a dog.")  # type: ignore[arg-type]


def test_backbone_is_frozen_and_stays_in_eval(tiny: Backbone) -> None:
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.model.training
    assert all(not m.training for m in tiny.modules())


def test_nearest_words_decode_exact_rows(tiny: Backbone) -> None:
    ids = tiny.tokenize(["a photo of golden retrievers"])
    n = int(tiny.eot_positions(ids)[0]) - 1
    vectors = tiny.token_embedding(ids)[0, 1 : 1 + n]
    nearest = tiny.nearest_words(vectors, k=3)
    assert [row[0][0] for row in nearest] == ["a", "photo", "of", "golden", "retri", "evers"]
    assert all(row[0][1] < 1e-6 for row in nearest)
    assert all(row[0][1] < row[1][1] <= row[2][1] for row in nearest)  # sorted, nearest first
    with pytest.raises(ValueError, match=r"\(n, 64\)"):
        tiny.nearest_words(vectors[0])


def test_load_local_checkpoint(tiny: Backbone, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_backbone("vlp-tiny", str(path))
    expected = tiny.model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_backbone("vlp-tiny", str(missing))


def test_load_errors_are_helpful() -> None:
    with pytest.raises(
        ValueError, match=r"unknown open_clip model 'vlp-tinny'.*'vlp-tiny'.*add_model_config"
    ):
        load_backbone("vlp-tinny")
    with pytest.raises(ValueError, match=r"Tags for vlp-tiny: \(none\)"):
        load_backbone("vlp-tiny", "openai")
    with pytest.raises(ValueError, match=r"'opnai' is neither .* Tags for ViT-B-16: .*openai"):
        load_backbone("ViT-B-16", "opnai")  # raises before building or downloading anything


def test_unsupported_models_are_rejected(tiny: Backbone) -> None:
    with pytest.raises(NotImplementedError, match="only open_clip CLIP"):
        Backbone(nn.Linear(2, 2), tiny.tokenizer)
    with pytest.raises(NotImplementedError, match="SimpleTokenizer"):
        Backbone(tiny.model, object())


def test_openai_tags_get_quick_gelu() -> None:
    """open_clip would only warn when OpenAI's QuickGELU weights meet ViT-B-16's nn.GELU."""
    assert tag_needs_quick_gelu("ViT-B-16", "openai")
    assert tag_needs_quick_gelu("ViT-B-32", "openai")
    assert not tag_needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not tag_needs_quick_gelu("vlp-tiny", None)
    assert not tag_needs_quick_gelu("vlp-tiny", "/some/file.pt")

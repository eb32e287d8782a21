"""PromptAlign: the alignment loss by hand, the block inputs it observes, β = 0 as TPT on MaPLe, the
per-image reset, and the source-statistics file (accumulation, round trip, every refusal)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.methods import METHODS, build_method, capabilities, options
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.maple import MaPLe
from vlprompt.methods.maple_stacked import StackedMaPLe
from vlprompt.methods.promptalign import PromptAlign, PromptAlignConfig, alignment_loss, token_statistics
from vlprompt.methods.source_stats import Accumulator, accumulate, load_stats, save_stats
from vlprompt.methods.stats_file import MAKE_COMMAND

from .conftest import tiny_backbone

CLASSES = ["cat", "dog", "car", "tree", "x"]
V = 7  # views per image in these tests: 1 + 7 = 8 images, selection_p 0.25 keeps 2
SOURCE = {"dataset": "imagenet", "split": "train", "images_per_class": 0}  # the options' defaults


def promptalign(backbone: Backbone, seed: int = 0, **opts: object) -> PromptAlign:
    torch.manual_seed(seed)
    opts = {"n_views": V, "selection_p": 0.25, **opts}
    method = build_method("promptalign", backbone, {"pets": CLASSES}, opts)
    assert isinstance(method, PromptAlign)
    return method


@pytest.fixture(scope="module")
def views() -> Tensor:
    return torch.randn(6, V, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def source_images() -> tuple[Tensor, Tensor]:
    """Twelve 'source' images, labels 0 0 0 1 1 1 2 2 2 4 4 4 (class 3 has none)."""
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2
    return images, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 4, 4, 4])


def make_stats(
    method: PromptAlign, source_images: tuple[Tensor, Tensor], path: Path, **source: object
) -> Path:
    """The statistics file of ``method``'s current state over the source images, in two batches."""
    images, labels = source_images
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    acc = accumulate(method, batches, len(CLASSES), method.align_layers)
    tensors, kept = acc.tensors()
    names = [CLASSES[i] for i in kept.tolist()]
    return save_stats(path, tensors, names, method.stats_fingerprint(), {**SOURCE, **source})


# ---------------------------------------------------------------- the objective by hand
def test_alignment_loss_is_the_references_distr_align_loss_by_hand() -> None:
    block0 = torch.tensor(
        [[[1.0, 3.0]], [[3.0, 7.0]]]
    )  # 2 views, 1 token, 2 channels: mean (2, 5), var (1, 4)
    block1 = torch.tensor([[[0.0, 0.0]], [[2.0, -2.0]]])  # mean (1, -1), var (1, 1)
    source_mean = torch.tensor([[[0.0, 5.0]], [[1.0, 1.0]]])
    source_var = torch.tensor([[[1.0, 0.0]], [[0.5, 1.0]]])
    # block 0: 0.5 * mean(|2-0|, |5-5|) + 0.5 * mean(|1-1|, |4-0|) = 0.5 * 1 + 0.5 * 2 = 1.5
    # block 1: 0.5 * mean(|1-1|, |-1-1|) + 0.5 * mean(|1-0.5|, |1-1|) = 0.5 * 1 + 0.5 * 0.25 = 0.625
    loss = alignment_loss([block0, block1], source_mean, source_var)
    assert float(loss) == pytest.approx(2.125, abs=1e-7)
    mean, var = token_statistics(block0)
    assert mean.tolist() == [[2.0, 5.0]] and var.tolist() == [[1.0, 4.0]]  # population variance
    x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(token_statistics(x)[1], x.var(dim=0, unbiased=False))


def test_it_observes_each_block_input_as_the_block_receives_it(tiny: Backbone, images: Tensor) -> None:
    method = promptalign(tiny)
    prompt = method.maple
    visual = tiny.model.visual
    with torch.no_grad():
        features, tokens = method.observe(images[:3], [0, 1])
        # by hand: [CLS; patches] + positions, the layer-0 visual prompt appended, ln_pre
        x = visual.conv1(images[:3]).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(3, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_pre(torch.cat([x, prompt.proj(prompt.ctx).expand(3, -1, -1)], 1))
        torch.testing.assert_close(tokens[0], x)
        # block 1: block 0's output with its prompt positions replaced by F_1(P_1)
        out = visual.transformer.resblocks[0](x)
        deep = prompt.compound_prompt_projections[0](prompt.compound_prompts_text[0])
        expected = torch.cat([out[:, : -method.ctx.shape[0]], deep.expand(3, -1, -1)], 1)
        torch.testing.assert_close(tokens[1], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features, prompt.image_features(images[:3]))  # observing changes nothing
    assert tokens[0].shape == (3, tiny.token_positions("vision") + 2, tiny.vision_width)


# ---------------------------------------------------------------- β = 0 is TPT on MaPLe
def _entropy_of_mean(logits: Tensor) -> Tensor:
    p = logits.softmax(dim=-1).mean(dim=0)
    return -(p * p.log()).sum()


def test_without_alignment_it_is_one_hand_written_tpt_step_on_maple(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    lr = 0.04
    method = promptalign(tiny, align_weight=0.0, lr=lr)
    torch.manual_seed(0)
    reference = build_method("maple", tiny, {"pets": CLASSES}, {"prompt_depth": 3})
    assert isinstance(reference, MaPLe)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in state.items())  # the same start
    for b in range(2):
        reference.load_state_dict(state)
        batch = torch.cat([images[b : b + 1], views[b]])
        with torch.no_grad():  # the reference's selection: lowest entropy of the original + views
            logits = reference.logits(Batch("pets", images=batch))
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            kept = entropy.argsort()[:2]
        optimizer = torch.optim.AdamW(reference.parameters(), lr=lr)
        loss = _entropy_of_mean(reference.logits(Batch("pets", images=batch))[kept])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected = reference.predict(Batch("pets", images=images[b : b + 1]))
        got = method.predict(Batch("pets", images=images[b : b + 1], views=views[b : b + 1]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # logits are 100 x cosine
    reference.load_state_dict(state)
    assert float((expected - reference.predict(Batch("pets", images=images[1:2]))).abs().max()) > 1e-2


def test_without_steps_it_is_maple(tiny: Backbone, images: Tensor, views: Tensor) -> None:
    method = promptalign(tiny, steps=0)  # no statistics needed when nothing is tuned
    batch = Batch("pets", images=images[:3], views=views[:3])
    torch.testing.assert_close(method.predict(batch), method.maple.predict(batch), rtol=0, atol=1e-5)


def test_predict_resets_and_leaks_nothing_between_images(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = promptalign(tiny, align_weight=0.0, steps=2)
    start = {k: v.clone() for k, v in method.state_dict().items()}
    first = Batch("pets", images=images[:1], views=views[:1])
    second = Batch("pets", images=images[1:2], views=views[1:2])
    alone = promptalign(tiny, align_weight=0.0, steps=2).predict(second)
    method.predict(first)
    assert all(torch.equal(v, start[k]) for k, v in method.state_dict().items())
    assert all(p.grad is None for p in method.parameters())
    assert torch.equal(method.predict(second), alone)  # the 2nd image's result is independent of the 1st
    both = method.predict(Batch("pets", images=images[:2], views=views[:2]))
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- many images at once
def assert_same_as_one_at_a_time(alone: torch.nn.Module, together: torch.nn.Module, batch: Batch) -> None:
    """``together`` (``images_per_step`` > 1, the same start state) predicts what ``alone`` does one
    image at a time, leaves its own state untouched, and has tuned (its logits are not MaPLe's)."""
    together.load_state_dict(alone.state_dict())
    start = {k: v.clone() for k, v in together.state_dict().items()}
    expected, got = alone.predict(batch), together.predict(batch)
    assert all(torch.equal(v, start[k]) for k, v in together.state_dict().items())
    assert all(p.grad is None for p in together.parameters())
    assert float((got - together.maple.predict(Batch(batch.task, images=batch.images))).abs().max()) > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # logits are 100 x cosine
    # the objective itself, step by step (Adam's first step is lr * sign(g): blind to its scale):
    # the stacked loss is the sum of the images' own
    group = torch.cat([batch.images[:, None], batch.views], dim=1)
    copies = StackedMaPLe(together.maple, dict(together.named_parameters()), len(group))
    stacked = together.tune(copies, copies.leaves(), batch.task, group)
    per_image = []
    for g in range(len(group)):
        alone.load_state_dict(start)
        per_image.append(alone.adapt(batch.task, group[g]))
    alone.load_state_dict(start)
    torch.testing.assert_close(torch.tensor(stacked), torch.tensor(per_image).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("align", [0.0, 100 / 3], ids=["tpt-on-maple", "aligned"])
def test_images_adapted_together_equal_one_at_a_time(
    tiny: Backbone,
    images: Tensor,
    views: Tensor,
    source_images: tuple[Tensor, Tensor],
    tmp_path: Path,
    align: float,
) -> None:
    file = str(make_stats(promptalign(tiny), source_images, tmp_path / "stats.safetensors")) if align else ""
    opts = {"align_weight": align, "steps": 2, "lr": 0.01, "source_stats": file}
    together = promptalign(tiny, images_per_step=4, **opts)  # six images: groups of 4 and 2
    assert_same_as_one_at_a_time(
        promptalign(tiny, **opts), together, Batch("pets", images=images, views=views)
    )


def test_an_image_adapted_with_others_does_not_depend_on_them(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = promptalign(tiny, align_weight=0.0, images_per_step=3, steps=2)
    full = method.predict(Batch("pets", images=images[:3], views=views[:3]))
    other = views[:3].clone()
    other[0] = torch.randn_like(other[0])  # image 0's views only
    swapped = method.predict(Batch("pets", images=images[:3], views=other))
    torch.testing.assert_close(swapped[1:], full[1:], rtol=1e-6, atol=1e-5)
    assert not torch.allclose(swapped[0], full[0], atol=1e-3)


# ---------------------------------------------------------------- with the statistics
def test_one_step_aligns_the_kept_views_statistics(
    tiny: Backbone, images: Tensor, views: Tensor, source_images: tuple[Tensor, Tensor], tmp_path: Path
) -> None:
    file = make_stats(promptalign(tiny), source_images, tmp_path / "stats.safetensors")
    method = promptalign(tiny, source_stats=str(file), lr=0.01)
    assert method.run_inputs()["source_stats.file"] == str(file)
    batch = torch.cat([images[:1], views[0]])
    with torch.no_grad():
        logits = method.logits("pets", batch)
    kept = batch[torch.argsort(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), stable=True)[:2]]

    def terms(positions: slice = slice(None)) -> tuple[float, float]:
        with torch.no_grad():
            features, tokens = method.observe(kept, [0, 1])
            text = F.normalize(method.text_features("pets"), dim=-1)
            entropy = _entropy_of_mean(100 * F.normalize(features, dim=-1) @ text.T)
            mean, var = method.source_mean[:, positions], method.source_var[:, positions]
            align = alignment_loss([tokens[0][:, positions], tokens[1][:, positions]], mean, var)
            return float(entropy), float(align)

    entropy, align = terms()
    image_tokens = slice(0, tiny.token_positions("vision"))  # the class token and the patches
    before = terms(image_tokens)[1]
    (loss,) = method.adapt("pets", batch)
    assert loss == pytest.approx(entropy + 100 / 3 * align, rel=1e-4)
    # The image tokens' statistics move towards the source's (observed 1.347 -> 1.345). The prompt
    # positions' cannot: the file was made with these very prompts, so there the test statistics
    # start *equal* to the source's (L1 at its kink, gradient 0) and any step moves them away.
    assert terms(image_tokens)[1] < before
    # β > 0 moves the prediction away from β = 0's
    fresh = promptalign(tiny, source_stats=str(file))
    plain = promptalign(tiny, align_weight=0.0)
    one = Batch("pets", images=images[:1], views=views[:1])
    assert float((fresh.predict(one) - plain.predict(one)).abs().max()) > 1e-3


def test_statistics_stream_per_class_and_globally(
    tiny: Backbone, source_images: tuple[Tensor, Tensor]
) -> None:
    method = promptalign(tiny)
    images, labels = source_images
    with torch.no_grad():
        features, tokens = method.observe(images, [0, 1])
    acc = accumulate(method, [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)], 5, (0, 1))
    out, kept = acc.tensors(torch.float64)
    assert kept.tolist() == [0, 1, 2, 4]  # class 3 had no image: no row
    assert out["class_count"].tolist() == [3, 3, 3, 3]
    x = torch.stack([tokens[0], tokens[1]], 1).double()  # (N, L, T, W)
    torch.testing.assert_close(out["mean"], x.mean(0))
    torch.testing.assert_close(out["var"], x.var(0, unbiased=False))
    for row, c in enumerate([0, 1, 2, 4]):
        mine = labels == c
        torch.testing.assert_close(out["class_mean"][row], x[mine].mean(0))
        torch.testing.assert_close(out["class_var"][row], x[mine].var(0, unbiased=False))
        embedding = F.normalize(features[mine].double(), dim=-1).mean(0)
        torch.testing.assert_close(out["class_embedding"][row], embedding)
    with pytest.raises(ValueError, match=r"labels must lie in 0 \.\. 4"):
        Accumulator(5, (0, 1)).add(tokens, features, torch.full((12,), 5))


def test_statistics_file_round_trips(
    tiny: Backbone, source_images: tuple[Tensor, Tensor], tmp_path: Path
) -> None:
    method = promptalign(tiny)
    file = make_stats(method, source_images, tmp_path / "stats.safetensors")
    assert not list(tmp_path.glob(".*partial"))
    parts = method.stats_fingerprint()
    stats = load_stats(file, parts, source=SOURCE, classes=["x", "cat"])
    assert stats.classes == ("cat", "dog", "car", "x") and stats.blocks == (0, 1)
    assert stats.metadata["images"] == "12" and stats.metadata["source_dataset"] == "imagenet"
    images, labels = source_images
    acc = accumulate(method, [(images, labels)], 5, (0, 1))
    direct, _ = acc.tensors()
    torch.testing.assert_close(stats.mean, direct["mean"])
    torch.testing.assert_close(stats.var, direct["var"])
    rows = stats.class_rows
    torch.testing.assert_close(rows["class_mean"], direct["class_mean"][[3, 0]])
    torch.testing.assert_close(rows["class_embedding"], direct["class_embedding"][[3, 0]])
    assert rows["class_count"].tolist() == [3, 3]
    assert load_stats(file, parts).class_rows == {}  # global statistics only, unless asked


# ------------------------------------------------------- every refusal names the file and the command
def test_a_missing_or_corrupt_file_is_refused(tiny: Backbone, source_images, tmp_path: Path) -> None:
    command = re.escape(MAKE_COMMAND)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(missing))} do not exist.*{command}"):
        promptalign(tiny, source_stats=str(missing))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 32)
    with pytest.raises(ValueError, match=rf"{re.escape(str(garbage))} are corrupt.*{command}"):
        promptalign(tiny, source_stats=str(garbage))
    good = make_stats(promptalign(tiny), source_images, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{re.escape(str(truncated))} are truncated.*{command}"):
        promptalign(tiny, source_stats=str(truncated))
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(other))} is not a source statistics file.*{command}"
    ):
        promptalign(tiny, source_stats=str(other))


def test_statistics_of_another_model_or_source_are_refused(
    tiny: Backbone, images: Tensor, views: Tensor, source_images, tmp_path: Path
) -> None:
    file = make_stats(promptalign(tiny), source_images, tmp_path / "stats.safetensors")
    command = re.escape(MAKE_COMMAND)
    other_backbone = tiny_backbone(seed=5)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(file))} were made by another model.*backbone is.*{command}"
    ):
        promptalign(other_backbone, source_stats=str(file))
    with pytest.raises(ValueError, match=r"another model.*blocks is '0,1', this model's '1'"):
        promptalign(tiny, source_stats=str(file), align_layers=[1])
    with pytest.raises(ValueError, match=r"source_images_per_class is '0', the config's '100'"):
        promptalign(tiny, source_stats=str(file), source_images_per_class=100)
    with pytest.raises(ValueError, match=r"source_dataset is 'imagenet', the config's 'dtd'"):
        promptalign(tiny, source_stats=str(file), source_dataset="dtd")
    # other starting prompts (another MaPLe): refused when tuning starts from them
    method = promptalign(tiny, seed=3, source_stats=str(file))
    with pytest.raises(ValueError, match=rf"another model.*init_state is 'sha256:.*{command}"):
        method.predict(Batch("pets", images=images[:1], views=views[:1]))
    method.load_state_dict(promptalign(tiny).learned_state())  # the state the file was made with
    method.predict(Batch("pets", images=images[:1], views=views[:1]))


def test_a_file_without_the_classes_needed_names_them(tiny: Backbone, source_images, tmp_path: Path) -> None:
    method = promptalign(tiny)
    file = make_stats(method, source_images, tmp_path / "stats.safetensors")
    with pytest.raises(
        ValueError, match=r"no images of 2 of the 3 classes needed: 'tree', 'bus' .*4 classes of 'imagenet'"
    ):
        load_stats(file, method.stats_fingerprint(), classes=["cat", "tree", "bus"])


def test_alignment_without_statistics_says_how_to_make_them(
    tiny: Backbone, images: Tensor, views: Tensor
) -> None:
    method = promptalign(tiny)  # β = 100/3, no file: built (the stats command builds it so), not tuned
    with pytest.raises(ValueError, match=r"align_weight=33.3333 aligns to source statistics.*source_stats"):
        method.predict(Batch("pets", images=images[:1], views=views[:1]))


# ---------------------------------------------------------------- starting state, options, registry
def test_init_state_is_a_maple_runs_learned_state(tiny: Backbone, images: Tensor, tmp_path: Path) -> None:
    torch.manual_seed(4)
    trained = build_method("maple", tiny, {"pets": CLASSES}, {"prompt_depth": 3})
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "learned_state.pt"
    torch.save(trained.learned_state(), path)
    method = promptalign(tiny, init_state=str(path))
    assert set(method.learned_state()) == set(trained.learned_state())
    batch = Batch("pets", images=images)
    torch.testing.assert_close(method.predict(batch), trained.predict(batch), rtol=0, atol=0)
    deeper = tmp_path / "depth9.pt"
    torch.manual_seed(0)
    torch.save(build_method("maple", tiny, {"pets": CLASSES}, {"prompt_depth": 1}).learned_state(), deeper)
    with pytest.raises(ValueError, match=rf"{re.escape(str(deeper))} holds.*same n_ctx and prompt_depth"):
        promptalign(tiny, init_state=str(deeper))
    wider = tmp_path / "n_ctx4.pt"
    torch.save(
        build_method("maple", tiny, {"pets": CLASSES}, {"n_ctx": 4, "prompt_depth": 3}).learned_state(), wider
    )
    with pytest.raises(ValueError, match=r"shapes in .*n_ctx4\.pt differ.*ctx \(4, 64\) vs \(2, 64\)"):
        promptalign(tiny, init_state=str(wider))
    with pytest.raises(FileNotFoundError, match=r"promptalign init_state: .*missing\.pt"):
        promptalign(tiny, init_state=str(tmp_path / "missing.pt"))


def test_blocks_beyond_the_tower_are_refused(tiny: Backbone) -> None:
    with pytest.raises(ValueError, match=r"align_layers \[0, 5\].*image blocks 0 \.\. 1"):
        promptalign(tiny, align_layers=[5, 0])


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        ({"align_layers": []}, "align_layers"),
        ({"align_layers": [0, 0]}, "align_layers"),
        ({"align_layers": [-1]}, "align_layers"),
        ({"align_weight": -1.0}, "align_weight"),
        ({"n_views": 3, "selection_p": 0.1}, "selection_p"),
        ({"source_split": "dev"}, "source_split"),
        ({"source_images_per_class": -1}, "source_images_per_class"),
        ({"lr": float("inf")}, "lr"),
    ],
)
def test_config_checks(opts: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"promptalign {field}"):
        PromptAlignConfig(**opts)


def test_registered_with_the_references_dg_defaults() -> None:
    spec = METHODS["promptalign"]
    assert spec.options is PromptAlignConfig and spec.summary.startswith("PromptAlign")
    cfg = PromptAlignConfig(align_layers=[1, 0])
    assert cfg.align_layers == [0, 1]
    cfg = PromptAlignConfig()
    assert (cfg.n_ctx, cfg.prompt_depth, cfg.ctx_init) == (2, 3, "a photo of a")
    assert (cfg.n_views, cfg.selection_p, cfg.lr, cfg.steps) == (63, 0.1, 4e-2, 1)
    assert cfg.align_weight == pytest.approx(100 / 3) and cfg.align_layers == [0, 1]
    assert (cfg.source_dataset, cfg.source_split, cfg.source_images_per_class) == ("imagenet", "train", 0)
    caps = capabilities("promptalign")
    assert not caps.learns and not caps.frozen_image_tower and caps.token_space_keys == ("ctx",)
    assert caps.test_time_views(cfg) == options.TestTimeViews(63, augmix=False)
    wanted = caps.source_stats(PromptAlignConfig(source_stats="s.safetensors", align_layers=[2, 0]))
    assert (wanted.option, wanted.file, wanted.blocks, wanted.required) == (
        "source_stats",
        "s.safetensors",
        (0, 2),
        True,
    )
    assert not caps.source_stats(PromptAlignConfig(align_weight=0)).required

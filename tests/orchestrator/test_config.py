"""Configs: defaults → preset → overrides, validated with errors that name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlprompt.orchestrator.config import (
    PRESET_DIR,
    ConfigError,
    load_config,
    project_method,
    resolve_paths,
    tracking_uri,
)

PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
TEST_PRESETS = sorted((Path(__file__).parents[1] / "assets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS + TEST_PRESETS, ids=lambda p: p.stem)
def test_every_preset_validates_without_building_anything(preset):
    cfg = load_config(str(preset))
    assert cfg.name
    assert OmegaConf.is_readonly(cfg)


def test_overrides_apply_in_order():
    overrides = ["method.ctx_init=''", "method.n_ctx=8", "data.shots=2", "train.epochs=3"]
    cfg = load_config("quickstart", overrides)
    assert (cfg.method.n_ctx, cfg.data.shots, cfg.train.epochs) == (8, 2, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.shotz=4"], "data.shotz"),
        (["trian.epochs=4"], "trian"),
        (["method.n_ctxx=4"], "n_ctxx"),
        (["method.name=coopp"], "coop"),  # did-you-mean
        (["data.protocol=transductive"], "data.protocol"),
        (["train.epochs=0"], "train.epochs"),
        (["train.epochs=ten"], "train.epochs"),
        (["sweep.space={data.shotz: {choice: [1]}}"], "data.shotz"),
        (["sweep.space={data.shots: [1, 2]}"], "choice"),
        (["data.shots"], "section.key=value"),
        (["data.dataset=eurosatt"], "eurosat"),
        (["model.name=ViT-B-61"], "ViT-B-16"),
        (["model.text_chunk_size=0"], "model.text_chunk_size must be >= 1, got 0"),
        (["model.text_checkpoint=sometimes"], "model.text_checkpoint='sometimes' is not one of auto, always"),
        (["sweep.metric=hm"], "sweep.metric"),  # few-shot runs report no harmonic mean
        (["data.protocol=cross_dataset"], "data.eval_targets"),
        (["data.eval_targets=[eurosat]"], "cross_dataset"),
        (["data.protocol=cross_dataset", "data.eval_targets=[eurosatt]"], "data.eval_targets[0]"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("quickstart", overrides)


def test_switching_method_drops_the_previous_methods_options():
    cfg = load_config("quickstart", ["method.name=zeroshot"])
    assert "n_ctx" not in cfg.method
    assert project_method({"name": "coop", "n_ctx": 4, "ctx_init": "a"}, "zeroshot") == {"name": "zeroshot"}
    assert project_method({"name": "coop", "n_ctx": 4}, "coop") == {"name": "coop", "n_ctx": 4}


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("quikstart")


def test_paths_become_absolute_before_ray(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = resolve_paths(load_config("quickstart", ["model.pretrained=ckpt/model.pt"]), tmp_path)
    assert cfg.data.root == str(tmp_path / "data")
    assert cfg.sweep.storage_path == str(tmp_path / "ray_results")
    assert cfg.model.pretrained == str(tmp_path / "ckpt" / "model.pt")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.sweep.name == "quickstart"
    # an open_clip tag is not a path
    assert resolve_paths(load_config("coop_fewshot"), tmp_path).model.pretrained == "openai"
    # a TPT+CoOp run's starting context is a file too
    tpt = resolve_paths(load_config("test_time", ["method.init_state=runs/learned_state.pt"]), tmp_path)
    assert tpt.method.init_state == str(tmp_path / "runs" / "learned_state.pt")
    # and PromptKD's teacher: its state and a checkpoint path, while a tag stays a tag
    kd = resolve_paths(
        load_config("promptkd", ["method.teacher_state=t/state.pt", "method.teacher_pretrained=w/l14.pt"]),
        tmp_path,
    )
    assert kd.method.teacher_state == str(tmp_path / "t" / "state.pt")
    assert kd.method.teacher_pretrained == str(tmp_path / "w" / "l14.pt")
    assert resolve_paths(load_config("promptkd"), tmp_path).method.teacher_pretrained == "openai"


def test_protocols_check_what_their_dataset_and_targets_must_be():
    with pytest.raises(ConfigError, match="multi_task"):  # a group outside the multi-task protocol
        load_config("quickstart", ["data.dataset=general10", "sweep.space={}"])
    with pytest.raises(ConfigError, match=r"needs data\.eval_targets"):
        load_config("test_time", ["data.eval_targets=[]"])  # preset's metric is target_acc_mean
    ok = load_config("test_time", ["data.eval_targets=[]", "sweep.metric=test_acc"])
    assert ok.data.protocol == "test_time" and list(ok.data.eval_targets) == []
    assert load_config("multi_task", ["data.dataset=fashion20"]).data.dataset == "fashion20"


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert tracking_uri("sqlite:///runs/x.db", tmp_path) == f"sqlite:///{tmp_path}/runs/x.db"
    assert tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"


def test_a_relative_checkpoint_is_made_absolute_whatever_its_suffix(tmp_path, monkeypatch):
    """One checkpoint-path rule for config and backbone: ``weights.ckpt`` is a file, not a tag."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for value in ("weights.ckpt", "clip.bin", "./openai", "~/m.pt"):
        cfg = resolve_paths(load_config("coop_fewshot", [f"model.pretrained={value}"]), tmp_path)
        assert Path(cfg.model.pretrained).is_absolute(), value
    assert resolve_paths(load_config("quickstart"), tmp_path).model.pretrained == "bundled"


def test_protocol_choices_and_metrics_come_from_the_protocol_registry():
    from vlprompt.orchestrator.protocols import PROTOCOLS
    from vlprompt.orchestrator.schema import DataConfig

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(DataConfig)}["protocol"]
    assert choices == tuple(PROTOCOLS)
    assert PROTOCOLS["cross_dataset"] is PROTOCOLS["domain_generalisation"]  # one spec, two names
    assert PROTOCOLS["base_to_novel"].metrics == ("test_acc", "val_acc", "base_acc", "novel_acc", "hm")
    assert PROTOCOLS["test_time"].metrics == ("test_acc", "target_acc_mean")
    for name, protocol in PROTOCOLS.items():
        for metric in protocol.metrics:  # every metric a protocol reports is a valid sweep metric
            targets = (
                "data.eval_targets=[sw_objects]" if protocol.targets != "none" else "data.eval_targets=[]"
            )
            method = "method.name=promptkd" if protocol.transductive else "method.name=zeroshot"
            dataset = "data.dataset=sw_all" if protocol.task_source else "data.dataset=sw_shades"
            load_config(
                "quickstart",
                [
                    f"data.protocol={name}",
                    targets,
                    method,
                    dataset,
                    "sweep.space={}",
                    f"sweep.metric={metric}",
                ],
            )


def test_text_memory_keys_offer_what_the_backbone_accepts():
    from vlprompt.methods.clip import TEXT_CHECKPOINT_MODES
    from vlprompt.orchestrator.schema import ModelConfig

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(ModelConfig)}
    assert choices["text_checkpoint"] == TEXT_CHECKPOINT_MODES
    cfg = load_config("quickstart")
    assert (cfg.model.text_chunk_size, cfg.model.text_checkpoint) == (1000, "auto")
    cfg = load_config("quickstart", ["model.text_chunk_size=250", "model.text_checkpoint=always"])
    assert (cfg.model.text_chunk_size, cfg.model.text_checkpoint) == (250, "always")


def test_method_options_are_typed_by_their_dataclass():
    cfg = load_config("quickstart", ["method.name=linear_probe", "method.c_grid=[1, 100]", "sweep.space={}"])
    assert list(cfg.method.c_grid) == [1, 100]
    with pytest.raises(ConfigError, match=r"method\.c_grid"):
        load_config("quickstart", ["method.name=linear_probe", "method.c_grid=[a, b]", "sweep.space={}"])
    with pytest.raises(ConfigError, match=r"method\.csc"):
        load_config("quickstart", ["method.csc=maybe"])
    with pytest.raises(ConfigError, match=r"method\.teacher_options\.n_ctx"):
        load_config("promptkd", ["method.teacher_method=coop", "method.teacher_options={n_ctx: four}"])


def test_gpa_weights_that_miss_every_epoch_are_refused_with_the_config():
    """PromptSRC's options alone cannot know train.epochs: the config checks apply its rule."""
    cfg = load_config("promptsrc", ["train.epochs=3", "method.gpa_mean=2"])
    assert (cfg.train.epochs, cfg.method.gpa_mean) == (3, 2.0)
    with pytest.raises(
        ConfigError,
        match=r"method: promptsrc gpa_mean=15\.5 gpa_std=0\.001 put no weight "
        r"on any of the epochs 1 \.\. 20 .*\(train\.epochs=20\)",
    ):
        load_config("promptsrc", ["method.gpa_mean=15.5", "method.gpa_std=0.001"])
    load_config("promptsrc", ["method.gpa_mean=15.5", "method.gpa_std=0.001", "method.gpa=false"])
    # every point of the space is checked: 20 epochs would do, 2 do not
    with pytest.raises(ConfigError, match=r"epochs 1 \.\. 2 "):
        load_config("promptsrc", ["method.gpa_std=0.05", "sweep.space={train.epochs: {choice: [20, 2]}}"])


def test_every_point_of_the_space_is_a_valid_trial():
    from vlprompt.orchestrator.config import space_trials

    trials = list(space_trials(load_config("quickstart")))
    assert len(trials) == 18  # quickstart: 2 datasets x (zero-shot + 2 methods x 2 shots x 2 seeds)
    assert {t.method.name for t in trials} == {"zeroshot", "coop", "kgcoop"}
    assert all("n_ctx" not in t.method for t in trials if t.method.name == "zeroshot")


def test_a_command_line_value_pins_the_axis_the_preset_sweeps(capsys):
    """``--config quickstart data.shots=4`` means 4 shots, not the preset's shots axis."""
    from vlprompt.orchestrator.config import space_trials

    trials = list(space_trials(load_config("quickstart", ["data.shots=4"])))
    assert {t.data.shots for t in trials} == {4} and len(trials) == 10
    assert "data.shots=4 from the command line" in capsys.readouterr().err
    # axes conditioned on a pinned key keep the condition's verdict for the pinned value
    coop = list(space_trials(load_config("quickstart", ["method.name=coop"])))
    assert {t.method.name for t in coop} == {"coop"} and {t.seed for t in coop} == {1, 2}
    zeroshot = list(space_trials(load_config("quickstart", ["method.name=zeroshot"])))
    assert len(zeroshot) == 2 and {t.seed for t in zeroshot} == {1}
    # a command line that gives the space itself is taken as given
    explicit = load_config("quickstart", ["data.shots=4", "sweep.space={data.shots: {choice: [1, 2]}}"])
    assert list(explicit.sweep.space) == ["data.shots"]


def test_a_command_line_option_another_option_makes_ignored_is_refused_by_name():
    """``--config quickstart method.n_ctx=8`` would run 4 tokens from ``ctx_init``, silently."""
    from vlprompt.orchestrator.config import space_trials

    with pytest.raises(ConfigError, match=r"method\.n_ctx=8 has no effect on coop: method\.ctx_init="):
        load_config("quickstart", ["method.n_ctx=8"])
    with pytest.raises(ConfigError, match=r"task_n_ctx=3 has no effect on softcpt: .* \(2 tokens\)"):
        load_config(
            "multi_task", ["method.name=softcpt", "method.task_ctx_init=a task", "method.task_n_ctx=3"]
        )
    with pytest.raises(ConfigError, match=r"n_ctx=8 has no effect on tpt: method\.ctx_init='a photo of a'"):
        load_config("test_time", ["method.n_ctx=8"])  # TPT's ctx_init by default
    assert load_config("quickstart", ["method.n_ctx=4"]).method.n_ctx == 4  # what ctx_init gives: no conflict
    # cleared, the option counts, in every trial of the sweep that runs the method
    trials = list(space_trials(load_config("quickstart", ["method.ctx_init=''", "method.n_ctx=8"])))
    assert {(t.method.n_ctx, t.method.ctx_init) for t in trials if t.method.name != "zeroshot"} == {(8, "")}
    # a preset may state both (documentation); only the command line's setting is refused
    assert load_config("quickstart").method.n_ctx == 4

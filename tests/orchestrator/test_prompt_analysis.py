"""``experiments/analyse_prompts.py`` (``orchestrator/prompt_analysis.py``): a finished run read back
from a real SQLite MLflow store -- its config rebuilt from its params, runs that cannot be analysed
refused by name before anything heavy loads -- and, end to end, the analysis of a real IVLP run
made by the loop equal to the analysis of the same model held in memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vlprompt.orchestrator import prompt_analysis, tracking
from vlprompt.orchestrator.config import ConfigError, config_from_params, load_config, resolve_paths
from vlprompt.orchestrator.loop import Keep, WorkerContext, run
from vlprompt.orchestrator.schema import flatten

UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")
REPO = Path(__file__).resolve().parents[2]
# not IVLP's defaults (2 + 2 tokens, depth 12/12), so a rebuild that lost an option shows
IVLP = ("method.name=ivlp", "method.n_ctx_text=3", "method.n_ctx_vision=3", "method.depth_vision=1")


def _cfg(tmp_path, *overrides, method=IVLP):
    base = [
        *method,
        f"data.root={tmp_path / 'data'}",
        "data.generate_missing=true",
        "data.dataset=synthetic",
        "data.shots=4",
        "train.epochs=2",
        "train.batch_size=8",
        "train.lr=0.02",
        "sweep.space={}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    return resolve_paths(load_config(UNIT, [*base, *overrides]), tmp_path)


def _logged(cfg) -> dict[str, str]:
    """The params a run of ``cfg`` logs for its config, as MLflow holds them (text)."""
    return {k: tracking._param_value(v) for k, v in flatten(cfg).items()}


def _fake_run(cfg, status: str = "FINISHED", learned: bool = False) -> str:
    """A run in the store with ``cfg``'s params (and a learned state), nothing trained."""
    uri = cfg.tracking.uri
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "unit"), "fake")
    tracking.log_params(uri, run_id, flatten(cfg))
    if learned:
        tracking.log_artifact_files(uri, run_id, {"learned_state.pt": b"not read"}, "learned")
    if status == "FINISHED":
        tracking.finish_run(uri, run_id)
    return run_id


def test_a_runs_config_comes_back_from_its_params(tmp_path):
    cfg = _cfg(tmp_path, "method.ctx_init=a photo", "data.eval_targets=[]", "seed=7")
    params = {**_logged(cfg), "trainable_params": "512", "data.generated": "synthetic", "git_commit": "x"}
    back = config_from_params(params)
    for section in ("model", "data", "train", "method"):
        assert OmegaConf.to_container(back[section]) == OmegaConf.to_container(cfg[section]), section
    assert (back.seed, back.name) == (7, cfg.name)
    moved = config_from_params(params, ["data.root=/elsewhere", "train.device=cpu"])
    assert (moved.data.root, moved.train.device, moved.method.ctx_init) == ("/elsewhere", "cpu", "a photo")
    cut = {**params, "method.ctx_init": "x" * 6000}
    with pytest.raises(ConfigError, match=r"'method\.ctx_init' was cut at 6000"):
        config_from_params(cut)
    assert config_from_params(cut, ["method.ctx_init=a photo"]).method.ctx_init == "a photo"
    with pytest.raises(ConfigError, match=r"no method\.name"):
        config_from_params({"seed": "1"})


def _main(cfg, run_id, capsys, *extra):
    code = prompt_analysis.main(["--run-id", run_id, "--tracking-uri", cfg.tracking.uri, *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fail the test if the command goes on to read the learned state or build the model."""

    def heavy(*args, **kwargs):
        raise AssertionError("the command loaded something for a run it must refuse")

    monkeypatch.setattr(prompt_analysis, "read_learned", heavy)
    monkeypatch.setattr(prompt_analysis, "analyse", heavy)


def test_runs_that_cannot_be_analysed_are_refused_by_name(tmp_path, capsys, nothing_heavy):
    coop = _cfg(tmp_path, method=("method.name=coop", "method.n_ctx=4"))
    code, err = _main(coop, _fake_run(coop, learned=True), capsys)
    assert code == 2 and "method 'coop' puts no prompts into the blocks" in err
    assert "ivlp, maple, promptkd, promptsrc can be analysed" in err
    ivlp = _cfg(tmp_path)
    code, err = _main(ivlp, "0123456789abcdef", capsys)
    assert code == 2 and "no MLflow run '0123456789abcdef'" in err
    code, err = _main(ivlp, _fake_run(ivlp), capsys)
    assert code == 2 and "has no learned/learned_state.pt artifact" in err
    code, err = _main(ivlp, _fake_run(ivlp, status="RUNNING", learned=True), capsys)
    assert code == 2 and "is RUNNING, not FINISHED" in err


def test_a_refused_run_never_imports_torch(tmp_path):
    cfg = _cfg(tmp_path, method=("method.name=zeroshot",))
    run_id = _fake_run(cfg, learned=True)
    script = (
        "import sys\nfrom vlprompt.orchestrator.prompt_analysis import main\n"
        f"code = main(['--run-id', {run_id!r}, '--tracking-uri', {cfg.tracking.uri!r}])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.stdout.split()[-2:] == ["2", "False"], done.stderr
    assert "method 'zeroshot' puts no prompts into the blocks" in done.stderr


@pytest.mark.e2e  # a real IVLP run through the loop, then seven passes over its test split
def test_the_analysis_of_a_logged_run_equals_the_analysis_of_the_model_in_memory(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    uri = cfg.tracking.uri
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "unit"), "ivlp")
    keep = Keep()
    metrics = run(cfg, WorkerContext(0, 1, torch.device("cpu")), run_id, keep)
    tracking.finish_run(uri, run_id)
    capsys.readouterr()

    code = prompt_analysis.main(["--run-id", run_id, "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    logged = json.loads((tmp_path / "out" / "summary.json").read_text())
    memory = prompt_analysis.analyse(cfg, keep.learned, say=lambda _: None)

    assert logged["accuracy"] == memory.accuracy
    assert logged["layers"] == memory.layers
    # the rebuilt model is the run's: it scores what the run logged
    assert memory.accuracy["prompted"] == metrics["test_acc"]
    # each tower's dataset: the classes (text), the images (vision); visual prompts only in block 0
    counts = {"text": memory.classes, "vision": memory.images}
    assert [(r["tower"], r["block"], r["sequences"], r["fresh"]) for r in memory.layers] == [
        ("text", 0, counts["text"], True),
        ("text", 1, counts["text"], True),
        ("vision", 0, counts["vision"], True),
        ("vision", 1, counts["vision"], False),
    ]
    for row in memory.layers:
        assert 0.0 < row["share_readout"] < 1.0 and row["prompt_norm_readout"] > 0.0
    in_store = set(tracking.artifact_paths(uri, run_id, "analysis"))
    expected = {"layers.md", "layers.csv", "ablation.md", "ablation.csv", "summary.json"}
    assert {f"analysis/{name}" for name in expected} | {
        f"analysis/{p}.png" for p in ("attention_share", "prompt_norm", "ablation")
    } == in_store
    assert f"logged test_acc {metrics['test_acc']:.2f}%" in out and "| mean_bias |" in out

    # the rebuilt model is checked against what the run logged
    quiet = {"max_images": 2, "say": lambda _: None}
    moved = prompt_analysis.analyse(cfg, keep.learned, logged={"split_fingerprint": "0" * 64}, **quiet)
    assert moved.notes and "is not the run's (000000000000)" in moved.notes[0]
    with pytest.raises(ValueError, match="the run logged 7: the config does not rebuild"):
        prompt_analysis.analyse(cfg, keep.learned, logged={"trainable_params": "7"}, **quiet)

    # the options: another split, a few images evenly spread over it, one tower ablated
    small = ["--split", "train", "--max-images", "5", "--towers", "vision", "--out", str(tmp_path / "small")]
    assert prompt_analysis.main(["--run-id", run_id, "--tracking-uri", uri, *small]) == 0
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert (summary["split"], summary["images"], summary["towers"]) == ("train", 5, ["vision"])
    assert summary["accuracy"]["zero"] != memory.accuracy["zero"]
    bad = ["--run-id", run_id, "--tracking-uri", uri, "--towers", "audio"]
    with pytest.MonkeyPatch.context() as patch:  # refused before the model loads
        patch.setattr(prompt_analysis, "read_learned", None)
        assert prompt_analysis.main(bad) == 2
    assert "--towers audio: this method has prompts in text, vision only" in capsys.readouterr().err


def test_the_ablation_table_shares_the_trained_gain_only_when_there_is_one():
    accuracy = {"zeroshot": 40.0, "prompted": 60.0, "mean_bias": 55.0, "zero": 30.0, "keys_only": 40.0}
    rows = prompt_analysis.ablation_rows({**accuracy, "mean_values": 60.0})
    assert [r["variant"] for r in rows] == list(prompt_analysis.VARIANTS)
    assert [r["gain_kept"] for r in rows] == [0.0, 1.0, 0.75, -0.5, 0.0, 1.0]
    worse = prompt_analysis.ablation_rows({**accuracy, "prompted": 35.0, "mean_values": 60.0})
    assert all(math.isnan(r["gain_kept"]) for r in worse) and worse[2]["gain"] == 15.0
    assert "| mean_bias | (a) prompts out of the attention" in prompt_analysis.to_markdown(
        rows, prompt_analysis.ABLATION_COLUMNS
    )

"""Which sweep ``--resume`` continues, and the refusals that name what is wrong (no Ray)."""

from __future__ import annotations

import pytest

from vlprompt.orchestrator import sweep_record
from vlprompt.orchestrator.schema import ConfigError
from vlprompt.orchestrator.sweep_record import SweepRecord

CONFIG = {"sweep.name": "quickstart", "train.epochs": 10, "resources.num_workers": 1, "seed": 1}


def _record(storage, name, state, created, **changes):
    sweep_record.write(storage, SweepRecord(name, {**CONFIG, **changes}, f"run-{name}", state, created))


def test_a_new_launch_never_reuses_an_earlier_sweeps_name(tmp_path):
    assert sweep_record.fresh_name(tmp_path, "quickstart") == "quickstart"
    _record(tmp_path, "quickstart", "finished", 1)
    (tmp_path / "quickstart-2").mkdir()  # a Tune folder without a record counts too
    assert sweep_record.fresh_name(tmp_path, "quickstart") == "quickstart-3"


def test_resume_picks_the_latest_unfinished_sweep_of_this_config(tmp_path):
    _record(tmp_path, "quickstart", "finished", 1)
    _record(tmp_path, "quickstart-2", "interrupted", 2)
    _record(tmp_path, "quickstart-3", "running", 3, **{"train.epochs": 5})  # another config
    _record(tmp_path, "quickstart-4", "finished", 4)
    _record(tmp_path, "other", "running", 5)  # another family
    # resources may differ between launches; the sweep's own name is not part of its config
    config = {**CONFIG, "resources.num_workers": 4, "sweep.name": "quickstart-9"}
    assert sweep_record.resume_target(tmp_path, "quickstart", config, None).name == "quickstart-2"
    assert sweep_record.resume_target(tmp_path, "quickstart", config, "quickstart-4").name == "quickstart-4"


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path):
    _record(tmp_path, "quickstart", "interrupted", 1)
    changed = {**CONFIG, "train.epochs": 20, "seed": 2}
    with pytest.raises(ConfigError, match=r"seed: 1 → 2; train\.epochs: 10 → 20") as err:
        sweep_record.resume_target(tmp_path, "quickstart", changed, None)
    assert "--resume quickstart" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.epochs: 10 → 20"):
        sweep_record.resume_target(tmp_path, "quickstart", changed, "quickstart")


def test_resume_refuses_when_there_is_nothing_to_resume(tmp_path):
    with pytest.raises(ConfigError, match=r"no sweep 'quickstart' in .* to resume"):
        sweep_record.resume_target(tmp_path, "quickstart", CONFIG, None)
    _record(tmp_path, "quickstart", "finished", 1)
    _record(tmp_path, "quickstart-2", "finished", 2)
    with pytest.raises(ConfigError, match=r"has finished \(quickstart, quickstart-2\); nothing to resume"):
        sweep_record.resume_target(tmp_path, "quickstart", CONFIG, None)
    with pytest.raises(
        ConfigError, match=r"no sweep 'nope'.*quickstart \(finished\), quickstart-2 \(finished\)"
    ):
        sweep_record.resume_target(tmp_path, "quickstart", CONFIG, "nope")


def test_state_changes_are_written_through(tmp_path):
    _record(tmp_path, "quickstart", "running", 1)
    sweep_record.set_state(tmp_path, "quickstart", "interrupted")
    assert sweep_record.read(tmp_path, "quickstart").state == "interrupted"
    assert sweep_record.read(tmp_path, "missing") is None

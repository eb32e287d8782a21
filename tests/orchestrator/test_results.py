"""Results tables: mean ± std over seeds per configuration; failed trials left out."""

from __future__ import annotations

import csv
import io

import pytest

from vlprompt.orchestrator.results import summarise, to_csv, to_markdown


def _row(method, shots, seed, acc, **extra):
    return {
        "method": method,
        "options": {},
        "dataset": "eurosat",
        "data": "real",
        "protocol": "few_shot",
        "shots": shots,
        "seed": seed,
        "test_acc": acc,
        **extra,
    }


def test_groups_by_configuration_and_averages_over_seeds():
    rows = [
        _row("coop", 4, 1, 70.0),
        _row("coop", 4, 2, 74.0),
        _row("coop", 4, 3, 72.0),
        _row("zeroshot", 4, 1, 50.0),
        {"method": "coop", "error": "boom"},
    ]
    table = summarise(rows)
    assert [t["method"] for t in table] == ["coop", "zeroshot"]
    mean, std, n = table[0]["test_acc"]
    assert (mean, n) == (72.0, 3) and std == pytest.approx(2.0)
    assert table[0]["seeds"] == [1, 2, 3]
    assert table[1]["test_acc"] == (50.0, 0.0, 1)
    md = to_markdown(table)
    assert "| coop | - | eurosat | real | few_shot | 4 | 1,2,3 | 72.00 ± 2.00 |" in md
    parsed = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert parsed[0]["test_acc_mean"] == "72.0" and parsed[0]["test_acc_n"] == "3"


def test_base_to_novel_columns_appear_when_present():
    table = summarise([_row("coop", 16, 1, 80.0, base_acc=80.0, novel_acc=60.0, hm=68.57)])
    md = to_markdown(table)
    assert "base_acc" in md and "novel_acc" in md and "| 68.57 ± 0.00" in md


def test_a_configuration_with_a_list_option_has_its_row(tmp_path):
    """The sweep's row of a configuration is plain data: PromptAlign's ``align_layers`` list once
    crashed the results table (a ListConfig cannot be serialised to group rows)."""
    from types import SimpleNamespace

    from vlprompt.orchestrator.config import load_config
    from vlprompt.orchestrator.sweep import _row

    cfg = load_config("promptalign", [f"data.root={tmp_path}", "sweep.space={}"])
    run = SimpleNamespace(
        info=SimpleNamespace(status="FINISHED", run_id="r1"),
        data=SimpleNamespace(metrics={"test_acc": 50.0, "target_acc_mean": 40.0}, tags={}),
    )
    row = _row(cfg, [run], None)
    assert row["options"]["align_layers"] == [0, 1] and type(row["options"]["align_layers"]) is list
    (line,) = summarise([row])
    assert line["options"]["align_layers"] == [0, 1] and line["test_acc"] == (50.0, 0.0, 1)
    assert "align_layers=[0, 1]" in to_markdown([line])

"""Paired comparison statistics: the t-interval against hand-computed values, pairing bookkeeping."""

from __future__ import annotations

import math

import pytest

from vlprompt.orchestrator.compare import (
    compare,
    pair,
    parse_selector,
    t_interval,
    t_quantile,
    to_csv,
    to_markdown,
)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.706205),
        (0.975, 2, 4.302653),
        (0.975, 9, 2.262157),
        (0.975, 30, 2.042272),
        (0.025, 3, -3.182446),
    ],
)
def test_t_quantiles_match_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)


def test_t_interval_by_hand():
    ci = t_interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, half width t(0.975, 2) · 1 / √3
    assert (ci.n, ci.mean, ci.sd) == (3, 2.0, 1.0)
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    assert (ci.low, ci.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    single = t_interval([5.0])
    assert single.n == 1 and single.mean == 5.0 and single.half_width is None and single.low is None
    with pytest.raises(ValueError):
        t_interval([])


def _row(method, dataset, seed, acc, **extra):
    return {"method": method, "dataset": dataset, "shots": 4, "seed": seed, "test_acc": acc, **extra}


def test_pairing_drops_unmatched_runs_and_reports_them():
    rows = [
        _row("coop", "eurosat", 1, 70.0),
        _row("coop", "eurosat", 2, 72.0),
        _row("coop", "eurosat", 3, 74.0),
        _row("bias", "eurosat", 1, 71.0),
        _row("bias", "eurosat", 2, 74.0),
        _row("bias", "eurosat", 3, 77.0),
        _row("coop", "dtd", 1, 50.0),
        _row("bias", "dtd", 1, 55.0),
        _row("coop", "dtd", 2, 51.0),  # no bias partner
        _row("bias", "dtd", 3, 60.0),  # no coop partner
        _row("bias", "dtd", 1, 99.0),  # duplicate key: the first one is used
        {"method": "coop", "dataset": "dtd", "shots": 4, "seed": 4},  # no metric
        _row("zeroshot", "dtd", 1, 40.0),  # neither side: ignored
    ]
    pairing = pair(
        rows, parse_selector(["method=coop"]), {"method": "bias"}, ["dataset", "shots", "seed"], "test_acc"
    )
    assert len(pairing.pairs) == 4
    assert [r["seed"] for r in pairing.only_a] == [2] and [r["seed"] for r in pairing.only_b] == [3]
    assert [r["test_acc"] for r in pairing.duplicates] == [99.0] and len(pairing.no_metric) == 1
    assert pairing.dropped == 4 and "4 pair(s); dropped 4" in pairing.summary()

    table = compare(pairing, "test_acc", ["dataset", "shots"])
    dtd, eurosat = table
    assert (dtd["dataset"], dtd["n"], dtd["diff_mean"], dtd["ci_low"]) == ("dtd", 1, 5.0, None)
    assert eurosat["n"] == 3 and eurosat["a_mean"] == 72.0 and eurosat["b_mean"] == 74.0
    assert eurosat["diff_mean"] == 2.0 and eurosat["diff_sd"] == 1.0  # diffs 1, 2, 3
    assert eurosat["ci_high"] == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-6)
    md = to_markdown(table, ["dataset", "shots"], "method=coop", "method=bias", "test_acc")
    assert "| dtd | 4 | 1 | 50.00 | 55.00 | +5.00 | undefined (n=1) |" in md
    assert "| eurosat | 4 | 3 | 72.00 | 74.00 | +2.00 | [-0.48, +4.48] |" in md
    assert to_csv(table, ["dataset", "shots"]).splitlines()[1].startswith("dtd,4,1,50.0,55.0,5.0,,,,")


def test_selectors_must_be_disjoint_and_well_formed():
    with pytest.raises(ValueError, match="both"):
        pair([_row("coop", "dtd", 1, 1.0)], {"shots": "4"}, {"method": "coop"}, ["seed"], "test_acc")
    with pytest.raises(ValueError, match="key=value"):
        parse_selector(["coop"])

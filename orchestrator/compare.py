"""Paired comparison of two configurations over matched runs: pure statistics, no MLflow.

Two configurations A and B (each a ``key=value`` selector over run rows, e.g. ``method=coop``)
are paired on the keys that make runs comparable (default ``dataset, shots, seed``): the same
few-shot split seen by both. Per group (default: the pairing keys without ``seed``) the
report gives the mean of each over the pairs, the mean paired difference ``B − A`` and its
Student-t confidence interval ``d̄ ± t(1 − α/2, n − 1) · s_d / √n`` over the ``n`` paired
differences -- undefined for ``n = 1``. Runs without a partner are dropped and listed.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

Row = Mapping[str, Any]


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy's ``t.ppf``)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided t confidence interval (``None`` bounds when ``n < 2``)."""

    n: int
    mean: float
    sd: float | None
    half_width: float | None
    confidence: float

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """``mean ± t(1 − α/2, n − 1) · s / √n`` (``s`` the sample standard deviation)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(1, mean, None, None, confidence)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, half, confidence)


# --------------------------------------------------------------------------------------
# pairing


def parse_selector(items: Sequence[str]) -> dict[str, str]:
    """``["method=coop", "shots=4"]`` → ``{"method": "coop", "shots": "4"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def matches(row: Row, selector: Mapping[str, str]) -> bool:
    """Every ``key=value`` of the selector holds for the row (values compared as text)."""
    return all(key in row and str(row[key]) == str(value) for key, value in selector.items())


def describe(selector: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in selector.items())


@dataclass
class Pairing:
    """Matched (A, B) rows plus every row that could not be used, with the reason."""

    pairs: list[tuple[Row, Row]] = field(default_factory=list)
    only_a: list[Row] = field(default_factory=list)
    """A rows whose pairing key has no B row."""
    only_b: list[Row] = field(default_factory=list)
    duplicates: list[Row] = field(default_factory=list)
    """Second and later rows of one side with the same pairing key (the first one is used)."""
    no_metric: list[Row] = field(default_factory=list)
    """A or B rows that lack the metric or a pairing key."""

    @property
    def dropped(self) -> int:
        return len(self.only_a) + len(self.only_b) + len(self.duplicates) + len(self.no_metric)

    def summary(self) -> str:
        return (
            f"{len(self.pairs)} pair(s); dropped {self.dropped}: {len(self.only_a)} A without B, "
            f"{len(self.only_b)} B without A, {len(self.duplicates)} duplicate(s), "
            f"{len(self.no_metric)} without the metric or a pairing key"
        )


def pair(
    rows: Sequence[Row], a: Mapping[str, str], b: Mapping[str, str], pair_by: Sequence[str], metric: str
) -> Pairing:
    """Pair A rows with B rows that agree on every ``pair_by`` key; rows matching neither are ignored."""
    if not a or not b:
        raise ValueError("both configurations need at least one key=value")
    sides: dict[str, dict[tuple[str, ...], Row]] = {"a": {}, "b": {}}
    out = Pairing()
    for row in rows:
        in_a, in_b = matches(row, a), matches(row, b)
        if in_a and in_b:
            raise ValueError(f"run matches both A ({describe(a)}) and B ({describe(b)}); make them disjoint")
        if not (in_a or in_b):
            continue
        if metric not in row or any(k not in row for k in pair_by):
            out.no_metric.append(row)
            continue
        key = tuple(str(row[k]) for k in pair_by)
        side = sides["a" if in_a else "b"]
        if key in side:
            out.duplicates.append(row)
        else:
            side[key] = row
    for key, row_a in sides["a"].items():
        if key in sides["b"]:
            out.pairs.append((row_a, sides["b"][key]))
        else:
            out.only_a.append(row_a)
    out.only_b = [row for key, row in sides["b"].items() if key not in sides["a"]]
    return out


def compare(
    pairing: Pairing, metric: str, group_by: Sequence[str], confidence: float = 0.95
) -> list[dict[str, Any]]:
    """One line per group: n, mean of A and of B, and the interval of the differences ``B − A``."""
    groups: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for row_a, row_b in pairing.pairs:
        key = tuple(str(row_a[k]) for k in group_by)
        groups.setdefault(key, []).append((float(row_a[metric]), float(row_b[metric])))
    table = []
    for key in sorted(groups, key=_natural):
        values = groups[key]
        interval = t_interval([vb - va for va, vb in values], confidence)
        line: dict[str, Any] = dict(zip(group_by, key, strict=True))
        line.update(
            n=interval.n,
            a_mean=statistics.fmean(va for va, _ in values),
            b_mean=statistics.fmean(vb for _, vb in values),
            diff_mean=interval.mean,
            diff_sd=interval.sd,
            ci_low=interval.low,
            ci_high=interval.high,
            ci_half_width=interval.half_width,
        )
        table.append(line)
    return table


def _natural(key: tuple[str, ...]) -> tuple:
    """Sort ``"4"`` before ``"16"``: numbers by value, text by text."""
    return tuple((0, float(k), "") if _is_number(k) else (1, 0.0, k) for k in key)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------
# tables


def to_markdown(
    table: Sequence[Mapping[str, Any]],
    group_by: Sequence[str],
    a: str,
    b: str,
    metric: str,
    confidence: float = 0.95,
) -> str:
    pct = f"{100 * confidence:g} %"
    head = [*group_by, "n", f"A: {a}", f"B: {b}", "B − A", f"{pct} CI of B − A"]
    lines = [
        f"Paired comparison of `{metric}` (mean over the n pairs; CI: Student t over the paired differences)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for line in table:
        ci = (
            "undefined (n=1)"
            if line["ci_low"] is None
            else f"[{line['ci_low']:+.2f}, {line['ci_high']:+.2f}]"
        )
        cells = [*(str(line[k]) for k in group_by), str(line["n"])]
        cells += [f"{line['a_mean']:.2f}", f"{line['b_mean']:.2f}", f"{line['diff_mean']:+.2f}", ci]
        lines.append("| " + " | ".join(cells) + " |")
    if not table:
        lines.append("| (no pairs) |")
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[Mapping[str, Any]], group_by: Sequence[str]) -> str:
    cols = [*group_by, "n", "a_mean", "b_mean", "diff_mean", "diff_sd", "ci_low", "ci_high", "ci_half_width"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(cols)
    for line in table:
        writer.writerow(["" if line.get(c) is None else line[c] for c in cols])
    return out.getvalue()

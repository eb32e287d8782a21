"""Results tables: trials grouped by (method, options, dataset, data, protocol, shots), mean ± std over seeds.

``data`` says whether the images were ``real`` or ``generated`` (procedural data or stand-ins
written by ``vlprompt.datasets.generate``), so a table never passes generated numbers off as a
benchmark's.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

#: Metrics a trial reports that belong in tables (in this order).
METRIC_COLUMNS = (
    "target_acc_mean",
    "test_acc",
    "val_acc",
    "base_acc",
    "novel_acc",
    "hm",
    "trainable_params",
    "time_worker_s",
    "time_train_s",
)
_TABLE_METRICS = ("test_acc", "base_acc", "novel_acc", "hm", "target_acc_mean")
_KEYS = ("method", "options", "dataset", "data", "protocol", "shots")


def summarise(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per configuration; each metric as (mean, std, n) over the seeds that finished."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("error") or row.get("stopped") or "method" not in row:
            continue
        key = tuple(json.dumps(row.get(k), sort_keys=True) for k in _KEYS)
        groups[key].append(row)
    table = []
    for key in sorted(groups):
        members = groups[key]
        line: dict[str, Any] = {k: json.loads(v) for k, v in zip(_KEYS, key, strict=True)}
        line["seeds"] = sorted(m["seed"] for m in members)
        for metric in _TABLE_METRICS:
            values = [float(m[metric]) for m in members if metric in m]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                line[metric] = (statistics.fmean(values), std, len(values))
        if "trainable_params" in members[0]:
            line["trainable_params"] = int(members[0]["trainable_params"])
        table.append(line)
    return table


def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        mean, std, _ = value
        return f"{mean:.2f} ± {std:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _columns(table: Sequence[Mapping[str, Any]]) -> list[str]:
    base = ["method", "options", "dataset", "data", "protocol", "shots", "seeds"]
    present = [m for m in _TABLE_METRICS if any(m in line for line in table)]
    return base + present + (["trainable_params"] if any("trainable_params" in t for t in table) else [])


def to_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    if not table:
        return "(no finished trials)\n"
    cols = _columns(table)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(line.get(c, "")) for c in cols) + " |" for line in table]
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[Mapping[str, Any]]) -> str:
    cols = _columns(table) if table else []
    out = io.StringIO()
    writer = csv.writer(out)
    header = []
    for c in cols:
        header += [f"{c}_mean", f"{c}_std", f"{c}_n"] if c in _TABLE_METRICS else [c]
    writer.writerow(header)
    for line in table:
        cells = []
        for c in cols:
            v = line.get(c, "")
            cells += list(v) if isinstance(v, tuple) else [_cell(v) if v != "" else ""]
        writer.writerow(cells)
    return out.getvalue()


# --------------------------------------------------------------------------------------
# one method against another, per dataset (the README's small-world table)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def versus(
    rows: Iterable[Mapping[str, Any]],
    a: Callable[[Mapping[str, Any]], bool],
    b: Callable[[Mapping[str, Any]], bool],
    metric: str = "test_acc",
) -> list[dict[str, Any]]:
    """Per (protocol, dataset): classes, chance, A and B (mean ± std over their runs), B − A.

    Unpaired: a zero-shot baseline has one run per dataset, the learned method one per seed.
    ``a`` and ``b`` pick a row's side; rows on neither side, failed or without ``metric`` are left out.
    """
    groups: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = defaultdict(
        lambda: {"a": [], "b": []}
    )
    for row in rows:
        side = "a" if a(row) else "b" if b(row) else None
        if side and not row.get("error") and metric in row:
            groups[(str(row.get("protocol")), str(row.get("dataset")))][side].append(row)
    table = []
    for (protocol, dataset), sides in sorted(groups.items()):
        if not (sides["a"] and sides["b"]):
            continue
        classes = int(float(sides["a"][0].get("num_classes", 0) or 0))
        line: dict[str, Any] = {"protocol": protocol, "dataset": dataset, "classes": classes}
        line["chance"] = 100.0 / classes if classes else float("nan")
        line["a"] = _mean_std([float(r[metric]) for r in sides["a"]])
        line["b"] = _mean_std([float(r[metric]) for r in sides["b"]])
        line["gain"] = line["b"][0] - line["a"][0]
        table.append(line)
    return table


def versus_markdown(table: Sequence[Mapping[str, Any]], a: str, b: str, metric: str = "test_acc") -> str:
    """The :func:`versus` table, with the mean gain per protocol."""
    if not table:
        return "(no dataset has runs of both configurations)\n"
    head = ["protocol", "dataset", "classes", "chance", f"A: {a}", f"B: {b} (mean ± std, n)", "B − A"]
    lines = [f"{metric}, %", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in table:
        b_mean, b_std, n = line["b"]
        known = line["classes"] > 0
        cells = [line["protocol"], line["dataset"], str(line["classes"]) if known else "-"]
        cells.append(f"{line['chance']:.1f}" if known else "-")
        cells += [f"{line['a'][0]:.1f}", f"{b_mean:.1f} ± {b_std:.1f} ({n})", f"{line['gain']:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for protocol in sorted({line["protocol"] for line in table}):
        gains = [line["gain"] for line in table if line["protocol"] == protocol]
        mean = statistics.fmean(gains)
        lines.append(f"{protocol}: mean gain B − A over {len(gains)} dataset(s): {mean:+.1f} points.")
    return "\n".join(lines) + "\n"

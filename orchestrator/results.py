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
from collections.abc import Iterable, Mapping, Sequence
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
        if row.get("error") or "method" not in row:
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

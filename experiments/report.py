"""Tables and plots of a finished sweep, from its MLflow runs (like the papers' tables).

    python experiments/report.py --tracking-uri sqlite:///mlflow.db --sweep quickstart
    python experiments/report.py --tracking-uri sqlite:///mlflow.db --run-id <parent run id> \\
        --a method=coop --b method=bias_tuning                     # paired on dataset, shots, seed
    python experiments/report.py --sweep coop_fewshot --compare method.n_ctx=4 method.n_ctx=16 \\
        --pair-by dataset,shots,seed --metric test_acc --out report/
    python experiments/report.py --sweep smallworld --versus method=zeroshot method=coop

Reads the sweep's child runs (``tags.mlflow.parentRunId``; only FINISHED runs count, the
others are counted and named by status) and writes, to ``--out`` and as artifacts
``report/...`` of the sweep's parent run:

* ``summary.md|csv`` -- one line per configuration, mean ± std over seeds
  (:mod:`vlprompt.orchestrator.results`);
* with two configurations A and B: ``compare.md|csv|png`` -- per group (the pairing keys
  without ``seed``) the mean of A and of B over matched runs, the paired difference B − A and
  its 95 % Student-t interval (:mod:`vlprompt.orchestrator.compare`);
* with ``--versus A B``: ``versus.md`` -- per protocol and dataset the class count, chance, A and
  B (mean ± std over their runs, unpaired: a zero-shot baseline has one run, a learned method one
  per seed) and B − A, with the mean gain (the README's small-world table).

Selectors are ``key=value`` over a run's row: the short keys ``method dataset protocol
shots seed model`` or any logged param by its full name (``method.n_ctx``, ``train.lr``).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Run

from vlprompt.orchestrator import compare, results, tracking
from vlprompt.orchestrator.schema import param_value

#: Row keys taken from the params every run logs (``orchestrator.loop``).
SHORT_KEYS = {
    "method": "method.name",
    "dataset": "data.dataset",
    "protocol": "data.protocol",
    "shots": "data.shots",
    "seed": "seed",
    "model": "model.name",
}


_value = param_value  # a param's value back from its logged text ("4" → 4, "True" → True)


def run_row(run: Run) -> dict[str, Any]:
    """One results row: short keys, the method's options, every param by full name, the final metrics."""
    params = run.data.params
    row: dict[str, Any] = dict(params)
    row.update({short: _value(params[full]) for short, full in SHORT_KEYS.items() if full in params})
    row["data"] = "real" if params.get("data.generated", "none") == "none" else "generated"
    row["options"] = {
        k.removeprefix("method."): _value(v)
        for k, v in params.items()
        if k.startswith("method.") and k != "method.name"
    }
    row.update(run.data.metrics)
    row["run_id"] = run.info.run_id
    return row


def find_parent(uri: str, run_id: str | None, sweep: str | None, experiment: str | None) -> Run:
    """The parent run by id, or the newest run tagged ``kind=sweep`` with that sweep name."""
    client = tracking.client(uri)
    if run_id:
        return client.get_run(run_id)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} at {uri}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        ids,
        filter_string=f"tags.kind = 'sweep' and tags.sweep = '{sweep}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ValueError(f"no sweep run (tag kind=sweep) named {sweep!r} at {uri}")
    return runs[0]


def child_runs(uri: str, parent: Run) -> tuple[list[Run], Counter[str]]:
    """The parent's FINISHED child runs, and how many others were skipped, by status."""
    client = tracking.client(uri)
    found, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            max_results=1000,
            page_token=token,
        )
        found += list(page)
        token = page.token
        if not token:
            break
    finished = [r for r in found if r.info.status == "FINISHED"]
    skipped = Counter(r.info.status for r in found if r.info.status != "FINISHED")
    return finished, skipped


def plot(table: Sequence[dict[str, Any]], group_by: Sequence[str], title: str) -> bytes:
    """Bars of the mean difference B − A per group, 95 % CI as error bars (none where n = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        "/".join(str(line[k]) for k in group_by)
        + f"\nn={line['n']}"
        + ("" if line["ci_half_width"] else " (no CI)")
        for line in table
    ]
    diffs = [line["diff_mean"] for line in table]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(table) + 2.0), 3.8))
    ax.bar(range(len(table)), diffs, color=["C2" if d >= 0 else "C3" for d in diffs])
    with_ci = [i for i, line in enumerate(table) if line["ci_half_width"] is not None]
    ax.errorbar(
        with_ci,
        [diffs[i] for i in with_ci],
        yerr=[table[i]["ci_half_width"] for i in with_ci],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(table)), labels, rotation=30, ha="right")
    ax.set_ylabel("B − A")
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="the sweep's parent run id")
    which.add_argument("--sweep", help="sweep name: its newest parent run (tag kind=sweep)")
    parser.add_argument("--experiment", help="look for --sweep in this MLflow experiment only")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    parser.add_argument("--metric", default="test_acc", help="metric to compare (default: test_acc)")
    parser.add_argument("--a", nargs="+", default=[], metavar="KEY=VALUE", help="configuration A")
    parser.add_argument("--b", nargs="+", default=[], metavar="KEY=VALUE", help="configuration B")
    parser.add_argument("--compare", nargs=2, metavar="KEY=VALUE", help="shorthand for --a X --b Y")
    parser.add_argument("--pair-by", default="dataset,shots,seed", help="keys a pair shares")
    parser.add_argument("--versus", nargs=2, metavar="KEY=VALUE", help="A and B per dataset, unpaired")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("--tracking-uri (or MLFLOW_TRACKING_URI) is required")
    if args.compare and (args.a or args.b):
        parser.error("use either --compare or --a/--b")
    if bool(args.a) != bool(args.b):
        parser.error("--a and --b go together")
    try:
        args.a = compare.parse_selector(args.compare[:1] if args.compare else args.a)
        args.b = compare.parse_selector(args.compare[1:] if args.compare else args.b)
        args.versus = [compare.parse_selector([v]) for v in args.versus or []]
    except ValueError as err:
        parser.error(str(err))
    return args


def _paired(rows: list[dict[str, Any]], args: argparse.Namespace, header: str) -> dict[str, bytes | str]:
    pair_by = [k.strip() for k in args.pair_by.split(",") if k.strip()]
    group_by = [k for k in pair_by if k != "seed"]
    pairing = compare.pair(rows, args.a, args.b, pair_by, args.metric)
    lines = compare.compare(pairing, args.metric, group_by)
    a_text, b_text = compare.describe(args.a), compare.describe(args.b)
    md = compare.to_markdown(lines, group_by, a_text, b_text, args.metric)
    note = f"Paired by {', '.join(pair_by)}: {pairing.summary()}."
    print(note)
    print(md)
    return {
        "compare.md": f"{header}\n{note}\n\n{md}",
        "compare.csv": compare.to_csv(lines, group_by),
        "compare.png": plot(lines, group_by, f"{args.metric}: ({b_text}) − ({a_text}), 95 % CI"),
    }


def _versus(rows: list[dict[str, Any]], args: argparse.Namespace, header: str) -> dict[str, bytes | str]:
    a, b = args.versus
    table = results.versus(
        rows, lambda r: compare.matches(r, a), lambda r: compare.matches(r, b), args.metric
    )
    md = results.versus_markdown(table, compare.describe(a), compare.describe(b), args.metric)
    print(md)
    return {"versus.md": f"{header}\n\n{md}"}


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    uri = args.tracking_uri
    try:
        parent = find_parent(uri, args.run_id, args.sweep, args.experiment)
    except ValueError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    runs, skipped = child_runs(uri, parent)
    rows = [run_row(r) for r in runs]
    skipped_text = ", ".join(f"{n} {status}" for status, n in sorted(skipped.items())) or "none"
    header = (
        f"Sweep {parent.info.run_name!r} (MLflow run {parent.info.run_id}): "
        f"{len(rows)} finished child run(s); skipped {sum(skipped.values())} ({skipped_text})."
    )
    table = results.summarise(rows)
    files: dict[str, bytes | str] = {
        "summary.md": f"{header}\n\n{results.to_markdown(table)}",
        "summary.csv": results.to_csv(table),
    }
    print(header)
    print(results.to_markdown(table))
    if args.a:
        files.update(_paired(rows, args, header))
    if args.versus:
        files.update(_versus(rows, args, header))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    tracking.log_artifact_files(uri, parent.info.run_id, files, "report")
    print(f"wrote {', '.join(sorted(files))} to {out}/ and to run {parent.info.run_id} artifacts report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which sweep a launch runs: a new one, or the unfinished one ``--resume`` means.

Every sweep leaves a record beside its Tune folder, ``<storage>/.<name>.sweep.json``: its
resolved config, its MLflow parent run and its state (``running`` while a driver runs it or
after one was killed, ``interrupted`` after SIGINT/SIGTERM, ``failed``, ``finished``).

A new launch never writes into an earlier sweep's folder: a second ``quickstart`` is named
``quickstart-2``. ``--resume`` without a name continues the latest *unfinished* sweep of that
name family whose config is this launch's; ``--resume NAME`` continues NAME. Both refuse, before
Ray starts, when there is nothing to continue or when the config changed -- naming the keys and
their old and new values -- because a resumed sweep that silently trains another config would
mix two experiments under one parent run. Keys that only say *how* to run (``resources.*``, data
loading and encoding) may change between launches.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlprompt.orchestrator.schema import ConfigError

#: Keys that may differ between the launches of one sweep: how it runs, not what it computes.
MAY_CHANGE = (
    "sweep.name",
    "resources.",
    "tracking.retry_deadline_s",
    "tracking.request_timeout_s",
    "data.loader_workers",
    "data.encode_batch_size",
    "data.encode_actors",
    "data.features_planned",
)
UNFINISHED = ("running", "interrupted", "failed")


@dataclass
class SweepRecord:
    name: str
    config: dict[str, Any]  # the flattened, resolved config of the launch that created it
    parent_run_id: str
    state: str = "running"
    created: float = 0.0


def record_path(storage: Path, name: str) -> Path:
    return storage / f".{name}.sweep.json"


def read(storage: Path, name: str) -> SweepRecord | None:
    path = record_path(storage, name)
    if not path.exists():
        return None
    return SweepRecord(**json.loads(path.read_text()))


def write(storage: Path, record: SweepRecord) -> None:
    """Atomically (a reader never sees half a record)."""
    storage.mkdir(parents=True, exist_ok=True)
    path = record_path(storage, record.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1, default=str))
    tmp.replace(path)


def set_state(storage: Path, name: str, state: str) -> None:
    record = read(storage, name)
    if record is not None:
        record.state = state
        write(storage, record)


def new_record(name: str, config: dict[str, Any], parent_run_id: str) -> SweepRecord:
    return SweepRecord(name, config, parent_run_id, "running", time.time())


def family(storage: Path, base: str) -> list[SweepRecord]:
    """Every recorded sweep named ``base`` or ``base-N``, oldest first."""
    pattern = re.compile(rf"^\.({re.escape(base)}(?:-\d+)?)\.sweep\.json$")
    names = [m.group(1) for p in storage.glob(".*.sweep.json") if (m := pattern.match(p.name))]
    records = [r for n in names if (r := read(storage, n)) is not None]
    return sorted(records, key=lambda r: r.created)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every key (outside :data:`MAY_CHANGE`) whose value differs."""
    keys = sorted(set(old) | set(new))
    fixed = [k for k in keys if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in MAY_CHANGE)]
    missing = object()
    return [
        f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}"
        for k in fixed
        if old.get(k, missing) != new.get(k, missing)
    ]


def fresh_name(storage: Path, base: str) -> str:
    """``base``, or ``base-N`` for the first N whose folder and record are free."""

    def taken(name: str) -> bool:
        return (storage / name).exists() or record_path(storage, name).exists()

    if not taken(base):
        return base
    n = 2
    while taken(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def resume_target(storage: Path, base: str, config: dict[str, Any], named: str | None) -> SweepRecord:
    """The sweep ``--resume`` continues: ``named``, else the latest unfinished one of ``base``'s
    family with this config. Raises :class:`ConfigError` saying why there is none."""
    if named:
        record = read(storage, named)
        if record is None:
            raise ConfigError(f"--resume {named}: no sweep {named!r} in {storage}{_listing(storage, base)}")
        _same_config(record, config)
        return record
    records = family(storage, base)
    unfinished = [r for r in records if r.state in UNFINISHED]
    matching = [r for r in unfinished if not changed_keys(r.config, config)]
    if matching:
        return matching[-1]
    if unfinished:
        _same_config(unfinished[-1], config)  # raises, naming the keys
    if records:
        done = ", ".join(r.name for r in records)
        raise ConfigError(
            f"--resume: every sweep {base!r} in {storage} has finished ({done}); nothing to resume. "
            "Run without --resume to start a new one, or name one with --resume NAME"
        )
    raise ConfigError(f"--resume: no sweep {base!r} in {storage} to resume; run without --resume to start it")


def _same_config(record: SweepRecord, config: dict[str, Any]) -> None:
    changed = changed_keys(record.config, config)
    if changed:
        raise ConfigError(
            f"--resume {record.name}: the config changed since the sweep started ({'; '.join(changed)}). "
            "Resume with the original config, or run without --resume to start a new sweep"
        )


def _listing(storage: Path, base: str) -> str:
    records = family(storage, base)
    if not records:
        return ""
    return "; sweeps there: " + ", ".join(f"{r.name} ({r.state})" for r in records)

"""MLflow tracking: one parent run per sweep, one child run per trial.

Everything goes through an explicit ``MlflowClient(tracking_uri)`` and run ids, never
through ``mlflow``'s process-global active run or ``set_experiment`` (which exports
``MLFLOW_EXPERIMENT_ID`` and silently redirects runs made elsewhere in the process).

Who talks to MLflow: the sweep driver (parent run), the Tune trial function (creates
the child run, and marks it FINISHED or FAILED whatever happened to its workers), and
rank 0 of the Train workers (params, metrics, artifacts). Other ranks never do.

None of them dies because the server blinked: writes retry with backoff and, past
``tracking.retry_deadline_s``, go to a local spool that is replayed when the server answers;
calls that need an answer (a new run's id, searches) retry up to the deadline, then raise
:class:`~vlprompt.orchestrator.spool.TrackingUnavailable` (``orchestrator/spool.py`` explains
what is retried, where the spool lives and how it is replayed). Each process calls
:func:`configure` with its config once, before it tracks anything.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
import traceback
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from vlprompt.orchestrator import spool
from vlprompt.orchestrator.spool import client  # public here too: tracking.client(uri)

PARENT_TAG = "mlflow.parentRunId"
SPOOL_FOLDER = "tracking-spool"  # under the sweep's own folder, unless tracking.spool_dir says where
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def configure(cfg: Mapping[str, Any]) -> None:
    """This process's retry deadline, request timeout and spool folder, from an experiment
    config (an OmegaConf one or its plain dict: the sweep driver, a trial, a Train worker)."""
    section = cfg.get("tracking") or {}
    spool.configure(
        retry_deadline_s=section.get("retry_deadline_s"),
        request_timeout_s=section.get("request_timeout_s"),
        spool_dir=spool_dir(cfg),
    )


def spool_dir(cfg: Mapping[str, Any]) -> Path | None:
    """``tracking.spool_dir``, else ``<sweep.storage_path>/<sweep name>/tracking-spool`` when that
    storage is a local folder (None otherwise: the spool's per-user default under the temp dir)."""
    configured = (cfg.get("tracking") or {}).get("spool_dir")
    if configured:
        return Path(configured)
    sweep = cfg.get("sweep") or {}
    storage, name = sweep.get("storage_path"), sweep.get("name") or cfg.get("name")
    if not storage or not name or "://" in str(storage):
        return None
    return Path(storage) / str(name) / SPOOL_FOLDER


def ensure_experiment(uri: str, name: str) -> str:
    """Create (once, in the driver) or find the experiment; returns its id.

    A fresh SQLite store migrates its schema on first use, and concurrent first writers
    race: doing it here, before any trial starts, avoids that.
    """
    c = client(uri)
    exp = spool.call(uri, f"get experiment {name!r}", lambda: c.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    location = _artifact_location(uri, name)
    return spool.call(
        uri, f"create experiment {name!r}", lambda: c.create_experiment(name, artifact_location=location)
    )


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file.

    MLflow's default is ``./mlruns`` relative to whichever process creates the experiment,
    which scatters artifacts over launch directories; a server decides for itself (None).
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / name).as_uri()


def start_run(
    uri: str,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    c = client(uri)
    run = spool.call(
        uri, f"create run {name!r}", lambda: c.create_run(experiment_id, tags=all_tags, run_name=name)
    )
    return run.info.run_id


def finish_run(uri: str, run_id: str, error: BaseException | str | None = None) -> None:
    """End a run FINISHED, or FAILED with the error message as a tag and ``error.txt``.

    The status is written last (and spooled behind the rest when the server is down), so a
    replayed run is never terminal without its error."""
    if error is None:
        _terminate(uri, run_id, RunStatus.FINISHED)
        return
    if isinstance(error, BaseException):
        text = "".join(traceback.format_exception(error))
        message = f"{type(error).__name__}: {error}"
    else:
        text = message = error
    try:
        set_tags(uri, run_id, {"error": message[:5000]})
        log_artifact_files(uri, run_id, {"error.txt": text}, "")
    finally:
        _terminate(uri, run_id, RunStatus.FAILED)


def _terminate(uri: str, run_id: str, status: int) -> None:
    end_time = int(time.time() * 1000)  # when it ended, not when a replay sent it
    entry = {"op": "set_terminated", "status": RunStatus.to_string(status), "end_time": end_time}
    spool.write(uri, {**entry, "run_id": run_id})


def fail_unfinished_children(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    reason: BaseException | str,
    trial_id: str | None = None,
) -> int:
    """Mark children still RUNNING (their process died before it could) as FAILED.

    ``trial_id``: only that trial's children (a trial cleaning up after its own Train run).
    """
    runs = running_children(uri, experiment_id, parent_run_id, trial_id)
    for run in runs:
        finish_run(uri, run.info.run_id, reason)
    return len(runs)


def running_children(
    uri: str, experiment_id: str, parent_run_id: str, trial_id: str | None = None
) -> list[Any]:
    """The sweep's child runs still RUNNING (``trial_id``: only that trial's)."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    if trial_id is not None:
        query += f" and tags.trial_id = '{trial_id}'"
    return children(uri, experiment_id, query)


def children(uri: str, experiment_id: str, query: str) -> list[Any]:
    """Every run matching ``query`` (all pages), writes spooled for ``uri`` included (sent first)."""
    return spool.read(uri, f"search runs {query!r}", lambda: _search(uri, experiment_id, query))


def _search(uri: str, experiment_id: str, query: str) -> list[Any]:
    c, runs, token = client(uri), [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def sweep_children(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    return children(uri, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    _log_batch(uri, run_id, "tags", [[k, str(v)] for k, v in tags.items()])


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log a flat mapping as params (values stringified, in batches of 100).

    Logging a param again with the same value is accepted by MLflow (params are immutable: a
    different value is an INVALID_PARAMETER error, raised at once), so a replay may repeat it."""
    _log_batch(uri, run_id, "params", [[k, _param_value(v)] for k, v in sorted(params.items())])


def _log_batch(uri: str, run_id: str, kind: str, items: list[list[Any]]) -> None:
    """``log_batch`` of one kind of item, in MLflow's batch limits, each batch sent or spooled."""
    size = _BATCH[kind]
    for i in range(0, len(items), size):
        spool.write(uri, {"op": "log_batch", "run_id": run_id, kind: items[i : i + size]})


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """One timestamp for the batch, taken now: a replayed metric keeps when it was logged."""
    now = int(time.time() * 1000)
    _log_batch(uri, run_id, "metrics", [[k, float(v), now, step or 0] for k, v in metrics.items()])


def log_artifact_files(uri: str, run_id: str, files: Mapping[str, bytes | str], artifact_path: str) -> None:
    """Write ``{file name: content}`` to a temp folder and log it under ``artifact_path``
    (or copy it into the spool while the server is down)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            target = Path(tmp) / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        entry = {"op": "log_artifacts", "run_id": run_id, "local_dir": tmp, "artifact_path": artifact_path}
        spool.write(uri, entry)


@cache
def code_version() -> dict[str, str]:
    """Package version, git commit (when the source is a checkout) and a hash of the source.

    ``ray job submit`` uploads the working directory without ``.git``, so the source
    hash is what identifies the code in every case.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("vlprompt")
    except PackageNotFoundError:
        pkg = "unknown"
    digest = hashlib.sha256()
    for folder in ("methods", "datasets", "orchestrator", "experiments"):
        for path in sorted((_SOURCE_ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".yaml", ".json"} and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(_SOURCE_ROOT)).encode())
                digest.update(path.read_bytes())
    info = {"vlprompt_version": pkg, "source_sha256": digest.hexdigest()[:16]}
    try:
        commit = subprocess.run(
            ["git", "-C", str(_SOURCE_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_SOURCE_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    return info


# ------------------------------------------------------------------ runs that outlive a process


def open_child_run(
    uri: str, experiment_id: str, parent_run_id: str, name: str, tags: Mapping[str, str]
) -> tuple[str, int]:
    """The configuration's child run: its existing one, reopened, or a new one; returns
    ``(run_id, restarts)``.

    A configuration keeps one child run whatever happens to the processes running it: a
    restarted Train worker group, a retried Tune trial and a resumed driver all find the run by
    its ``config_digest`` under the sweep's parent run and set it RUNNING again, counting the
    restart (tag and metric ``restarts``). The error of the attempt that died moves to
    ``previous_error``, so a run that then finishes does not read as failed.
    """
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.config_digest = '{tags['config_digest']}'"
    earlier = sorted(children(uri, experiment_id, query), key=lambda r: r.info.start_time or 0)
    if not earlier:
        return start_run(uri, experiment_id, name, tags, parent_run_id), 0
    run = earlier[-1]
    run_id, restarts = run.info.run_id, int(run.data.tags.get("restarts", "0")) + 1
    reopen_run(uri, run_id)
    set_tags(uri, run_id, {"restarts": str(restarts)})
    log_metrics(uri, run_id, {"restarts": restarts})
    return run_id, restarts


def reopen_run(uri: str, run_id: str) -> dict[str, str]:
    """Set an ended run RUNNING again; returns its tags. What an earlier attempt left that would
    misdescribe the new one moves aside: ``error`` → ``previous_error``, ``stopped`` → ``previous_stop``."""
    c = client(uri)
    tags = spool.call(uri, f"get run {run_id}", lambda: c.get_run(run_id).data.tags)
    running = RunStatus.to_string(RunStatus.RUNNING)
    spool.call(uri, f"reopen run {run_id}", lambda: c.update_run(run_id, status=running))
    _move_tag(uri, run_id, tags, "error", "previous_error")
    _move_tag(uri, run_id, tags, "stopped", "previous_stop")
    return tags


def _move_tag(uri: str, run_id: str, tags: Mapping[str, str], key: str, moved: str) -> None:
    """Keep an earlier attempt's ``key`` tag as ``moved``, so it no longer describes the run."""
    if key in tags:
        set_tags(uri, run_id, {moved: tags[key]})
        spool.call(uri, f"delete tag {key} of {run_id}", lambda: client(uri).delete_tag(run_id, key))


def get_run(uri: str, run_id: str) -> Any:
    """The MLflow run ``run_id`` (info, params, metrics, tags); ``ValueError`` naming the id and
    the store when the server answers that there is no such run."""
    try:
        return spool.call(uri, f"get run {run_id}", lambda: client(uri).get_run(run_id))
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ValueError(
                f"no MLflow run {run_id!r} at {uri} (check --run-id and --tracking-uri)"
            ) from None
        raise


def artifact_paths(uri: str, run_id: str, folder: str) -> list[str]:
    """The paths of the artifacts directly under ``folder`` of a run (``learned/learned_state.pt``)."""
    found = spool.call(
        uri, f"list artifacts {folder} of {run_id}", lambda: client(uri).list_artifacts(run_id, folder)
    )
    return [a.path for a in found]


def read_artifact(uri: str, run_id: str, path: str) -> bytes:
    """The bytes of one artifact of a run (downloaded to a temporary folder, read, removed)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = spool.call(
            uri, f"download {path} of {run_id}", lambda: client(uri).download_artifacts(run_id, path, tmp)
        )
        return Path(local).read_bytes()


def logged_params(uri: str, run_id: str) -> set[str]:
    """The param keys a run holds already (MLflow params cannot be logged twice differently)."""
    return set(spool.call(uri, f"get run {run_id}", lambda: client(uri).get_run(run_id).data.params))


def kill_run(uri: str, run_id: str, reason: str) -> None:
    """End a run KILLED (stopped from outside: a signal, an early-stopping scheduler), not FAILED."""
    tags = spool.call(uri, f"get run {run_id}", lambda: client(uri).get_run(run_id).data.tags)
    _move_tag(uri, run_id, tags, "error", "previous_error")  # what its dying processes said
    set_tags(uri, run_id, {"stopped": reason[:5000]})
    _terminate(uri, run_id, RunStatus.KILLED)


def kill_unfinished_children(uri: str, experiment_id: str, parent_run_id: str, reason: str) -> int:
    """Every child of the sweep that did not finish and is still RUNNING ends KILLED."""
    runs = running_children(uri, experiment_id, parent_run_id)
    for run in runs:
        kill_run(uri, run.info.run_id, reason)
    return len(runs)


def launch_number(uri: str, parent_run_id: str) -> int:
    """Which launch of the sweep this is (1, then +1 per ``--resume``): the parent's ``launch`` tag."""
    tags = spool.call(uri, f"get run {parent_run_id}", lambda: client(uri).get_run(parent_run_id).data.tags)
    return int(tags.get("launch", "1"))


def digest_states(uri: str, experiment_id: str, parent_run_id: str, launch: int) -> dict[str, str]:
    """``config_digest`` → ``finished`` (a FINISHED child run), ``failed`` (its run raised in
    launch ``launch``) or ``open`` (anything else: still to run, or to run again)."""
    states: dict[str, str] = {}
    for run in sweep_children(uri, experiment_id, parent_run_id):
        digest = run.data.tags.get("config_digest")
        if digest is None or states.get(digest) == "finished":
            continue
        if run.info.status == "FINISHED":
            states[digest] = "finished"
        elif run.info.status == "FAILED" and run.data.tags.get("failed_launch") == str(launch):
            states[digest] = "failed"
        else:
            states.setdefault(digest, "open")
    return states

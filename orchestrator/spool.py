"""The link to MLflow: retries with backoff, a local spool past a deadline, and its replay.

A tracking server that blinks (restarting, a network hiccup, overloaded) must not kill a trial
or a sweep, nor lose what they logged. Every call of ``orchestrator/tracking.py`` goes through
here. Decisions, and why:

**What is retried.** Only failures that say "the server did not answer": connection refused or
reset, timeouts, HTTP 5xx, 408 and 429 -- an ``MlflowException`` whose error code maps to those
(MLflow wraps connection errors as INTERNAL_ERROR, a 500), or a ``requests``/socket error in the
exception's chain. A 4xx saying the request is wrong (RESOURCE_DOES_NOT_EXIST,
INVALID_PARAMETER, ...) raises at once: no retry can fix it. Backoff is exponential from 0.5 s,
capped at 8 s, with "equal jitter" (half of each wait random) so the trials of a sweep don't
hit a restarting server in lock-step; one call retries for at most ``tracking.retry_deadline_s``.
MLflow's own HTTP retries are turned off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``: its default of 7
retries with backoff factor 2 waits minutes per request) and one request waits at most
``tracking.request_timeout_s`` (``MLFLOW_HTTP_REQUEST_TIMEOUT``), so an attempt fails fast while
the server is down and the deadline is ours. Values the user exported are left alone.

**Past the deadline, writes are spooled** -- metrics, params and tags (one ``log_batch``),
``set_terminated``, artifacts -- to an append-only spool on local disk: JSON lines, one file per
process and run (``<run id>.<host>-<pid>.jsonl``), artifact files copied beside it
(``<same stem>.files/<seq>/``), in ``tracking.spool_dir`` or by default the sweep's own storage
(``<sweep.storage_path>/<sweep name>/tracking-spool``). Each line is written under an ``flock``
and fsynced. The process then takes the server for down: later writes go straight to the spool
(none waits out the deadline again), except one probe every ``PROBE_INTERVAL_S`` that tries to
replay and, if that works, writes directly again.

**Order is kept.** A file's entries replay in the order they were written, and once this process
has spooled anything for a server, its later writes queue behind it (they are spooled unless the
replay of everything pending succeeds first), so a run's FINISHED is never replayed before the
metrics logged before it. Order across processes is not defined (a Train worker and its trial
write different things; MLflow accepts metrics on a terminated run).

**Replay** happens (1) in the writing process, on its next write once the server answers;
(2) with every search (``tracking.children``): once the server answers it, every file of the
spool folder written for that server is sent and, if anything was, the search is asked again --
so the sweep driver's final reads replay every file of the sweep (on its node), and a trial
deciding what finished sees a FINISHED that a worker spooled; (3) at exit, a process with
spooled writes tries once more; (4) by hand: ``python -m vlprompt.orchestrator.spool replay DIR
[--uri URI]``. Replay is idempotent: every replayed entry gets a ``{"done": seq}`` line. A crash
between an entry's replay and its mark replays it once more, which MLflow takes without harm (a
param with the same value is accepted; a metric with the same key, step, timestamp and value is
deduplicated; the same terminal status; artifact files overwritten). An entry MLflow rejects with
a 4xx (its run deleted, a param changed) is marked done with the error and reported, so it
cannot block the entries after it.

**Calls that need an answer cannot be spooled** (creating a run returns its id; searches;
experiments): they retry up to the deadline, then raise :class:`TrackingUnavailable`, which names
the URI, the spool folder and what to do.

**Stderr**: one line when a server stops answering, one per spool file an outage starts, one when
it answers again and one per replay -- never one per write.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

T = TypeVar("T")

PROBE_INTERVAL_S = 5.0  # while a server is down: how often a write tries it again
EXIT_DEADLINE_S = 10.0  # a process exiting with spooled writes waits this long for the server
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 8.0
#: MLflow's own HTTP retry settings, turned off so that an attempt fails fast (see above).
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_TRANSIENT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    ConnectionError,
    TimeoutError,
)
_TRANSIENT_STATUS = {408, 429}


@dataclass
class Settings:
    retry_deadline_s: float = 90.0
    request_timeout_s: float = 30.0
    spool_dir: Path | None = None  # None: a per-user folder under the temp dir


_settings = Settings()
_exported: set[str] = set()  # the MLFLOW_HTTP_* variables this module set (the others are the user's)
_lock = threading.RLock()  # one write, replay or spool append at a time in this process


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer a call that needs an answer within the deadline."""

    def __init__(self, uri: str, what: str, waited_s: float, error: BaseException) -> None:
        folder = spool_folder()
        super().__init__(
            f"MLflow at {uri} did not answer ({what}) for {waited_s:.0f} s; last error: {_short(error)}. "
            "Start or restore the tracking server (or point tracking.uri at one that runs); "
            "tracking.retry_deadline_s sets how long a call waits. Writes that could not be sent are "
            f"spooled under {folder}: `python -m vlprompt.orchestrator.spool replay {folder}` sends them."
        )
        self.uri, self.waited_s = uri, waited_s


# ---------------------------------------------------------------------------------- settings


def configure(
    retry_deadline_s: float | None = None,
    request_timeout_s: float | None = None,
    spool_dir: str | Path | None = None,
) -> Settings:
    """Set this process's deadline, request timeout and spool folder (None: keep the current one)."""
    with _lock:
        if retry_deadline_s is not None:
            _settings.retry_deadline_s = float(retry_deadline_s)
        if request_timeout_s is not None:
            _settings.request_timeout_s = float(request_timeout_s)
        if spool_dir is not None:
            _settings.spool_dir = Path(spool_dir)
        _tune_mlflow_http()
        return _settings


def settings() -> Settings:
    return _settings


def spool_folder() -> Path:
    if _settings.spool_dir is not None:
        return _settings.spool_dir
    return Path(tempfile.gettempdir()) / f"vlprompt-tracking-spool-{os.getuid()}"


def _tune_mlflow_http() -> None:
    """MLflow reads these per request: no retries of its own, a timeout of ours (unless exported)."""
    wanted = {
        **_HTTP_DEFAULTS,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(_settings.request_timeout_s))),
    }
    for name, value in wanted.items():
        if name not in os.environ or name in _exported:
            os.environ[name] = value
            _exported.add(name)


@cache
def client(uri: str) -> MlflowClient:
    """One client per tracking URI and process, reused: creating one initialises its store
    (for SQLite, an SQLAlchemy engine and a schema check), which costs more than most calls."""
    _tune_mlflow_http()
    return MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------------- what is retried


def transient(err: BaseException) -> bool:
    """True when ``err`` says the server did not answer (retry); False when it answered no."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _TRANSIENT_ERRORS):
            return True
        if isinstance(current, requests.exceptions.HTTPError) and current.response is not None:
            return _transient_status(current.response.status_code)
        if isinstance(current, MlflowException):
            return _transient_status(current.get_http_status_code())
        current = current.__cause__ or current.__context__
    return False


def _transient_status(status: int) -> bool:
    return status >= 500 or status in _TRANSIENT_STATUS


def _backoff(attempt: int) -> float:
    """Exponential with equal jitter: half of the wait fixed, half random."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _short(err: BaseException) -> str:
    """One line: the socket error when there is one ("[Errno 111] Connection refused"), else the
    message's first line (MLflow's wrap of a connection error runs to several hundred characters)."""
    text = str(err).strip()
    errno = re.search(r"\[Errno -?\d+\][^'\"()\]]*", text)
    if errno:
        return f"{type(err).__name__}: {errno.group(0).strip()}"
    lines = text.splitlines() or [type(err).__name__]
    return lines[0][:300]


# ----------------------------------------------------------------------- up / down, per URI


@dataclass
class _Link:
    down_since: float | None = None  # time.monotonic() of the first failure; None: answering
    next_probe: float = 0.0  # while down: when a write may try the server again


_links: dict[str, _Link] = {}


def _link(uri: str) -> _Link:
    return _links.setdefault(uri, _Link())


def _went_down(uri: str, err: BaseException) -> None:
    link = _link(uri)
    if link.down_since is None:
        link.down_since = time.monotonic()
        _say(
            f"MLflow at {uri} is not answering ({_short(err)}); retrying each call for up to "
            f"{_settings.retry_deadline_s:.0f} s, then spooling writes under {spool_folder()}"
        )


def _came_up(uri: str) -> None:
    link = _link(uri)
    if link.down_since is not None:
        _say(f"MLflow at {uri} answers again (after {time.monotonic() - link.down_since:.0f} s)")
        link.down_since = None


def _say(message: str) -> None:
    print(f"[vlprompt] tracking: {message}", file=sys.stderr, flush=True)


def call(uri: str, what: str, fn: Callable[[], T], deadline_s: float | None = None) -> T:
    """``fn()`` retried with backoff while the server does not answer, for up to ``deadline_s``
    (default: the configured deadline; 0: one attempt). Raises :class:`TrackingUnavailable`
    past it, and any answer that is an error (a 4xx) at once."""
    deadline = _settings.retry_deadline_s if deadline_s is None else deadline_s
    started, attempt = time.monotonic(), 0
    while True:
        try:
            result = fn()
        except Exception as err:
            if not transient(err):
                raise
            _went_down(uri, err)
            waited = time.monotonic() - started
            if waited >= deadline:
                raise TrackingUnavailable(uri, what, waited, err) from err
            time.sleep(min(_backoff(attempt), deadline - waited))
            attempt += 1
        else:
            _came_up(uri)
            return result


# --------------------------------------------------------------------------------- entries


def apply(mlflow: MlflowClient, entry: dict[str, Any], base: Path | None = None) -> None:
    """Send one write. ``base``: the spool folder its artifact files were copied to."""
    op, run_id = entry["op"], entry["run_id"]
    if op == "log_batch":
        mlflow.log_batch(
            run_id,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in entry.get("metrics", [])],
            params=[Param(k, v) for k, v in entry.get("params", [])],
            tags=[RunTag(k, v) for k, v in entry.get("tags", [])],
        )
    elif op == "set_terminated":
        mlflow.set_terminated(run_id, entry["status"], end_time=entry["end_time"])
    elif op == "log_artifacts":
        local = entry["local_dir"] if "local_dir" in entry else str((base or Path()) / entry["files"])
        mlflow.log_artifacts(run_id, local, entry["artifact_path"])
    else:
        raise ValueError(f"unknown spool entry {op!r}")


def write(uri: str, entry: dict[str, Any]) -> bool:
    """Send a write now -- after this process's spooled writes -- or spool it; True if sent.

    While the server is known to be down, a write waits for nothing: it is spooled, except one
    probe per ``PROBE_INTERVAL_S``, which replays what is pending and then sends it (one attempt).
    """
    with _lock:
        link = _link(uri)
        if link.down_since is not None and time.monotonic() < link.next_probe:
            _spool(uri, entry)
            return False
        deadline = 0.0 if link.down_since is not None else None
        try:
            _replay_own(uri, deadline)
            call(uri, entry["op"], lambda: apply(client(uri), entry), deadline)
        except TrackingUnavailable:
            link.next_probe = time.monotonic() + PROBE_INTERVAL_S
            _spool(uri, entry)
            return False
        return True


# ---------------------------------------------------------------------------------- spool files


_own: dict[str, dict[Path, bool]] = {}  # URI → this process's spool files → may hold pending entries
_next_seq: dict[Path, int] = {}  # this process's spool files → the seq of their next entry


def _spool_path(run_id: str) -> Path:
    return spool_folder() / f"{run_id}.{socket.gethostname()}-{os.getpid()}.jsonl"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The spool file open for appending, under an exclusive ``flock`` (writers and replayers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _append(fd: int, record: dict[str, Any]) -> None:
    """One JSON line, durable before we go on; a torn last line (a crash mid-write) is closed first."""
    size = os.fstat(fd).st_size
    prefix = b""
    if size and os.pread(fd, 1, size - 1) != b"\n":
        prefix = b"\n"
    os.write(fd, prefix + json.dumps(record).encode() + b"\n")
    os.fsync(fd)


def _records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                records.append(json.loads(line))
    return records


def pending(path: Path) -> list[dict[str, Any]]:
    """The entries of a spool file not yet replayed, in the order they were written."""
    records = _records(path)
    done = {r["done"] for r in records if "done" in r}
    return [r for r in records if "op" in r and r["seq"] not in done]


def _spool(uri: str, entry: dict[str, Any]) -> Path:
    """Append ``entry`` to its run's spool file (artifact files copied beside it)."""
    path = _spool_path(entry["run_id"])
    with _locked(path) as fd:
        seq = _next_seq.get(path)
        if seq is None:  # only this process appends entries to its files; others only mark them
            seq = sum(1 for r in _records(path) if "op" in r)
        record = {**entry, "seq": seq, "uri": uri, "at": time.time()}
        if "local_dir" in record:
            files = f"{path.stem}.files/{seq}"
            shutil.copytree(record.pop("local_dir"), path.parent / files, dirs_exist_ok=True)
            record["files"] = files
        _append(fd, record)
        _next_seq[path] = seq + 1
    files = _own.setdefault(uri, {})
    if not files.get(path):
        _say(
            f"MLflow at {uri} still not answering: writes of run {entry['run_id']} are spooled to "
            f"{path}; they are sent when it answers (by hand: "
            f"python -m vlprompt.orchestrator.spool replay {path.parent})"
        )
    _register_exit_flush()
    files[path] = True
    return path


@cache
def _register_exit_flush() -> None:
    """Once per process, when it first spools."""
    atexit.register(_flush_at_exit)


def _flush_at_exit() -> None:
    """A process leaving with spooled writes tries to send them: once if its server is known to
    be down, else retrying for up to ``EXIT_DEADLINE_S``; what is left, it says where."""
    for uri, files in list(_own.items()):
        if not any(files.values()):
            continue
        down = _link(uri).down_since is not None
        try:
            _replay_own(uri, 0.0 if down else min(_settings.retry_deadline_s, EXIT_DEADLINE_S))
        except TrackingUnavailable:
            for folder in sorted({p.parent for p, dirty in files.items() if dirty}):
                _say(
                    f"exiting with writes for {uri} still spooled; send them with: "
                    f"python -m vlprompt.orchestrator.spool replay {folder}"
                )


# ------------------------------------------------------------------------------------ replay


@dataclass
class Replayed:
    sent: int = 0
    rejected: int = 0
    left: int = 0  # still pending: the server stopped answering
    files: int = 0
    error: TrackingUnavailable | None = None  # why some are left

    def add(self, other: Replayed) -> None:
        self.sent += other.sent
        self.rejected += other.rejected
        self.left += other.left
        self.files += other.files
        self.error = self.error or other.error


def replay_file(path: Path, uri: str | None = None, deadline_s: float | None = None) -> Replayed:
    """Send a spool file's pending entries in order, each marked done once sent (or rejected).

    ``uri``: send to this server instead of the one each entry names. When the server stops
    answering, the rest stays pending (``left``, ``error``).
    """
    out = Replayed(files=1)
    with _lock, _locked(path) as fd:
        todo = pending(path)
        for i, entry in enumerate(todo):
            target = uri or entry["uri"]
            try:
                send = partial(apply, client(target), entry, path.parent)
                call(target, f"replay {entry['op']}", send, deadline_s)
            except TrackingUnavailable as err:
                out.left, out.error = len(todo) - i, err
                break
            except Exception as err:  # an answer: MLflow will never take this entry
                _append(fd, {"done": entry["seq"], "rejected": _short(err)})
                _say(f"{path.name}: entry {entry['seq']} ({entry['op']}) rejected by {target}: {_short(err)}")
                out.rejected += 1
            else:
                _append(fd, {"done": entry["seq"]})
                out.sent += 1
    return out


def replay_folder(
    folder: Path, uri: str | None = None, deadline_s: float | None = None, only_uri: str | None = None
) -> Replayed:
    """Replay every spool file under ``folder`` (``only_uri``: only files written for that server).

    Stops at the first file whose server stops answering (the rest would wait for it too).
    """
    total = Replayed()
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        todo = pending(path)
        if not todo or (only_uri is not None and todo[0]["uri"] != only_uri):
            continue
        total.add(replay_file(path, uri, deadline_s))
        if total.left:
            break
    if total.sent or total.rejected:
        _say(
            f"replayed {total.sent} spooled write(s) from {total.files} file(s) in {folder}"
            + (f"; {total.rejected} rejected" if total.rejected else "")
            + (f"; {total.left} still pending (server not answering)" if total.left else "")
        )
    return total


def _replay_own(uri: str, deadline_s: float | None) -> None:
    """Replay this process's spool files for ``uri`` (before a new write, to keep the order);
    raises :class:`TrackingUnavailable` if the server stops answering meanwhile."""
    files, done = _own.get(uri, {}), Replayed()
    for path in [p for p, dirty in files.items() if dirty]:
        done.add(replay_file(path, None, deadline_s))
        if done.left:
            break
        files[path] = False
    if done.sent:
        _say(f"replayed {done.sent} spooled write(s) to {uri}" + (f"; {done.left} left" if done.left else ""))
    if done.error is not None:
        raise done.error


def read(uri: str, what: str, fn: Callable[[], T]) -> T:
    """A search whose answer includes what the spool folder holds for ``uri``: asked (retried up
    to the deadline), then, if replaying the spool sent anything -- a FINISHED a worker could
    not send, say -- asked again."""
    answer = call(uri, what, fn)
    with _lock:
        if not replay_folder(spool_folder(), deadline_s=0.0, only_uri=uri).sent:
            return answer
    return call(uri, what, fn)


# ---------------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    """``replay DIR``: send a spool folder's pending writes; exit 1 if anything is left or rejected."""
    parser = argparse.ArgumentParser(prog="python -m vlprompt.orchestrator.spool", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="send the pending writes of a spool folder to MLflow")
    replay.add_argument("folder", type=Path, help="a tracking-spool folder (or one of its .jsonl files)")
    replay.add_argument("--uri", help="send to this tracking URI instead of the one each write names")
    replay.add_argument("--deadline-s", type=float, default=30.0, help="how long to wait for the server")
    args = parser.parse_args(argv)
    configure(retry_deadline_s=args.deadline_s)
    if args.folder.is_file():
        done = replay_file(args.folder, args.uri)
    else:
        done = replay_folder(args.folder, args.uri)
    if done.error is not None:
        print(f"error: {done.error}", file=sys.stderr)
    print(f"sent {done.sent}, rejected {done.rejected}, still pending {done.left} ({done.files} file(s))")
    return 0 if not (done.left or done.rejected) else 1


if __name__ == "__main__":
    sys.exit(main())

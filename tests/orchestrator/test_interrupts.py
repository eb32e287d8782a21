"""SIGINT and SIGTERM become Tune's graceful stop (SIGUSR1); a second one stops at once.

Real signals sent to this process. Tune's own SIGUSR1 handler is stood in for by one that
records the stop (a real sweep stopped by SIGINT: ``test_faults.py``).
"""

from __future__ import annotations

import os
import signal

import pytest

from vlprompt.orchestrator.interrupts import graceful_stop


@pytest.fixture
def tune_listening():
    """What Tune's loop installs while it runs: a SIGUSR1 handler that asks it to stop."""
    stops = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: stops.append("stop"))
    yield stops
    signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_asks_tune_to_stop_and_is_remembered(tune_listening, sig):
    with graceful_stop() as interrupt:
        os.kill(os.getpid(), sig)
    assert tune_listening == ["stop"]
    assert interrupt.signal == sig and interrupt.exit_code == 128 + sig


def test_a_second_signal_stops_at_once(tune_listening):
    with pytest.raises(KeyboardInterrupt), graceful_stop() as interrupt:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert interrupt.name == "SIGTERM" and tune_listening == ["stop"]


def test_before_tune_listens_a_signal_stops_at_once():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt), graceful_stop():
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_handlers_before_are_put_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with graceful_stop():
        assert signal.getsignal(signal.SIGTERM) not in before
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize(
    ("detail", "stopped"),
    [
        ("Worker exit type: INTENDED_USER_EXIT Worker exit detail: exit_actor() called", True),
        # a stop between two configurations of a bundle
        ("The actor is dead because its owner has died. Owner Id: 01ab", True),
        # a controller killed on its own
        ("Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits", False),
    ],
)
def test_a_trial_leaves_to_the_driver_only_the_runs_a_stop_ended(detail, stopped):
    """A trial whose Train controller died because the sweep was stopped must not mark its runs
    FAILED (the driver ends them KILLED; a late FAILED overwrote that in a real run); a controller
    killed on its own is a failure the trial records."""
    from ray.exceptions import ActorDiedError

    from vlprompt.orchestrator.trial import stopped_by_tune

    err = ActorDiedError()
    err.error_msg = f"The actor died unexpectedly before finishing this task.\n{detail}"
    assert stopped_by_tune(err) is stopped
    assert not stopped_by_tune(RuntimeError(detail))  # only the controller's death counts

"""SIGINT and SIGTERM stop a sweep the way Ctrl+C stops Tune: gracefully, and resumably.

Tune stops its loop, saves the experiment state and ends the trials when it gets SIGINT -- but
it catches that signal itself, so the driver cannot tell a stopped sweep from a finished one,
and a SIGTERM (``kill``, a scheduler, ``ray job stop``) would end the driver on the spot. Inside
:func:`graceful_stop` both signals are recorded and passed on as SIGUSR1, which Tune always
treats as "stop the experiment" (``ray/tune/tune.py``, ``_setup_signal_catching``); a second
signal ends the driver at once (``KeyboardInterrupt``). After ``Tuner.fit`` returns, the
driver asks :attr:`Interrupt.signal` whether it was stopped, and ends the runs KILLED.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


@dataclass
class Interrupt:
    signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal."""
        return 128 + (self.signal or 0)


@contextmanager
def graceful_stop() -> Iterator[Interrupt]:
    """Within: the first SIGINT/SIGTERM asks Tune to stop; the second stops the driver."""
    interrupt = Interrupt()

    def handler(signum: int, frame: object) -> None:
        if interrupt.signal is not None:
            raise KeyboardInterrupt
        interrupt.signal = signum
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt  # Tune's loop is not running (yet): nothing to stop gracefully
        print(
            f"\n[vlprompt] {signal.Signals(signum).name}: stopping the sweep (its state is saved; "
            "continue with --resume). Send it again to stop at once.",
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    env = os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"  # Tune must not take SIGINT back from us
    try:
        yield interrupt
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if env is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = env

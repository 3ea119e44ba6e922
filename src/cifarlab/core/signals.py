"""Ctrl-C and SIGTERM as a stop request the training loop polls, instead of an exception that can
land anywhere (half-way through writing a file, inside a DataLoader's queue).

    with StopOnSignal() as stop:
        run_training(cfg, hooks=Hooks(should_stop=stop.should_stop))
    exit_code = stop.exit_code  # 130 after SIGINT, 143 after SIGTERM, None if no signal came

SIGUSR1 is SLURM's warning before a time limit (sbatch --signal=B:USR1@120, slurm.py): the same clean stop,
exit code 138, after which the job requeues itself and continues the run folder (--resume auto).

The engine checks `should_stop` after every step and ends the epoch there; the runner then keeps the
finished epochs' records and the last checkpoint. A second signal while stopping raises
KeyboardInterrupt at once (the user insists: abort hard; files are still written atomically) -- except
with insist=False, in torchrun's workers: there one stop reaches a worker twice (SLURM signals every process
of a step, and torchrun passes the signal on again), and the hard stop is torchrun's SIGKILL after its grace.
The previous handlers are restored on exit. A signal the parent process told us to ignore (a shell
starts background jobs with SIGINT ignored) stays ignored, as Python itself does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal:
    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, insist: bool = True) -> None:
        self.signals = signals
        self.insist = insist
        self.received: int | None = None  # the first signal number
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if not self.insist:
                return
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}) while stopping")
        self.received = signum

    def should_stop(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    @property
    def exit_code(self) -> int | None:
        """The shell convention 128 + signal number: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1."""
        return 128 + self.received if self.received is not None else None

    def __enter__(self) -> "StopOnSignal":
        # signal.signal only works in the main thread; elsewhere the caller keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.getsignal(sig)
                if previous == signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM raised as an exception (RaiseOnSignal): `finally` blocks run, so staging folders and
    temp files are removed. `kept`: what the command kept, for the one line cli.main prints."""

    def __init__(self, signum: int, kept: str = "nothing was written") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.kept = signum, kept

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RaiseOnSignal(StopOnSignal):
    """For commands with no loop to poll (export, infer-bench, doctor): the first SIGINT/SIGTERM raises
    Stopped where the program is (inside a torch call: as soon as it returns); later signals are ignored
    while the command cleans up, so a second Ctrl-C cannot leave a staging folder behind."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise Stopped(signum)


@contextlib.contextmanager
def signals_deferred(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a few renames that must happen all or not at all (publishing an export):
    a signal that arrives meanwhile is handled right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# A loader worker outlives a SIGTERM by at most this long. The main process, stopping cleanly after its current
# step, shuts its workers down well within it; a worker nobody shuts down -- e.g. when the main process exits
# after an exception and Python's exit handler terminate()s, then joins, its daemonic children -- still ends
# (ignoring SIGTERM outright made that join wait forever: 11 minutes until killed, in one case). Long, because a
# worker that ends while the main process still runs makes torch's SIGCHLD handler raise in the main process:
# a step that takes longer than this after the signal (a compile) fails instead of stopping cleanly.
WORKER_STOP_GRACE_S = 60


def ignore_stop_signals_in_worker(*_: Any) -> None:
    """For DataLoader worker processes: a terminal's Ctrl-C (or a supervisor's SIGTERM to the process
    group) reaches the workers too; if they died of it at once, the main process would fail with "DataLoader
    worker exited unexpectedly" instead of stopping cleanly. SIGINT is ignored (the main process shuts the
    workers down); SIGTERM ends the worker WORKER_STOP_GRACE_S seconds later unless it has ended by then.
    SIGUSR1 (a SLURM time-limit warning torchrun passes to the worker's whole session) is ignored like SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_after_grace)


def _end_after_grace(signum: int, frame: FrameType | None) -> None:
    signal.alarm(WORKER_STOP_GRACE_S)  # SIGALRM's default action ends the process

"""SIGINT, SIGTERM and SIGHUP: the first one stops the run (as KeyboardInterrupt does); cleanup then runs to the end
whatever else arrives, and critical sections (the final rename, the removal of a partial output) are never cut.

A Python signal handler that raises can land anywhere in the main thread: inside importlib's locking (an exception
there is swallowed and can leave an import lock held: a deadlock), between a mkdtemp and the assignment that records
it (a leftover). So the handler raises only inside ``interruptible()`` regions (the waits on the pipeline's threads,
where most of a merge's time is spent and where an exception is safe); elsewhere it records the signal, and the next
``poll()``, placed between the steps of a run, raises it.

One process-wide guard, because signal handlers are process-wide. A signal ignored when the run starts (``nohup``,
a background job's SIGINT) stays ignored. Exit codes follow the shell: 128 + signal number (SIGINT 130, SIGTERM
143, SIGHUP 129).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

# Ctrl-C, kill, a closed terminal; and the other signals whose default is to end the process (Ctrl-\\, kill -USR1,
# an alarm), which would otherwise leave a partial output behind.
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGALRM)


class Interrupted(KeyboardInterrupt):
    """A handled signal arrived. A KeyboardInterrupt, so every stage that stops on Ctrl-C stops on it too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SignalGuard:
    """Records the first handled signal and raises it once, as Interrupted, in the main thread: at once inside an
    ``interruptible()`` region, else at the next ``poll()`` or at the end of a ``critical()`` section (unless an
    error is already on its way). Later signals are recorded, never raised, so the cleanup that the first one
    started is not cut short."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.raised = False
        self._deferring = 0
        self._interruptible = 0
        self._previous: dict[int, object] = {}
        self._order: tuple[int, int] | None = None  # the wakeup pipe (read end, write end)
        self._previous_wakeup = -1
        self.completed_output: Path | None = None  # set once an output is in place: what an interrupt message says

    def install(self) -> None:
        """Handle the signals from now on (a second call while installed keeps what was recorded)."""
        if self._previous:
            return
        self.received, self.raised, self._deferring, self._interruptible = None, False, 0, 0
        self.completed_output = None
        self._order = None
        try:  # the C-level handler writes each signal's number here in arrival order (Python runs pending handlers
            # in signal-number order: SIGTERM then SIGINT 5 ms later would otherwise be reported as SIGINT)
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._order = (read_fd, write_fd)
        except (ValueError, OSError):  # not the main thread, or no pipes
            pass
        for signum in HANDLED:
            try:
                if signal.getsignal(signum) is signal.SIG_IGN:  # nohup, or a background job: stays ignored
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (gpumerge used as a library): leave signals to the caller
                return

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._order is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in self._order:
                os.close(fd)
            self._order = None

    def _first_arrived(self, signum: int) -> int:
        """The handled signal that arrived first, from the wakeup pipe (else the one being handled)."""
        if self._order is None:
            return signum
        try:
            arrived = os.read(self._order[0], 512)
        except (BlockingIOError, OSError):
            return signum
        return next((n for n in arrived if n in HANDLED and n in self._previous), signum)

    def swallow(self) -> None:
        """From now on every handled signal is recorded and ignored (the run is over; exit with its own code)."""
        self.raised = True

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = self._first_arrived(signum)
        if self._interruptible and not self._deferring:
            self.poll()

    def poll(self) -> None:
        """Raise the recorded signal, once, unless a critical section is running."""
        if self.received is not None and not self.raised and not self._deferring:
            self.raised = True
            raise Interrupted(self.received)

    @contextlib.contextmanager
    def interruptible(self):
        """A region where a signal is raised the moment it arrives (a wait on threads, nothing else)."""
        self.poll()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    @contextlib.contextmanager
    def critical(self):
        """Signals wait until the block ends; then the first one is raised, unless an error is already on its way."""
        self._deferring += 1
        saved, self._interruptible = self._interruptible, 0
        try:
            yield
        except BaseException:
            self._deferring -= 1
            self._interruptible = saved
            raise
        self._deferring -= 1
        self._interruptible = saved
        if self._previous:
            self.poll()


GUARD = SignalGuard()


def test_pause(point: str, cancelled=None) -> None:
    """Test hook: with GPUMERGE_TEST_PAUSE=FILE and GPUMERGE_TEST_PAUSE_AT=POINT[,POINT...] in the environment,
    reaching POINT writes FILE.POINT and waits until that file is removed (or ``cancelled()`` is true, or 60 s pass),
    so that a test can land signals while a tiny merge is really in flight. Points: ``write`` (the writer thread,
    after the first batch), ``finalize`` (just before the output is renamed into place), ``cleanup`` (while a failed
    or interrupted run removes its partial output), ``score`` (an evaluated sweep, after each row is logged),
    ``records`` (a sweep's new record files staged and their commit marker written, before they are renamed)."""
    base = os.environ.get("GPUMERGE_TEST_PAUSE")
    if not base or point not in os.environ.get("GPUMERGE_TEST_PAUSE_AT", "").split(","):
        return
    marker = Path(f"{base}.{point}")
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while marker.exists() and time.monotonic() < deadline and not (cancelled and cancelled()):
        time.sleep(0.005)

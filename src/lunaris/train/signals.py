"""Stopping cleanly on SIGTERM/SIGINT: finish the current step, save, exit 0; a second Ctrl-C aborts.

Cluster schedulers send SIGTERM before they kill a job, and users press Ctrl-C. Either only sets a flag here;
the trainer reads it once per step in the collective it already runs, so every rank stops after the same step.
"""

import signal
import sys
import threading


class StopSignals:
    """Installs the handlers while training runs (`with StopSignals(...) as stop:`); `stop.requested` is the flag."""

    def __init__(self, announce: bool = True):
        self.announce = announce      # print the "finishing the current step" line (rank 0 only)
        self.requested = False        # this process got SIGTERM/SIGINT (or request() was called)
        self.reason = None            # "SIGTERM", "SIGINT" or what request() was given
        self._old_handlers: dict = {}

    def request(self, reason: str = "request") -> None:
        """Finish the current step, save, and stop (what SIGTERM/SIGINT do)."""
        self.requested, self.reason = True, reason

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # second Ctrl-C: abort now (the last complete checkpoint stays)
        if not self.requested and self.announce:
            print(f"\n{name}: finishing the current step, saving a checkpoint, then exiting "
                  f"(Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)
        self.request(name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (training in a thread: no handlers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

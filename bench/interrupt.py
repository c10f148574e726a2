"""SIGTERM (how SLURM, systemd and ``kill`` stop a job) handled like Ctrl-C (docs/architecture.md).

Inside ``terminate_as_interrupt()`` a SIGTERM raises ``Terminated``, a ``KeyboardInterrupt``: every
``finally`` and ``except KeyboardInterrupt`` that cleans up after Ctrl-C runs for it too (the record
in hand is dropped, its claim released, results.csv and run.json written from what is done).
Further SIGTERMs while that cleanup runs are ignored, so a second signal cannot cut it short; the
CLI then exits with ``exit_code(err)``: 143 (128 + SIGTERM) or 130 for Ctrl-C.

Example:
    >>> with terminate_as_interrupt():
    ...     pass  # run the benchmark here
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, frame) -> None:
        if fired:  # cleanup after the first signal is under way: let it finish
            return
        fired.append(signum)
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(err: BaseException) -> int:
    """The shell's convention: 128 + the signal number (143 for SIGTERM), 130 for Ctrl-C."""
    return 128 + err.signum if isinstance(err, Terminated) else 130


def message(err: BaseException) -> str:
    """The one line the CLI prints for an interruption."""
    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
    return f"{what}: finished cells are kept in results.csv; rerun the same command to resume"

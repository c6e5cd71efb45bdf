"""Helper processes that end with the command that started them.

Python runs no cleanup when a process is ended by SIGTERM or SIGKILL, and the operating system hands its children
to another parent: a stopped ``compare-init`` would leave its pool workers fine-tuning on for an hour that nobody
reads, holding the cores of the next command. Two measures close that gap:

- :func:`exit_with_parent` in a child: a daemon thread that ends the child as soon as its parent is gone, however
  the parent ended (the pool workers of ``compare-init`` call it at start).
- :func:`sigterm_as_exit` around the work of a parent that owns subprocesses: SIGTERM becomes ``SystemExit``, so
  that the parent's ``finally`` blocks run and stop its children (``evidence`` stops its running stages that way).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType

#: Exit status of a process ended on SIGTERM, as a shell reports it.
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM


def exit_with_parent(poll_seconds: float = 1.0) -> threading.Thread:
    """Starts a daemon thread that ends this process (exit status 1, no cleanup) within ``poll_seconds`` of its
    parent's end, detected as a change of the parent process id. Returns the thread."""
    if poll_seconds <= 0:
        raise ValueError(f"poll_seconds must be positive, got {poll_seconds}")
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)  # the parent is gone: nothing is left to report to

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    sys.exit(SIGTERM_EXIT_STATUS)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``SystemExit`` in the main thread, so that ``finally`` blocks stop child
    processes; the previous handler is back after it. Enter it from the main thread (Python installs signal
    handlers only there)."""
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_processes(processes: Iterable[subprocess.Popen], grace_seconds: float = 10.0) -> None:
    """Sends SIGTERM to each ``subprocess.Popen`` still running, waits up to ``grace_seconds`` in all, then
    kills what is left."""
    alive = [process for process in processes if process.poll() is None]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in alive:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""Standard error with some lines dropped: for notices that libraries and the JVM print and no setting stops."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def lines_dropped(drop: Callable[[bytes], bool], wait: bool = True) -> Iterator[None]:
    """While inside, file descriptor 2 (where C libraries and child processes write, not only sys.stderr)
    is a pipe whose lines are passed on to the real stderr as they come, except those `drop` is true for.

    Processes started inside inherit the pipe and keep it after: `wait=False` leaves the forwarding to go
    on for as long as they run (a daemon thread); `wait=True` waits for the pipe's end (at most 10 s)."""
    sys.stderr.flush()
    try:
        original = os.dup(2)
        read, write = os.pipe()
    except OSError:  # no stderr to filter
        yield
        return
    os.dup2(write, 2)
    os.close(write)
    forwarder = threading.Thread(target=_forward, args=(read, original, drop), name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # this process's end of the pipe is closed: the forwarder stops at the last writer's
        if wait:
            forwarder.join(timeout=10)


def _forward(read: int, original: int, drop: Callable[[bytes], bool]) -> None:
    with open(read, "rb") as pipe:
        for line in pipe:
            if not drop(line):
                _write(original, line)
    os.close(original)


def _write(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:  # stderr is gone (a closed pipe): keep reading, so that no writer ever blocks on a full pipe
        pass

"""What must still happen when a capturing process ends in a way that skips `atexit`.

A multiprocessing child ends with `os._exit()`, and so do many forked children: `atexit` does not
run there, yet fd mode's pump may not have read the process's last output from its pipes yet,
and a child of a killed master is the only one left to remove the segment's name. Two ways in:
- `run_before_os_exit(callback)`: `os._exit` (patched once per process, only where fd mode
  needs it) runs the callbacks first, each bounded by its own timeout;
- `run_at_multiprocessing_child_exit(owner, callback)`: in every multiprocessing child started
  from this process (fork, or a forkserver forked from it), `callback(owner)` runs as a
  multiprocessing finalizer and once more as a threading at-exit call, which comes later: after
  `Process._bootstrap` printed the traceback of a target that raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import NoReturn, TypeVar

__all__ = ["forget_before_os_exit", "run_at_multiprocessing_child_exit", "run_before_os_exit"]

T = TypeVar("T")

_os_exit = os._exit
_before_os_exit: list[Callable[[], None]] = []


def _exit_after_callbacks(status: int) -> NoReturn:
    for callback in list(_before_os_exit):
        try:
            callback()
        except Exception:
            pass
    _os_exit(status)


def run_before_os_exit(callback: Callable[[], None]) -> None:
    """`os._exit()` in this process (and its forks) calls `callback()` first."""
    if callback not in _before_os_exit:
        _before_os_exit.append(callback)
    if os._exit is _os_exit:
        os._exit = _exit_after_callbacks


def forget_before_os_exit(callback: Callable[[], None]) -> None:
    try:
        _before_os_exit.remove(callback)
    except ValueError:
        pass


def run_at_multiprocessing_child_exit(owner: T, callback: Callable[[T], None],
                                      started: Callable[[T], None] | None = None) -> None:
    """In each multiprocessing child started from here, `callback(owner)` runs at its exit (see
    the module), and `started(owner)` first thing after its start. `owner` is held weakly here,
    as multiprocessing holds it."""
    import multiprocessing.util

    def child_started(owner: T) -> None:
        if started is not None:
            started(owner)

        def at_exit() -> None:
            callback(owner)

        multiprocessing.util.Finalize(None, at_exit, exitpriority=-100)
        register = getattr(threading, "_register_atexit", None)  # CPython 3.9+
        if register is not None:
            try:
                register(at_exit)
            except RuntimeError:  # the interpreter is already shutting down
                pass

    multiprocessing.util.register_after_fork(owner, child_started)

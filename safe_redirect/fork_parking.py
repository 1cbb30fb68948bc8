"""Our threads step aside while a single-threaded program forks.

`install()` starts a drain thread (and in fd mode a pump thread). Without this module every
`os.fork()` of a program that has no thread of its own would then happen in a multi-threaded
process: Python 3.12+ warns about it (`DeprecationWarning: This process ... is multi-threaded`),
and a child could inherit a lock one of our threads held. So before such a fork (Python's
`os.register_at_fork(before=...)`) each thread of ours is parked: asked to end at its next safe
point, its state kept in its object, and joined, bounded (`PARK_TIMEOUT`: a thread stuck in a
user's callback does not hold the fork up; it then stays, and the warning is true). After the
fork the parent starts them again.

When the warning counts threads matters. Since 3.14.1 (CPython gh-137109) `os.fork()` counts the
OS threads before the `after_in_parent` handlers run, so they may restart ours at once. 3.12,
3.13 and 3.14.0 count after those handlers: there the restart is queued with
`Py_AddPendingCall`, which the interpreter runs at its next check between bytecodes, right after
`os.fork()` has returned and warned or not.

A program with threads of its own (Python ones) gets the warning from Python anyway: our
threads are left running then. Forks made in C (no Python handlers) do not park anything: the
child has no thread of ours either way, as before.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

from safe_redirect.diagnostics import warn

__all__ = ["PARK_TIMEOUT", "Parkable", "ParkableThread", "register", "resume_now", "unregister"]

#: how long all of our threads together may take to park before a fork, seconds
PARK_TIMEOUT = 0.25
#: after the joins, how long to wait for the kernel to stop counting the ended threads
_OS_SETTLE = 0.02

# 3.12+ warns; 3.14.1+ counts the OS threads before the after_in_parent handlers
_WARNS = sys.version_info >= (3, 12)
_COUNTS_BEFORE_AFTER_HANDLERS = sys.version_info >= (3, 14, 1)


class Parkable(Protocol):
    """What owns a thread of ours: `park` ends it, state kept, `resume` starts a new one."""

    def park(self, deadline: float) -> bool:
        """End the thread by `deadline` (time.monotonic); True if it ended: resume() follows."""

    def resume(self) -> None:
        """Start the thread again after a park that returned True."""

    def parked_thread(self) -> threading.Thread | None:
        """The thread that park() would end, if it runs."""


class ParkableThread:
    """One daemon thread of an owner (the drain, an fd pump) and its side of the park handshake:
    the Parkable registered here while it runs. The thread calls `leaving_for_fork()` at each
    safe point, under `lock` (the owner's, which also guards whether it is stopping): there it
    learns whether to end for a fork. Whatever it needs to go on is the owner's, kept while it is
    parked; `resume()` starts a new thread on `target` and tells `restarted` its ident."""

    def __init__(self, name: str, target: Callable[[], None], lock: threading.Condition,
                 wake: Callable[[], None], stopping: Callable[[], bool],
                 restarted: Callable[[int], None] = lambda ident: None) -> None:
        self._name = name
        self._target = target
        self._lock = lock
        self._wake = wake  # have the thread come to its next safe point now
        self._stopping = stopping  # the owner's stop wins over a park
        self.restarted = restarted
        self.thread: threading.Thread | None = None
        self._parking = False  # a fork is about to happen: end at the next safe point
        self._left = False  # the thread ended for it (decided under the lock)

    def start(self) -> int:
        """Start the thread; it parks around every fork of this process from now on."""
        thread = self.thread = threading.Thread(target=self._target, name=self._name,
                                                daemon=True)
        thread.start()
        register(self)
        assert thread.ident is not None
        return thread.ident

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def leaving_for_fork(self) -> bool:
        """On the thread, at a safe point, under the owner's lock: True if it must end now."""
        if self._parking and not self._stopping():
            self._left = True
            return True
        return False

    def parked_thread(self) -> threading.Thread | None:
        thread = self.thread
        return thread if thread is not None and thread.is_alive() and not self._stopping() else None

    def park(self, deadline: float) -> bool:
        thread = self.parked_thread()
        if thread is None:
            return False
        with self._lock:
            self._parking, self._left = True, False
        self._wake()
        thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._parking = False
            left = self._left  # decided under the lock: it ends, or it goes on
        if left:
            thread.join(1.0)  # past its last safe point: only the thread's own exit is left
        return left

    def resume(self) -> None:
        self.restarted(self.start())


_registered: list[tuple[int, Parkable]] = []  # (pid that registered it, the owner)
_parked: list[Parkable] = []
_handlers_registered = False


def register(owner: Parkable) -> None:
    """Park `owner`'s thread around every fork of this process (not of its children)."""
    # Before-fork handlers run newest first, and logging's holds its module lock through the
    # fork: a callback on our drain that logs would wait for it while we wait for the drain.
    # Imported now, before our handler registers, logging's runs after our park.
    import logging  # noqa: F401

    global _handlers_registered
    if not _handlers_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _handlers_registered = True
    if owner not in _owners():
        _registered.append((os.getpid(), owner))


def unregister(owner: Parkable) -> None:
    _registered[:] = [(pid, o) for pid, o in _registered if o is not owner]


def _owners() -> list[Parkable]:
    pid = os.getpid()
    _registered[:] = [(p, o) for p, o in _registered if p == pid]  # a fork's leftovers go
    return [o for _, o in _registered]


def _os_threads() -> int:
    """The kernel's count of this process's threads (what 3.12+ warns by), 0 if unknown."""
    try:
        with open("/proc/self/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[17])
    except (OSError, ValueError, IndexError):
        return 0


def _before_fork() -> None:
    try:
        _park_all()
    except Exception as exc:  # never let a fork handler raise into the user's fork
        warn(f"safe_redirect: parking our threads before fork failed: {exc!r}")


def _park_all() -> None:
    owners = _owners()
    if not owners:
        return
    ours = {t for t in (o.parked_thread() for o in owners) if t is not None}
    me = threading.current_thread()
    if not ours or me in ours or any(t is not me and t not in ours for t in threading.enumerate()):
        return  # nothing to park, or threads that are the program's own: the warning is theirs
    counted = _os_threads()
    deadline = time.monotonic() + PARK_TIMEOUT
    _parked.extend(o for o in owners if o.park(deadline))
    # a joined thread may still be counted for a moment while the kernel finishes its exit
    settle = time.monotonic() + _OS_SETTLE
    while counted and _os_threads() > counted - len(_parked) and time.monotonic() < settle:
        time.sleep(0)


def _resume() -> None:
    parked = _parked[:]
    _parked.clear()
    for owner in parked:
        try:
            owner.resume()
        except Exception as exc:  # never let a fork handler raise into the user's fork
            warn(f"safe_redirect: restarting a thread after fork failed: {exc!r}")


def resume_now() -> None:
    """Restart what is parked now rather than when the queued restart runs: our API was called
    before it (from a C caller of os.fork, say)."""
    if _parked:
        _resume()


def _after_fork_in_parent() -> None:
    if not _parked:
        return
    if (_WARNS and not _COUNTS_BEFORE_AFTER_HANDLERS
            and threading.current_thread() is threading.main_thread() and _resume_soon()):
        return
    _resume()


def _after_fork_in_child() -> None:
    _parked.clear()  # the parent's; the child's sessions start their own threads


_pending_resume = None  # the ctypes callback, kept alive while queued


def _resume_soon() -> bool:
    """Queue _resume() to run right after os.fork() returns (3.12 to 3.14.0); False if it could
    not be queued."""
    global _pending_resume
    import ctypes

    if _pending_resume is None:
        def run(_: object) -> int:
            _resume()
            return 0

        _pending_resume = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(run)
    add = ctypes.pythonapi.Py_AddPendingCall
    add.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    add.restype = ctypes.c_int
    return bool(add(ctypes.cast(_pending_resume, ctypes.c_void_p), None) == 0)

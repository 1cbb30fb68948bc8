"""Who a process is: the owner stamp of a hook, fork detection, its multiprocessing name.

A pid alone cannot name a process: pids are reused. A stamp is (pid, start time); a process whose
pid is alive but whose start time differs is somebody else. Forks are seen two ways: the C extension
bumps a *fork generation* in every child right after fork(), before any Python code runs there (also
for forks made by C libraries), and `os.register_at_fork` runs our Python handlers where Python
forked. The write path compares generations, one memory load; the slower paths compare pids.

Every way a fork is noticed leads to one place, `LaneWriter.become_child` (`writer.py`):
- Python forked: the handlers registered here with `on_fork_in_child` run first thing in the
  child (the hooks re-aim, fd captures let go of the parent's pipes, each session's writer
  enters the child state; fd mode claims its lane at once);
- any fork, C ones included: the C hook sees a new generation at the first captured write and
  calls its `on_fork` (a wrap-mode child claims its lane there);
- the slow paths (`Session.flush`, `uninstall`, `stats`) compare the owner's pid with ours.
Two more registries serve other needs: `fork_parking.py` parks our threads in the parent around
a fork, and `exits.py` runs what a multiprocessing child needs once started and at its exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from safe_redirect import ring
from safe_redirect.diagnostics import warn

__all__ = ["Stamp", "fork_generation", "on_fork_in_child", "process_name", "remove_fork_handler"]


def fork_generation() -> int:
    """How many forks lie between this process and the one that loaded safe_redirect."""
    return ring.fork_generation()


def _start_time_us(pid: int) -> int:
    created: float = psutil.Process(pid).create_time()
    return round(created * 1_000_000)


@dataclass(frozen=True)
class Stamp:
    """A process named so that pid reuse cannot fool us: pid plus start time in microseconds."""

    pid: int
    start_us: int

    @classmethod
    def current(cls) -> Stamp:
        pid = os.getpid()
        return cls(pid, _start_time_us(pid))

    def is_alive(self) -> bool:
        """True while this very process runs (a zombie or a reused pid counts as dead)."""
        try:
            proc = psutil.Process(self.pid)
            with proc.oneshot():
                if round(proc.create_time() * 1_000_000) != self.start_us:
                    return False
                status: str = proc.status()
                return bool(status != psutil.STATUS_ZOMBIE)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def pid_exists(self) -> bool:
        return bool(psutil.pid_exists(self.pid))

    def is_me(self) -> bool:
        return self.pid == os.getpid()


def process_name() -> str:
    """multiprocessing's name for this process ("SpawnPoolWorker-3"), or "" for a main process
    and for a child of a bare `os.fork()`, which still holds its parent's Process object."""
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is None:
        return ""
    current = multiprocessing.current_process()
    if current is _inherited_process:
        return ""
    name: str = current.name
    return "" if name == "MainProcess" else name


# multiprocessing's Process object as a fork left it; its own children replace it at once
_inherited_process: object | None = None
_child_handlers: list[Callable[[], None]] = []


def _run_child_handlers() -> None:
    global _inherited_process
    multiprocessing = sys.modules.get("multiprocessing")
    _inherited_process = multiprocessing.current_process() if multiprocessing else None
    for handler in list(_child_handlers):
        try:
            handler()
        except Exception as exc:  # a fork handler must never break the child
            warn(f"safe_redirect: fork handler failed: {exc!r}")


def on_fork_in_child(handler: Callable[[], None]) -> None:
    """Run `handler` in every child right after `os.fork()` (multiprocessing's fork included)."""
    _child_handlers.append(handler)


def remove_fork_handler(handler: Callable[[], None]) -> None:
    try:
        _child_handlers.remove(handler)
    except ValueError:
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_child_handlers)

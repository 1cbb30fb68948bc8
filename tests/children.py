"""A forked child in tests, its body and its bounded reaping: shared by conftest and the
fault loops."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable


def child_exit(body: Callable[[], object]) -> None:
    """Run `body` in a forked child and leave with os._exit: never back into the caller."""
    code = 0
    try:
        body()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def reap(pid: int, timeout: float) -> int | None:
    """Wait (bounded) for our child `pid`; its exit code, or None after killing it for hanging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None

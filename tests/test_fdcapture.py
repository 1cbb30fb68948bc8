"""FdCapture's lifecycle (safe_redirect/fdcapture.py, `FdState`): each state reached by what
brings it about, and every fd of the capture closed exactly once, by whoever comes last. Each
case runs in a fresh interpreter: it points that process's fds 1 and 2 at pipes."""

from __future__ import annotations

import textwrap

import pytest

from .conftest import run_python

PRELUDE = """
import os, time
from safe_redirect.fdcapture import FdCapture, FdState

def fds():
    return set(os.listdir("/proc/self/fd"))

def wait_until(condition):
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "waited 30 s"
        time.sleep(0.001)

def tee_only():
    return None, 0.0

def capture():
    return FdCapture(("stdout", "stderr"), tee_only, lambda p: None, lambda p, s, r: None)

def on_the_terminal():  # fd 1 is what it was at the start, not our pipe
    return os.fstat(1).st_ino == terminal

before = fds()
terminal = os.fstat(1).st_ino
"""


def run(code: str) -> str:
    result = run_python(PRELUDE + textwrap.dedent(code), timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_stop_captures_then_the_pump_closes_everything_at_its_pipes_end() -> None:
    out = run("""
        c = capture()
        assert c.state is FdState.NEW
        c.open()
        assert c.state is FdState.OPEN and not on_the_terminal()
        c.run()
        assert c.state is FdState.PUMPING
        os.write(1, b"through the pipe\\n")
        assert c.sync(10)
        assert c.stop(10) and c.state in (FdState.TEEING, FdState.CLOSED)
        wait_until(lambda: c.state is FdState.CLOSED)  # fds 1 and 2 were its only writers
        assert not c.thread.is_alive()
        assert fds() == before, (fds(), before)
        assert c.stop(10) and c.sync(10)  # idempotent
        print("ok")
    """)
    assert out.splitlines() == ["through the pipe", "ok"]


def test_a_pump_whose_pipes_ended_before_stop_leaves_the_saved_fds_to_stop() -> None:
    run("""
        c = capture()
        c.start()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # as pytest's capfd does: fds 1 and 2 leave our pipes
        os.dup2(null, 2)
        wait_until(lambda: c.state is FdState.ENDED)
        assert all(os.fstat(saved) for saved in c.saved_fds())  # the hooks tee to them still
        assert c.sync(10)  # nothing left to serve it
        assert c.stop(10) and c.state is FdState.CLOSED
        assert fds() == before | {str(null)}, (fds(), before)
    """)


def test_stop_before_any_pump_closes_what_open_made() -> None:
    run("""
        c = capture()
        c.open()
        assert c.stop(10) and c.state is FdState.CLOSED
        assert on_the_terminal()
        assert fds() == before, (fds(), before)
        c = capture()
        assert c.stop(10) and c.state is FdState.CLOSED  # never opened
        assert fds() == before, (fds(), before)
    """)


@pytest.mark.parametrize("end", ["closed", "ended"])
def test_a_forked_child_closes_no_number_its_parent_reused(end: str) -> None:
    """The read ends the pump closed at EOF (and the saved fds stop() closed) are numbers the
    parent may have given to something else before it forked: the child must not close them."""
    run(f"""
        c = capture()
        c.start()
        if {end!r} == "closed":
            assert c.stop(10)
            wait_until(lambda: c.state is FdState.CLOSED)
        else:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            wait_until(lambda: c.state is FdState.ENDED)
        reused = [fd for pair in (os.pipe(), os.pipe(), os.pipe()) for fd in pair]
        pid = os.fork()
        if pid == 0:
            c.abandon_in_child()
            ok = c.state is FdState.ABANDONED and all(os.fstat(fd) for fd in reused)
            os._exit(0 if ok else 1)
        assert os.waitpid(pid, 0)[1] == 0
    """)

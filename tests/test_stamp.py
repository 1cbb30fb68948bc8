"""Owner stamps, fork generations and ranks."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time

import psutil
import pytest

from safe_redirect.ranks import detect_rank
from safe_redirect.stamp import Stamp, fork_generation

from .conftest import wait_pid


def test_the_current_stamp_is_pid_and_start_time() -> None:
    me = Stamp.current()
    assert me.pid == os.getpid()
    assert me.start_us == round(psutil.Process().create_time() * 1_000_000)
    assert me.is_alive() and me.is_me()


def test_a_reused_pid_is_not_the_same_process() -> None:
    me = Stamp.current()
    assert not Stamp(me.pid, me.start_us - 1_000_000).is_alive()


def test_an_exited_child_is_dead_even_before_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stamp = Stamp(child.pid, round(psutil.Process(child.pid).create_time() * 1_000_000))
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "child did not exit"
        time.sleep(0.01)
    assert not stamp.is_alive()  # a zombie: exited, not yet waited for
    child.wait(10)
    assert not stamp.is_alive()


def test_os_fork_bumps_the_generation_in_the_child_only() -> None:
    before = fork_generation()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, str(fork_generation()).encode())
        os._exit(0)
    os.close(w)
    assert wait_pid(pid, 10) == 0
    assert int(os.read(r, 100)) == before + 1
    os.close(r)
    assert fork_generation() == before


def test_a_fork_made_in_c_bumps_the_generation_too() -> None:
    """A C library calling fork() skips Python's fork handlers, not ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = fork_generation()
    r, w = os.pipe()
    pid = libc.fork()
    if pid == 0:
        os.write(w, str(fork_generation()).encode())
        os._exit(0)
    assert pid > 0
    os.close(w)
    assert wait_pid(pid, 10) == 0
    assert int(os.read(r, 100)) == before + 1
    os.close(r)


@pytest.mark.parametrize(("env", "rank"), [
    ({"RANK": "3"}, 3), ({"LOCAL_RANK": "5"}, 5), ({"RANK": "2", "LOCAL_RANK": "0"}, 2),
    ({}, None), ({"RANK": "not a number"}, None),
])
def test_the_rank_comes_from_the_launchers_variables(monkeypatch, env, rank) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detect_rank() == rank

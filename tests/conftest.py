"""Helpers for tests that start real processes: every wait is bounded, a hang is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import safe_redirect
from safe_redirect import Record

from .children import child_exit, reap


def fork_call(fn: Callable[..., Any], *args: Any) -> int:
    """Run fn(*args) in a child made by os.fork(); the child never returns into pytest."""
    pid = os.fork()
    if pid == 0:
        child_exit(lambda: fn(*args))
    return pid


def run_all(processes: list[Any], timeout: float = 60.0, exitcode: int = 0) -> list[Any]:
    """Start multiprocessing Processes, join them (bounded) and insist that each exited so."""
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
        assert process.exitcode == exitcode, (process, process.exitcode)
    return processes


def seconds_a_child_writes_after_uninstall(session: Any, before: Callable[[], Any],
                                           after: Callable[[], Any]) -> float:
    """Fork a child that runs `before()` (attached), waits while the master uninstalls
    `session`, then runs `after()`; the seconds it took from there to exit 0 (30 s at most)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def child() -> None:
        before()
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        after()

    try:
        pid = fork_call(child)
        assert os.read(ready_r, 1) == b"1"
        session.uninstall()
        t0 = time.monotonic()
        os.write(go_w, b"1")
        assert wait_pid(pid, 30) == 0
        return time.monotonic() - t0
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)


def wait_pid(pid: int, timeout: float = 60.0) -> int:
    """The child's exit code; a child still running after `timeout` is killed and the test fails."""
    code = reap(pid, timeout)
    if code is None:
        pytest.fail(f"child {pid} hung for {timeout} s")
    return code


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll `condition` until it holds: the way tests wait for something another thread or
    process does (not a sleep that hopes it is done). Still false after `timeout`: a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what or condition}")
        time.sleep(0.001)


def run_python(code: str, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter; a hang is a failure, not a wait."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"script hung for {timeout} s; stderr: {exc.stderr!r}")


def run_python_file(path: Any, code: str, timeout: float = 60.0, args: tuple[str, ...] = (),
                    **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Like run_python, from a file: multiprocessing's spawn re-imports the main module."""
    path.write_text(textwrap.dedent(code))
    try:
        return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                              timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"script hung for {timeout} s; stderr: {exc.stderr!r}")


def lines_by_origin(records: list[Record]) -> dict[tuple[int, str], list[str]]:
    """Lines per (pid, stream), in delivery order."""
    out: dict[tuple[int, str], list[str]] = defaultdict(list)
    for record in records:
        out[(record.pid, record.stream)].extend(record.text.splitlines())
    return out


@pytest.fixture
def capture() -> Iterator[tuple[safe_redirect.Session, list[Record]]]:
    """An installed session whose records land in a list; uninstalled after the test."""
    records: list[Record] = []
    session = safe_redirect.install(on_output=records.append)
    try:
        yield session, records
    finally:
        session.uninstall()


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """A test must not leave a segment of this process behind in /dev/shm."""
    def mine() -> set[str]:
        prefix = f"safe_redirect-{os.getpid()}-"
        try:
            return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
        except FileNotFoundError:
            return set()

    before = mine()
    yield
    leaked = mine() - before
    assert not leaked, f"segments left behind: {leaked}"


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--soak`: run the soak tests (tests/reliability/test_soak.py) at full size; without it
    they run at a size that fits a CI budget."""
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the reliability soak at full size (8 producers x 1,000,000 lines)")

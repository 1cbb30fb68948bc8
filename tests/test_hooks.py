"""What a child calls when it writes: never the master's writers, always every live session."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

import pytest

import safe_redirect
from safe_redirect import Record

from . import internals
from .conftest import fork_call, lines_by_origin, wait_pid


class ForeignWriter:
    """A tracker-like writer patched onto sys.stdout.write: it reports the pid of every process
    that calls it through a pipe (a list would only show the master's calls)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()

    def install(self) -> None:
        inner = sys.stdout.write

        def foreign_write(text: str) -> int:
            os.write(self._w, f"{os.getpid()}\n".encode())
            return inner(text)

        sys.stdout.write = foreign_write  # type: ignore[method-assign]

    def callers(self) -> list[int]:
        """The pid of each call, in order."""
        os.close(self._w)
        data = b""
        while chunk := os.read(self._r, 65536):
            data += chunk
        os.close(self._r)
        return [int(x) for x in data.split()]


@pytest.fixture
def foreign() -> Iterator[ForeignWriter]:
    writer = ForeignWriter()
    yield writer
    write = vars(sys.stdout).get("write", None)
    if write is not None and not internals.is_hook(write):
        del sys.stdout.write


@contextlib.contextmanager
def session_with_foreign(foreign: ForeignWriter, when: str,
                         records: list[Record]) -> Iterator[safe_redirect.Session]:
    """A session, with the foreign writer patched in before or after it; undone in reverse."""
    if when == "before":
        foreign.install()
    session = safe_redirect.install(on_output=records.append)
    if when == "after":
        foreign.install()
    try:
        yield session
    finally:
        if when == "after":
            del sys.stdout.write
        session.uninstall()
        if when == "before":
            del sys.stdout.write


def _child_prints() -> None:
    print(f"child {os.getpid()} prints")


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_writer_the_master_patched_in_never_runs_in_a_child(foreign, when) -> None:
    records: list[Record] = []
    with session_with_foreign(foreign, when, records) as session:
        print("master prints")
        pid = fork_call(_child_prints)
        assert wait_pid(pid, 30) == 0
        assert session.flush(timeout=10)
    assert lines_by_origin(records)[(pid, "stdout")] == [f"child {pid} prints"]
    assert set(foreign.callers()) == {os.getpid()}  # still runs in the master, never in a child


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_fork_made_by_c_code_runs_the_masters_writer_at_most_once(foreign, when) -> None:
    """No Python fork handler runs after a fork() made by C code: our hooks notice the new process
    at the first write they see. A writer patched in *below* ours never runs in the child; one
    patched in *above* ours is called before we are, so it runs once, for the first write, and
    never again: that first call re-aims the hooks and puts ours back on top."""
    records: list[Record] = []
    with session_with_foreign(foreign, when, records) as session:
        pid = ctypes.CDLL(None).fork()
        if pid == 0:
            try:
                for i in range(5):
                    print(f"c-forked child {os.getpid()} line {i}")
                sys.stdout.flush()
            finally:
                os._exit(0)
        assert wait_pid(pid, 30) == 0
        assert session.flush(timeout=10)
    in_child = foreign.callers().count(pid)
    assert in_child == (0 if when == "before" else 1)
    assert lines_by_origin(records)[(pid, "stdout")] == [
        f"c-forked child {pid} line {i}" for i in range(5)]


def test_nested_sessions_both_receive_a_childs_lines() -> None:
    outer_records: list[Record] = []
    inner_records: list[Record] = []
    with safe_redirect.install(on_output=outer_records.append) as outer:
        with safe_redirect.install(on_output=inner_records.append) as inner:
            pid = fork_call(_child_prints)
            assert wait_pid(pid, 30) == 0
            assert inner.flush(timeout=10)
        assert outer.flush(timeout=10)
    expected = [f"child {pid} prints"]
    assert lines_by_origin(outer_records)[(pid, "stdout")] == expected
    assert lines_by_origin(inner_records)[(pid, "stdout")] == expected


def test_a_session_that_installs_in_a_child_gets_that_childs_output_too(tmp_path) -> None:
    master_records: list[Record] = []
    child_log = tmp_path / "child.txt"

    def child() -> None:
        with open(child_log, "w") as log, safe_redirect.install(
                on_output=lambda r: log.write(r.text)):
            print("child has its own capture")

    with safe_redirect.install(on_output=master_records.append) as session:
        pid = fork_call(child)
        assert wait_pid(pid, 30) == 0
        assert session.flush(timeout=10)
    assert child_log.read_text() == "child has its own capture\n"
    assert lines_by_origin(master_records)[(pid, "stdout")] == ["child has its own capture"]


def test_uninstall_in_a_child_restores_the_plain_writer_not_the_masters(foreign) -> None:
    foreign.install()
    session = safe_redirect.install()

    def child() -> None:
        session.uninstall()
        assert "write" not in vars(sys.stdout)  # the class's own method, not the master's
        print("after uninstall in the child")

    try:
        pid = fork_call(child)
        assert wait_pid(pid, 30) == 0
    finally:
        session.uninstall()
        del sys.stdout.write
    assert pid not in foreign.callers()

"""A program without threads of its own stays single-threaded at each fork after install().

Python 3.12+ warns at a fork of a multi-threaded process; our drain (and fd pump) thread must
not make that true of a program that has none (safe_redirect/fork_parking.py). Each case runs in
a fresh interpreter with `-W always`, so that a warning would reach its stderr; on 3.11, which
has no such warning, the check that no thread of ours is alive at the fork is what counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Registered before safe_redirect is imported, so that it runs after our before-fork handler
# (CPython runs those in reverse order of registration): it sees the process as fork() will.
PRELUDE = """
import json, os, sys, threading

def os_threads():
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[17])

at_fork = []
os.register_at_fork(before=lambda: at_fork.append(
    ([t.name for t in threading.enumerate()], os_threads())))

import safe_redirect
"""

FORK_AND_PRINT = """
lines = []
session = safe_redirect.install(lines.append, mode=MODE)
print("master before", flush=True)
for i in range(5):
    pid = os.fork()
    if pid == 0:
        print(f"child {i}", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
print("master after", flush=True)
session.uninstall()
texts = [line for record in lines for line in record.text.splitlines()]
print(json.dumps({"at_fork": at_fork, "texts": texts,
                  "threads": [t.name for t in threading.enumerate()]}), file=sys.__stderr__)
"""


def _run(body: str, mode: str, setup: str = "") -> tuple[dict[str, object], str]:
    code = PRELUDE + setup + f"MODE = {mode!r}\n" + body
    result = _run_with_warnings(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report, result.stderr


def _run_with_warnings(code: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"script hung; stderr: {exc.stderr!r}")


@pytest.mark.parametrize("mode", ["wrap", "fd"])
def test_a_master_without_threads_forks_without_the_fork_warning(mode: str) -> None:
    report, stderr = _run(FORK_AND_PRINT, mode)
    assert "multi-threaded" not in stderr
    assert report["at_fork"] == [[["MainThread"], 1]] * 5  # nothing of ours alive at any fork
    texts = report["texts"]
    assert isinstance(texts, list)
    assert sorted(texts) == sorted(["master before", "master after"]
                                   + [f"child {i}" for i in range(5)])  # each line once
    assert texts.index("master before") < texts.index("master after")


@pytest.mark.parametrize("mode", ["wrap", "fd"])
def test_where_python_counts_threads_after_the_fork_handlers_the_restart_waits(
        mode: str) -> None:
    """3.12, 3.13 and 3.14.0 count threads after the after_in_parent handlers: there the
    restart is queued to run when os.fork() has returned. Forced here on any version."""
    setup = ("from safe_redirect import fork_parking\n"
             "fork_parking._WARNS, fork_parking._COUNTS_BEFORE_AFTER_HANDLERS = True, False\n")
    report, stderr = _run(FORK_AND_PRINT, mode, setup)
    assert "multi-threaded" not in stderr
    assert report["at_fork"] == [[["MainThread"], 1]] * 5
    assert sorted(report["texts"]) == sorted(  # type: ignore[arg-type]
        ["master before", "master after"] + [f"child {i}" for i in range(5)])


def test_a_drain_stuck_in_a_callback_does_not_hold_the_fork_up() -> None:
    """The park is bounded: a callback that waits for the master to have forked does not
    deadlock the fork; its thread stays (the warning is true then) and nothing is lost."""
    body = """
import threading
forked, inside = threading.Event(), threading.Event()
lines = []
def slow(record):
    inside.set()
    forked.wait(30)
    lines.append(record)
session = safe_redirect.install(slow)
print("held", flush=True)
inside.wait(30)
pid = os.fork()
if pid == 0:
    print("child", flush=True)
    os._exit(0)
forked.set()
os.waitpid(pid, 0)
session.uninstall()
texts = [line for record in lines for line in record.text.splitlines()]
print(json.dumps({"at_fork": at_fork, "texts": texts,
                  "threads": [t.name for t in threading.enumerate()]}), file=sys.__stderr__)
"""
    report, _ = _run(body, "wrap")
    (names, _), = report["at_fork"]  # type: ignore[misc]
    assert "safe_redirect-drain" in names
    texts = [t for t in report["texts"] if "multi-threaded" not in t]  # type: ignore[attr-defined]
    assert sorted(texts) == ["child", "held"]  # 3.12+ also warned, truly


def test_a_program_with_threads_of_its_own_keeps_ours_running() -> None:
    """Its forks warn on 3.12+ with or without us: parking would only cost it time."""
    body = """
import threading
stop = threading.Event()
worker = threading.Thread(target=stop.wait, name="users")
worker.start()
lines = []
session = safe_redirect.install(lines.append)
pid = os.fork()
if pid == 0:
    print("child", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
stop.set()
worker.join()
session.uninstall()
texts = [line for record in lines for line in record.text.splitlines()]
print(json.dumps({"at_fork": at_fork, "texts": texts,
                  "threads": [t.name for t in threading.enumerate()]}), file=sys.__stderr__)
"""
    report, _ = _run(body, "wrap")
    (names, _), = report["at_fork"]  # type: ignore[misc]
    assert sorted(names) == ["MainThread", "safe_redirect-drain", "users"]
    texts = [t for t in report["texts"] if "multi-threaded" not in t]  # type: ignore[attr-defined]
    assert texts == ["child"]  # 3.12+ also warned: the program's own thread makes it true


@pytest.mark.parametrize("mode", ["wrap", "fd"])
def test_a_child_forks_its_own_children_without_the_fork_warning(mode: str) -> None:
    """In fd mode a child runs a pump thread of its own: it parks for the child's forks too."""
    body = """
lines = []
session = safe_redirect.install(lines.append, mode=MODE)
pid = os.fork()
if pid == 0:
    grandchild = os.fork()
    if grandchild == 0:
        print("grandchild", flush=True)
        os._exit(0)
    os.waitpid(grandchild, 0)
    print("child", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
session.uninstall()
texts = [line for record in lines for line in record.text.splitlines()]
print(json.dumps({"at_fork": at_fork, "texts": texts}), file=sys.__stderr__)
"""
    report, stderr = _run(body, mode)
    assert "multi-threaded" not in stderr
    assert sorted(report["texts"]) == ["child", "grandchild"]  # type: ignore[arg-type]

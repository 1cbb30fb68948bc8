"""mode="fd": C-level output (os.write, os.system, libc) of the master and of every child."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator

import pytest

import safe_redirect
from safe_redirect import Record

from . import internals
from .conftest import (
    fork_call,
    lines_by_origin,
    run_all,
    run_python_file,
    seconds_a_child_writes_after_uninstall,
    wait_pid,
)

FORK = multiprocessing.get_context("fork")
libc = ctypes.CDLL(None)


@contextlib.contextmanager
def fd_capture() -> Iterator[tuple[safe_redirect.Session, list[Record]]]:
    """Installed inside the test body: pytest's own fd capture re-points fds 1 and 2 between a
    fixture's setup and the test call, which would leave our pipes off them."""
    records: list[Record] = []
    session = safe_redirect.install(on_output=records.append, mode="fd")
    try:
        yield session, records
    finally:
        session.uninstall()


def test_the_masters_c_level_output_is_captured() -> None:
    with fd_capture() as (session, records):
        os.write(1, b"os.write line\n")
        os.write(2, b"os.write to stderr\n")
        assert os.system("echo from a shell") == 0
        libc.puts(b"from libc puts")
        libc.fflush(None)
        print("from print", file=sys.__stdout__, flush=True)  # pytest's sys.stdout: no fd 1
        assert session.flush(timeout=10)
        by_origin = lines_by_origin(records)
        assert sorted(by_origin[(os.getpid(), "stdout")]) == sorted(
            ["os.write line", "from a shell", "from libc puts", "from print"])
        assert by_origin[(os.getpid(), "stderr")] == ["os.write to stderr"]


def _c_level_child(n: int) -> None:
    os.environ["RANK"] = str(n)
    for i in range(50):
        os.write(1, f"child {n} os.write {i}\n".encode())
    libc.puts(f"child {n} libc".encode())
    libc.fflush(None)
    print(f"child {n} print", file=sys.__stdout__, flush=True)
    os.write(2, f"child {n} stderr\n".encode())


def test_forked_childrens_c_level_output_arrives_once_tagged() -> None:
    with fd_capture() as (session, records):
        children = run_all([FORK.Process(target=_c_level_child, args=(n,)) for n in range(4)])
        assert session.flush(timeout=30)
        by_origin = lines_by_origin(records)
        for n, child in enumerate(children):
            assert by_origin[(child.pid, "stdout")] == [
                *(f"child {n} os.write {i}" for i in range(50)), f"child {n} libc",
                f"child {n} print"]
            assert by_origin[(child.pid, "stderr")] == [f"child {n} stderr"]
        for n, child in enumerate(children):
            # the pump reads the rank with every chunk: the child set RANK after the fork
            assert {r.tag for r in records if r.pid == child.pid} == {f"[rank{n}] "}


def test_a_child_killed_right_after_writing_loses_nothing() -> None:
    """The pump inside the child is not the only way out: the master empties the dead child's
    pipes itself."""
    with fd_capture() as (session, records):
        pids = []
        for n in range(5):
            def child(n: int = n) -> None:
                os.write(1, b"".join(f"doomed {n} line {i}\n".encode() for i in range(200)))
                os.kill(os.getpid(), signal.SIGKILL)

            pid = fork_call(child)
            assert wait_pid(pid, 30) == -signal.SIGKILL
            pids.append(pid)
        assert session.flush(timeout=30)
        by_origin = lines_by_origin(records)
        for n, pid in enumerate(pids):
            assert by_origin[(pid, "stdout")] == [f"doomed {n} line {i}" for i in range(200)]


def test_a_child_killed_before_the_master_saw_its_lane_loses_nothing() -> None:
    """The master's drain is busy (in a callback) the whole time a forked child claims its lane,
    writes and is killed: nobody opened the child's pipes through /proc while it lived. The
    child handed their read ends over before it wrote, so the master empties them."""
    import threading

    entered, release = threading.Event(), threading.Event()
    records: list[Record] = []

    def on_output(record: Record) -> None:
        records.append(record)
        if "hold the drain" in record.text:
            entered.set()
            release.wait(60)

    session = safe_redirect.install(on_output=on_output, mode="fd")
    try:
        os.write(1, b"hold the drain\n")
        assert entered.wait(30)

        def child() -> None:
            os.write(1, b"".join(f"unseen line {i}\n".encode() for i in range(200)))
            os.kill(os.getpid(), signal.SIGKILL)

        pid = fork_call(child)
        assert wait_pid(pid, 30) == -signal.SIGKILL
        release.set()
        assert session.flush(timeout=30)
        assert lines_by_origin(records)[(pid, "stdout")] == [
            f"unseen line {i}" for i in range(200)]
    finally:
        release.set()
        session.uninstall()


def test_uninstall_leaves_no_fd_of_its_childrens_pipes_open() -> None:
    """The read ends of the children's pipes the master holds (handed over, or opened through
    /proc) are closed when their lanes are freed, and the rest at uninstall()."""
    def open_fds() -> set[int]:
        return {int(fd) for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")}

    before = open_fds()
    with fd_capture() as (session, records):
        pids = []
        for n in range(12):
            def child(n: int = n) -> None:
                os.write(1, f"child {n}\n".encode())
                if n % 3 == 0:
                    os.kill(os.getpid(), signal.SIGKILL)

            pid = fork_call(child)
            wait_pid(pid, 30)
            pids.append(pid)
        assert session.flush(timeout=30)
        by_origin = lines_by_origin(records)
        assert [by_origin[(pid, "stdout")] for pid in pids] == [[f"child {n}"] for n in range(12)]
    # the pump tees on after uninstall() until nothing writes to its pipes, then closes its fds
    # (the pump of the moment: a fork ends it and starts another)
    pump = internals.fd_pump_thread(session)
    assert pump is not None
    pump.join(30)
    assert open_fds() == before


def _pool_write(x: int) -> int:
    os.write(1, f"pool {x}\n".encode())
    return x


def test_a_pool_that_terminates_its_workers_loses_nothing() -> None:
    with fd_capture() as (session, records):
        with FORK.Pool(2) as pool:  # leaving the block SIGTERMs the workers
            assert pool.map(_pool_write, range(40)) == list(range(40))
        assert session.flush(timeout=30)
        lines = [line for r in records if r.pid != os.getpid() for line in r.text.splitlines()]
        assert sorted(lines) == sorted(f"pool {x}" for x in range(40))


def test_uninstall_puts_the_same_fds_back() -> None:
    before = [os.fstat(fd) for fd in (1, 2)]
    session = safe_redirect.install(mode="fd")
    during = [os.fstat(fd) for fd in (1, 2)]
    session.uninstall()
    after = [os.fstat(fd) for fd in (1, 2)]
    assert [(s.st_dev, s.st_ino) for s in during] != [(s.st_dev, s.st_ino) for s in before]
    assert [(s.st_dev, s.st_ino) for s in after] == [(s.st_dev, s.st_ino) for s in before]


def test_a_child_printing_after_uninstall_never_blocks() -> None:
    def after() -> None:
        for _ in range(16):
            os.write(1, b"z" * 65536)  # far more than a pipe holds, nobody capturing
        print("child done", flush=True)

    session = safe_redirect.install(mode="fd")
    assert seconds_a_child_writes_after_uninstall(session, lambda: None, after) < 10


@pytest.mark.parametrize("terminal", ["pipe", "file"])
def test_fd_mode_end_to_end_terminal_and_records(tmp_path, terminal) -> None:
    """In a fresh interpreter whose terminal is a pipe, or a file (`python train.py > log`, as
    under a batch scheduler): spawn and fork children, a shell. A spawned child reopens the
    file in append mode, and the master appends to it too, so no line overwrites another."""
    log = tmp_path / "records.txt"
    script = f"""
        import multiprocessing, os, sys
        import safe_redirect

        def work(n):
            os.write(1, f"worker {{n}} c-level\\n".encode())
            print(f"worker {{n}} print", flush=True)

        if __name__ == "__main__":
            log = open({str(log)!r}, "w")

            def on_output(record):
                for line in record.text.splitlines(keepends=True):
                    log.write(f"{{record.pid}} {{line}}")
                log.flush()

            with safe_redirect.install(on_output=on_output, mode="fd"):
                os.system("echo shell in master")
                for method in ("fork", "spawn"):
                    p = multiprocessing.get_context(method).Process(target=work, args=(method,))
                    p.start()
                    p.join()
                    assert p.exitcode == 0
            print("after uninstall")
    """
    if terminal == "pipe":
        result = run_python_file(tmp_path / "main.py", script, timeout=120)
        assert result.returncode == 0, result.stderr
        shown = result.stdout.splitlines()
    else:
        (tmp_path / "main.py").write_text(textwrap.dedent(script))
        with open(tmp_path / "terminal.txt", "w") as out:
            result = subprocess.run([sys.executable, str(tmp_path / "main.py")], stdout=out,
                                    stderr=subprocess.PIPE, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        shown = (tmp_path / "terminal.txt").read_text().splitlines()
    for line in ("shell in master", "worker fork c-level", "worker fork print",
                 "worker spawn c-level", "worker spawn print", "after uninstall"):
        assert shown.count(line) == 1, (line, shown)
    captured = [line.split(" ", 1) for line in log.read_text().splitlines()]
    texts = sorted(text for _, text in captured)
    assert texts == sorted(["shell in master", "worker fork c-level", "worker fork print",
                            "worker spawn c-level", "worker spawn print"])
    pids = {text: int(pid) for pid, text in captured}
    assert pids["worker fork c-level"] == pids["worker fork print"] != pids["shell in master"]
    assert pids["worker spawn c-level"] == pids["worker spawn print"]
    assert len({pids["shell in master"], pids["worker fork print"],
                pids["worker spawn print"]}) == 3


def test_flushing_an_empty_pipe_keeps_capturing() -> None:
    """A flush that finds the pipes empty must not take that for their end: before, the master's
    next write raised BrokenPipeError and a child's filled its pipe and blocked for good."""
    with fd_capture() as (session, records):
        os.write(1, b"one\n")
        assert session.flush(timeout=10) and session.flush(timeout=10)  # the second finds none
        os.write(1, b"two\n")
        assert session.flush(timeout=10)
        assert lines_by_origin(records)[(os.getpid(), "stdout")] == ["one", "two"]


def _flushes_its_empty_pump_then_writes_a_lot() -> None:
    session = internals.active_sessions()[-1]
    os.write(1, b"before\n")
    internals.drain_fd_pump(session)
    internals.drain_fd_pump(session)  # the pipe is empty now
    for i in range(40000):  # 1.4 MB: more than a pipe holds, if nobody read it any more
        os.write(1, f"after {i:05d} ".encode() + b"z" * 20 + b"\n")


def test_a_child_that_drains_its_empty_pump_keeps_writing() -> None:
    with fd_capture() as (session, records):
        (child,) = run_all([FORK.Process(target=_flushes_its_empty_pump_then_writes_a_lot)], 30)
        assert session.flush(timeout=30)
        assert lines_by_origin(records)[(child.pid, "stdout")] == [
            "before", *(f"after {i:05d} " + "z" * 20 for i in range(40000))]


def _raises(n: int) -> None:
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # pytest's own are not on fds 1, 2
    print(f"child {n} before the raise")
    raise ValueError(f"boom from child {n}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_traceback_of_a_multiprocessing_child_that_raised_is_captured_whole(method) -> None:
    """multiprocessing prints a target's traceback after the child's finalizers ran, just before
    os._exit(): the child's pump must still move it into the lane (before, its first line was
    lost about every other time)."""
    context = multiprocessing.get_context(method)
    with fd_capture() as (session, records):
        children = run_all([context.Process(target=_raises, args=(n,)) for n in range(6)],
                           exitcode=1)
        assert session.flush(timeout=10)
    by_origin = lines_by_origin(records)
    for n, child in enumerate(children):
        assert by_origin[(child.pid, "stdout")] == [f"child {n} before the raise"]
        err = by_origin[(child.pid, "stderr")]
        assert err[:2] == [f"Process {child.name}:", "Traceback (most recent call last):"], err
        assert err[-1] == f"ValueError: boom from child {n}"


def test_children_forked_while_the_pump_appends_leave_at_once(tmp_path) -> None:
    """The pump appends without the GIL, and closing a lane waits for an append in progress. A
    child forked in the middle of one has no pump thread to finish it: it must not wait. (Before
    the fork handler zeroed the count, half of these children hung.) The master uninstalls
    while its pump is busy."""
    script = """
        import os, sys, threading, time
        import safe_redirect

        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the terminal: the flood goes nowhere
        session = safe_redirect.install(on_output=lambda record: None, mode="fd")
        stop = threading.Event()

        def flood():
            block = (b"f" * 79 + b"\\n") * 100
            while not stop.is_set():
                os.write(1, block)

        writer = threading.Thread(target=flood)
        writer.start()
        pids = []
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                os.write(1, b"child line\\n")
                session.uninstall()  # closes the child's lane, releases the segment
                os._exit(0)
            pids.append(pid)
            time.sleep(0.005)
        deadline = time.monotonic() + 30
        codes = {}
        while len(codes) < len(pids) and time.monotonic() < deadline:
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        session.uninstall()  # while the flood goes on: the pump may be inside an append
        stop.set()
        writer.join(10)
        print("exited", sorted(codes.values()).count(0), "of", len(pids), file=sys.stderr)
        for pid in pids:
            if pid not in codes:
                os.kill(pid, 9)
    """
    result = run_python_file(tmp_path / "forks.py", script, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exited 40 of 40" in result.stderr, result.stderr[-3000:]


# -- Python-level writes take the hooks: their thread, their rank, their order with C writes

_RECORDING = """
    import ctypes, json, multiprocessing, os, sys, threading
    import safe_redirect

    libc = ctypes.CDLL(None)
    RECORDS = sys.argv[1]

    def record_to(path):
        out = open(path, "w")

        def on_output(record):
            for line in record.text.splitlines():
                out.write(json.dumps([record.pid, record.tag, record.stream, line]) + "\\n")
            out.flush()

        return on_output
"""


def _records(path) -> list[tuple[int, str, str, str]]:
    import json

    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("buffering", ["write-through", "buffered"])
def test_threads_with_a_rank_of_their_own_keep_their_lines_and_tags(tmp_path, buffering) -> None:
    """Ranks that are threads of one process (as xmp.spawn runs them on the CPU), printing at
    once: each line whole, once, tagged with its thread's rank, in the records and on the
    terminal. Before, fd mode tagged them with the pid and spliced lines of two threads."""
    script = _RECORDING + """
    def rank_thread(rank, barrier):
        safe_redirect.set_thread_rank(rank)
        barrier.wait()
        for i in range(300):
            print(f"rank {rank} line {i:03d} " + "x" * (i % 50))
            if i % 7 == 0:
                sys.stdout.write(f"rank {rank} in ")
                sys.stdout.write(f"three parts {i:03d}\\n")

    if __name__ == "__main__":
        with safe_redirect.install(on_output=record_to(RECORDS), mode="fd"):
            barrier = threading.Barrier(4)
            threads = [threading.Thread(target=rank_thread, args=(r, barrier)) for r in range(4)]
            for t in threads: t.start()
            for t in threads: t.join()
            print("master done")
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1" if buffering == "write-through" else "")
    records_path = tmp_path / "records.jsonl"
    result = run_python_file(tmp_path / "threads.py", script, timeout=120,
                             args=(str(records_path),), env=env, errors="replace")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _records(records_path)
    expected = {r: [f"rank {r} line {i:03d} " + "x" * (i % 50) for i in range(300)]
                for r in range(4)}
    for r in range(4):
        for i in range(0, 300, 7):
            expected[r].insert(expected[r].index(f"rank {r} line {i:03d} " + "x" * (i % 50)) + 1,
                               f"rank {r} in three parts {i:03d}")
    for r in range(4):
        mine = [line for _, tag, _, line in rows if line.startswith(f"rank {r} ")]
        assert mine == expected[r]  # whole, once, in order
        assert {tag for _, tag, _, line in rows if line.startswith(f"rank {r} ")} == {
            f"[rank{r}] "}
    assert [line for _, _, _, line in rows if not line.startswith("rank")] == ["master done"]
    if buffering == "write-through":
        # the terminal shows every byte once (the writes of threads interleave there, as they
        # do without the library, so its lines are compared as a multiset of characters). Not
        # checked for a block-buffered stream: CPython's TextIOWrapper is not thread-safe, and
        # threads printing to one at once garble its buffer now and then without the library
        # too (measured: a few bytes in about one run of three); the records come from the
        # hooks, before that buffer
        written = "".join(line + "\n" for r in range(4) for line in expected[r])
        assert Counter(result.stdout) == Counter(written + "master done\n")


_ORDER_STEPS = """
    def steps(who, n):
        for i in range(n):
            print(f"{who} print {i}", flush=True)
            os.write(1, f"{who} os.write {i}\\n".encode())
            sys.stdout.write(f"{who} write {i}\\n"); sys.stdout.flush()
            libc.puts(f"{who} puts {i}".encode()); libc.fflush(None)
            sys.stdout.buffer.write(f"{who} buffer {i}\\n".encode()); sys.stdout.flush()
            if i % 10 == 0:
                os.system(f"echo {who} shell {i}")
"""


def _expected_steps(who: str, n: int) -> list[str]:
    out = []
    for i in range(n):
        out += [f"{who} print {i}", f"{who} os.write {i}", f"{who} write {i}", f"{who} puts {i}",
                f"{who} buffer {i}"]
        if i % 10 == 0:
            out.append(f"{who} shell {i}")
    return out


@pytest.mark.parametrize("buffering", ["write-through", "buffered"])
def test_prints_and_c_writes_of_one_thread_keep_their_order(tmp_path, buffering) -> None:
    """The two paths of fd mode (hooks for Python's writes, pipes for the rest) meet in one
    order: a print followed by a C write, and a C write followed by a print, land as written,
    in the master and in a forked child, in the records and on the terminal."""
    script = _RECORDING + _ORDER_STEPS + """
    if __name__ == "__main__":
        with safe_redirect.install(on_output=record_to(RECORDS), mode="fd"):
            child = multiprocessing.get_context("fork").Process(target=steps, args=("child", 40))
            child.start()
            child.join()
            steps("master", 40)
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1" if buffering == "write-through" else "")
    records_path = tmp_path / "records.jsonl"
    result = run_python_file(tmp_path / "order.py", script, timeout=120,
                             args=(str(records_path),), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _records(records_path)
    for who in ("child", "master"):
        assert [line for _, _, _, line in rows if line.startswith(who)] == _expected_steps(
            who, 40)
        assert [line for line in result.stdout.splitlines() if line.startswith(who)] == (
            _expected_steps(who, 40))
    master_pid = {pid for pid, _, _, line in rows if line.startswith("master")}
    assert len(master_pid) == 1 and {tag for _, tag, _, line in rows
                                      if line.startswith("master")} == {""}


def test_a_buffered_print_left_at_uninstall_is_captured_once(tmp_path) -> None:
    """What a block-buffered sys.stdout still holds at uninstall() reaches the terminal through
    the hooks, not through the pipe as well: once in the records, once on the terminal."""
    script = _RECORDING + """
    if __name__ == "__main__":
        session = safe_redirect.install(on_output=record_to(RECORDS), mode="fd")
        for i in range(100):
            print(f"held {i}")  # block-buffered: still in sys.stdout's buffer
        session.uninstall()
        print("after")
    """
    records_path = tmp_path / "records.jsonl"
    result = run_python_file(tmp_path / "held.py", script, timeout=60, args=(str(records_path),),
                             env=dict(os.environ, PYTHONUNBUFFERED=""))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for _, _, _, line in _records(records_path)] == [f"held {i}" for i in range(100)]
    assert result.stdout.splitlines() == [f"held {i}" for i in range(100)] + ["after"]


@pytest.mark.timeout(180)
def test_a_process_is_tagged_alike_in_wrap_and_fd_mode(tmp_path) -> None:
    """The tag of a process does not depend on the mode: before, fd mode claimed a child's lane
    at fork, before multiprocessing named it ([pid...] against wrap's [SpawnPoolWorker-N])."""
    script = _RECORDING + """
    def work(kind):
        print(f"{kind} says hi", flush=True)
        return kind

    if __name__ == "__main__":
        with safe_redirect.install(on_output=record_to(RECORDS), mode=sys.argv[2]):
            for method in ("fork", "spawn"):
                context = multiprocessing.get_context(method)
                p = context.Process(target=work, args=(f"{method} process",))
                p.start()
                p.join()
                with context.Pool(1) as pool:
                    pool.map(work, [f"{method} pool"])
    """
    tags = {}
    for mode in ("wrap", "fd"):
        records_path = tmp_path / f"{mode}.jsonl"
        result = run_python_file(tmp_path / "tags.py", script, timeout=150,
                                 args=(str(records_path), mode))
        assert result.returncode == 0, result.stderr[-3000:]
        tags[mode] = {line: tag for _, tag, _, line in _records(records_path)}
    assert tags["fd"] == tags["wrap"]
    import re

    assert {line: re.sub(r"\d+", "N", tag) for line, tag in tags["fd"].items()} == {
        "fork process says hi": "[ForkProcess-N] ", "fork pool says hi": "[ForkPoolWorker-N] ",
        "spawn process says hi": "[SpawnProcess-N] ",
        "spawn pool says hi": "[SpawnPoolWorker-N] "}


@pytest.mark.parametrize("buffering", ["write-through", "buffered"])
def test_nested_fd_sessions_each_get_every_line_once(tmp_path, buffering) -> None:
    """Two fd-mode sessions on top of each other, and a forked child: the inner session's raw
    hook hands Python's bytes to the outer one's (the inner terminal is the outer pipe, which
    would capture them a second time), and a child attaching one session does not attach the
    other from inside (its streams are not flushed there)."""
    script = _RECORDING + """
    def child():
        print("child print", flush=True)
        os.write(1, b"child os.write\\n")

    if __name__ == "__main__":
        outer = safe_redirect.install(on_output=record_to(RECORDS + ".outer"), mode="fd")
        inner = safe_redirect.install(on_output=record_to(RECORDS + ".inner"), mode="fd")
        for i in range(3):
            print(f"master print {i}")
            os.write(1, f"master os.write {i}\\n".encode())
        process = multiprocessing.get_context("fork").Process(target=child)
        process.start()
        process.join()
        inner.uninstall()
        outer.uninstall()
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1" if buffering == "write-through" else "")
    records_path = tmp_path / "records"
    result = run_python_file(tmp_path / "nested.py", script, timeout=60,
                             args=(str(records_path),), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sorted([*(f"master print {i}" for i in range(3)),
                       *(f"master os.write {i}" for i in range(3)), "child print",
                       "child os.write"])
    for which in ("outer", "inner"):
        rows = _records(tmp_path / f"records.{which}")
        assert sorted(line for _, _, _, line in rows) == expected, which
    assert sorted(result.stdout.splitlines()) == expected


def test_what_the_master_recovers_from_a_killed_child_does_not_join_a_threads_line() -> None:
    """A child killed right after C writes, its Python-level line left open: the bytes the
    master takes from the dead child's pipe continue the pipe's lines, not that thread's."""
    with fd_capture() as (session, records):
        def child() -> None:
            sys.stdout.write("python half line")  # pytest's stdout: no flush, no fd 1
            os.write(1, b"".join(f"doomed line {i}\n".encode() for i in range(200)))
            os.kill(os.getpid(), signal.SIGKILL)

        pid = fork_call(child)
        assert wait_pid(pid, 30) == -signal.SIGKILL
        assert session.flush(timeout=30)
        lines = lines_by_origin(records)[(pid, "stdout")]
        assert sorted(lines) == sorted(["python half line",
                                        *(f"doomed line {i}" for i in range(200))])

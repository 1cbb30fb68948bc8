"""install() end to end, with real forked processes: every line once, tagged, nothing hung."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

import pytest

import safe_redirect
from safe_redirect import Record

from . import internals
from .conftest import (
    fork_call,
    lines_by_origin,
    run_all,
    run_python,
    seconds_a_child_writes_after_uninstall,
    wait_for,
    wait_pid,
)

FORK = multiprocessing.get_context("fork")


def _numbered_lines(rank: int, count: int) -> None:
    os.environ["RANK"] = str(rank)
    for i in range(count):
        print(f"c{rank} out {i}")
        print(f"c{rank} err {i}", file=sys.stderr)


@pytest.mark.timeout(180)
def test_eight_children_ten_thousand_lines_each_arrive_once_in_order_tagged() -> None:
    records: list[Record] = []
    callback_pids: set[int] = set()

    def on_output(record: Record) -> None:  # also notes which process runs the callback
        callback_pids.add(os.getpid())
        records.append(record)

    with safe_redirect.install(on_output=on_output) as session:
        print("master before")
        children = run_all([FORK.Process(target=_numbered_lines, args=(r, 10_000))
                            for r in range(8)], timeout=120)
        print("master after")
        assert session.flush(timeout=60)
        lanes_reclaimed = session.stats().lanes_reclaimed

    by_origin = lines_by_origin(records)
    for rank, child in enumerate(children):
        assert by_origin[(child.pid, "stdout")] == [f"c{rank} out {i}" for i in range(10_000)]
        assert by_origin[(child.pid, "stderr")] == [f"c{rank} err {i}" for i in range(10_000)]
        tags = {r.tag for r in records if r.pid == child.pid}
        assert tags == {f"[rank{rank}] "}
        assert {r.rank for r in records if r.pid == child.pid} == {rank}
    assert by_origin[(os.getpid(), "stdout")] == ["master before", "master after"]
    assert {r.tag for r in records if r.pid == os.getpid()} == {""}
    assert callback_pids == {os.getpid()}
    assert lanes_reclaimed >= 8


def test_os_fork_children_and_grandchildren_are_captured(capture) -> None:
    session, records = capture

    def grandchild() -> None:
        print(f"grandchild {os.getpid()}")

    def child() -> None:
        print(f"child {os.getpid()} before")
        gpid = fork_call(grandchild)
        assert wait_pid(gpid, 30) == 0
        print(f"child {os.getpid()} after, grandchild was {gpid}")

    pid = fork_call(child)
    assert wait_pid(pid, 60) == 0
    assert session.flush(timeout=30)
    by_origin = lines_by_origin(records)
    child_lines = by_origin[(pid, "stdout")]
    assert child_lines[0] == f"child {pid} before"
    gpid = int(child_lines[1].rsplit(" ", 1)[1])
    assert child_lines == [f"child {pid} before", f"child {pid} after, grandchild was {gpid}"]
    assert by_origin[(gpid, "stdout")] == [f"grandchild {gpid}"]
    assert {r.tag for r in records if r.pid == gpid} == {f"[pid{gpid}] "}


def _print_then_raise() -> None:
    print("about to fail")
    raise ZeroDivisionError("child failed on purpose")


def test_a_child_that_raises_still_has_its_lines_and_traceback_delivered(capture) -> None:
    session, records = capture
    child = FORK.Process(target=_print_then_raise)
    child.start()
    child.join(60)
    assert child.exitcode == 1
    assert session.flush(timeout=30)
    by_origin = lines_by_origin(records)
    assert by_origin[(child.pid, "stdout")] == ["about to fail"]
    err = "\n".join(by_origin[(child.pid, "stderr")])
    assert "Traceback" in err and "ZeroDivisionError: child failed on purpose" in err


def test_callbacks_never_run_in_a_child() -> None:
    r, w = os.pipe()

    def on_output(record: Record) -> None:
        os.write(w, f"{os.getpid()}\n".encode())

    with safe_redirect.install(on_output=on_output) as session:
        pids = [fork_call(lambda: [print(f"line {i}") for i in range(50)]) for _ in range(4)]
        assert all(wait_pid(pid, 60) == 0 for pid in pids)
        assert session.flush(timeout=30)
    os.close(w)
    seen = b""
    while chunk := os.read(r, 65536):
        seen += chunk
    os.close(r)
    callers = {int(x) for x in seen.split()}
    assert callers == {os.getpid()}


def _writer_thread(stop: threading.Event) -> None:
    while not stop.is_set():
        sys.stdout.write("master thread writing a line\n")


@pytest.mark.timeout(180)
def test_forks_while_another_thread_is_inside_a_hooked_write_never_hang_or_go_silent(
        capture) -> None:
    """wandb's console_capture leaves `_is_writing` set (or its lock held) in such a child."""
    session, records = capture
    stop = threading.Event()
    thread = threading.Thread(target=_writer_thread, args=(stop,))
    thread.start()
    try:
        pids = []
        for i in range(200):
            pids.append(fork_call(lambda i=i: print(f"child {i} speaks")))
            if len(pids) >= 8:
                assert wait_pid(pids.pop(0), 30) == 0
        for pid in pids:
            assert wait_pid(pid, 30) == 0
    finally:
        stop.set()
        thread.join(30)
    assert session.flush(timeout=60)
    spoken = [line for r in records if r.pid != os.getpid() for line in r.text.splitlines()]
    assert sorted(spoken) == sorted(f"child {i} speaks" for i in range(200))


def test_a_callback_slower_than_uninstall_ends_its_thread_quietly(capfd) -> None:
    """uninstall() gives up on a drain stuck in a callback and releases the segment: the drain
    thread, when the callback returns, ends without a traceback or a "drain pass failed"."""
    entered, release = threading.Event(), threading.Event()

    def stuck(record: Record) -> None:
        entered.set()
        release.wait(30)

    session = safe_redirect.install(on_output=stuck)
    print("one line")
    assert entered.wait(30)
    drain = [t for t in threading.enumerate() if t.name == "safe_redirect-drain"]
    print("another line")
    session.uninstall(timeout=0.2)
    release.set()
    for thread in drain:
        thread.join(30)
        assert not thread.is_alive()
    err = capfd.readouterr().err
    assert "final delivery timed out" in err
    assert "drain pass failed" not in err and "Traceback" not in err


def test_a_failing_callback_never_reaches_print_and_is_reported_once(capfd) -> None:
    calls = []

    def on_output(record: Record) -> None:
        calls.append(record)
        raise RuntimeError("callback broke")

    with safe_redirect.install(on_output=on_output) as session:
        print("first")
        assert session.flush(timeout=10)
        print("second")
        assert session.flush(timeout=10)
        stats = session.stats()
    assert len(calls) == 2
    assert stats.callback_errors == 2
    err = capfd.readouterr().err
    assert err.count("on_output raised") == 1
    assert "RuntimeError: callback broke" in err


def test_uninstall_restores_the_streams_and_is_idempotent() -> None:
    out, err = sys.stdout, sys.stderr
    before = {k: dict(vars(s)) for k, s in (("out", out), ("err", err))}
    records: list[Record] = []
    session = safe_redirect.install(on_output=records.append)
    assert internals.is_hook(vars(out)["write"])
    print("captured")
    session.uninstall()
    session.uninstall()
    print("not captured")
    assert session.flush() is True
    assert {k: dict(vars(s)) for k, s in (("out", out), ("err", err))} == before
    assert [r.text for r in records] == ["captured\n"]
    assert "uninstalled" in repr(session)


def test_a_hook_someone_wrapped_stays_as_a_pass_through() -> None:
    seen = []
    session = safe_redirect.install(on_output=lambda r: None)
    inner = sys.stdout.write

    def wrapper(text: str) -> int:
        seen.append(text)
        return inner(text)

    sys.stdout.write = wrapper
    try:
        session.uninstall()
        print("still works")
        assert "still works" in seen
        assert not internals.hook_feeds_a_lane(inner)
    finally:
        del sys.stdout.write


def test_a_write_of_a_non_string_raises_the_same_error_as_without_the_library() -> None:
    with pytest.raises(TypeError) as plain:
        sys.stdout.write(b"bytes")  # type: ignore[arg-type]
    with safe_redirect.install() as _session, pytest.raises(TypeError) as hooked:
        sys.stdout.write(b"bytes")  # type: ignore[arg-type]
    assert str(hooked.value) == str(plain.value)


def test_text_and_buffer_writes_are_captured_once_each(capture) -> None:
    session, records = capture
    sys.stdout.write("text layer\n")
    sys.stdout.flush()  # TextIOWrapper hands its bytes to buffer.write: not a second copy
    sys.stdout.buffer.write(b"buffer layer \xff\n")
    sys.stdout.buffer.flush()
    assert session.flush(timeout=10)
    text = "".join(r.text for r in records)
    assert text == "text layer\nbuffer layer \ufffd\n"


def test_invalid_utf8_from_a_child_arrives_as_replacement_characters(capture) -> None:
    session, records = capture

    def child() -> None:
        sys.stdout.buffer.write(b"ok \xc3\x28 \xff\n")
        sys.stdout.buffer.write("split ☃".encode()[:-1])
        sys.stdout.buffer.write("split ☃".encode()[-1:] + b"\n")

    assert wait_pid(fork_call(child), 30) == 0
    assert session.flush(timeout=10)
    lines = [line for r in records for line in r.text.splitlines()]
    assert lines == ["ok \ufffd( \ufffd", "split ☃"]


def test_a_huge_single_write_from_a_child_arrives_whole(capture) -> None:
    session, records = capture
    blob = "".join(f"{i:07d}" for i in range(1_500_000)) + "\n"  # 10.5 MB, ten lanes' worth

    def child() -> None:
        sys.stdout.write(blob)

    pid = fork_call(child)
    assert wait_pid(pid, 60) == 0
    assert session.flush(timeout=30)
    assert "".join(r.text for r in records if r.pid == pid) == blob
    assert session.stats().spilled_bytes == 0


def _pool_task(x: int) -> int:
    print(f"pool task {x}")
    return x * x


def test_pool_workers_are_captured(capture) -> None:
    session, records = capture
    with FORK.Pool(3) as pool:
        assert pool.map(_pool_task, range(30)) == [x * x for x in range(30)]
    assert session.flush(timeout=30)
    lines = [line for r in records if r.pid != os.getpid() for line in r.text.splitlines()]
    assert sorted(lines) == sorted(f"pool task {x}" for x in range(30))


_THREAD_WRITERS = {
    "write": lambda line: sys.stdout.write(line + "\n"),
    "print": print,  # the text and the newline are two writes: threads interleave between them
    "print-flush": lambda line: print(line, flush=True),  # a flush must not cut another's line
}


@pytest.mark.parametrize("how", sorted(_THREAD_WRITERS))
def test_threads_of_a_child_write_whole_lines(capture, how) -> None:
    session, records = capture
    write = _THREAD_WRITERS[how]

    def child() -> None:
        def spam(t: int) -> None:
            for i in range(1000):
                write(f"thread {t} line {i}")

        threads = [threading.Thread(target=spam, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    pid = fork_call(child)
    assert wait_pid(pid, 60) == 0
    assert session.flush(timeout=30)
    lines = lines_by_origin(records)[(pid, "stdout")]
    for t in range(4):
        assert [x for x in lines if x.startswith(f"thread {t} ")] == [
            f"thread {t} line {i}" for i in range(1000)]
    assert len(lines) == 4000


def test_flush_delivers_a_partial_line_of_a_live_child(capture) -> None:
    session, records = capture
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()

    def child() -> None:
        sys.stdout.write("Password: ")
        sys.stdout.flush()
        os.write(ready_w, b"1")
        os.read(go_r, 1)  # stay alive until the master has looked

    pid = fork_call(child)
    assert os.read(ready_r, 1) == b"1"
    assert session.flush(timeout=10)
    assert [r.text for r in records if r.pid == pid] == ["Password: "]
    os.write(go_w, b"1")
    assert wait_pid(pid, 30) == 0
    for fd in (go_r, go_w, ready_r, ready_w):
        os.close(fd)


def test_a_child_printing_after_uninstall_never_blocks() -> None:
    def after() -> None:
        sys.stdout.write("x" * 1_000_000 + "\n")  # 250 lanes' worth, nobody reading
        for i in range(10_000):
            print(f"after uninstall {i}")

    session = safe_redirect.install(on_output=lambda r: None, lane_bytes=4096)
    assert seconds_a_child_writes_after_uninstall(session, lambda: print("attached"), after) < 10


def test_block_policy_slows_writers_down_and_loses_nothing() -> None:
    records: list[Record] = []

    def slow(record: Record) -> None:
        time.sleep(0.0005)  # the behaviour under test: a master slower than its writer
        records.append(record)

    with safe_redirect.install(on_output=slow, lane_bytes=4096, overflow="block") as session:
        def child() -> None:
            for i in range(3000):
                print(f"block {i:05d} " + "b" * 60)

        pid = fork_call(child)
        assert wait_pid(pid, 120) == 0
        assert session.flush(timeout=60)
        stats = session.stats()
    lines = lines_by_origin(records)[(pid, "stdout")]
    assert lines == [f"block {i:05d} " + "b" * 60 for i in range(3000)]
    assert stats.spilled_bytes == 0


def test_spill_policy_never_waits_and_counts_every_byte_it_could_not_deliver(capfd) -> None:
    release = threading.Event()
    records: list[Record] = []

    def stuck(record: Record) -> None:
        release.wait(30)  # a master that does not read
        records.append(record)

    line = "s" * 99 + "\n"
    with safe_redirect.install(on_output=stuck, lane_bytes=4096, overflow="spill") as session:
        def child() -> None:
            for _ in range(2000):
                sys.stdout.write(line)

        t0 = time.monotonic()
        pid = fork_call(child)
        assert wait_pid(pid, 30) == 0
        assert time.monotonic() - t0 < 10
        release.set()
        assert session.flush(timeout=30)
        stats = session.stats()
    delivered = sum(len(r.text) for r in records if r.pid == pid)
    assert stats.spilled_bytes > 0
    assert delivered + stats.spilled_bytes == 2000 * len(line)
    assert "lane full" in capfd.readouterr().err


def test_block_policy_spills_once_the_master_stops_reading() -> None:
    release = threading.Event()

    def stuck(record: Record) -> None:
        release.wait(30)

    with safe_redirect.install(on_output=stuck, lane_bytes=4096, stall_timeout=0.3) as session:
        def child() -> None:
            for i in range(5000):
                print(f"stalled master {i} " + "x" * 80)

        t0 = time.monotonic()
        pid = fork_call(child)
        assert wait_pid(pid, 30) == 0
        elapsed = time.monotonic() - t0
        release.set()
        stats = session.stats()
    assert elapsed < 10  # one stall_timeout, then spills at once while the master is stuck
    assert stats.stalls >= 1
    assert stats.spilled_bytes > 0


def test_children_of_a_killed_master_fall_back_to_their_terminal(tmp_path) -> None:
    done = tmp_path / "child-done"
    script = f"""
        import os, signal, sys, time
        import safe_redirect
        # a master stuck in its callback: it never reads again
        session = safe_redirect.install(on_output=lambda r: time.sleep(60), lane_bytes=4096)
        print("master pid", os.getpid(), file=sys.stderr)
        pid = os.fork()
        if pid == 0:
            for i in range(20000):
                print("orphan line", i)
            open({str(done)!r}, "w").write("ok")
            os._exit(0)
        deadline = time.monotonic() + 30
        while session.stats().stalls < 1:  # until the child waits for room in its full lane
            if time.monotonic() > deadline:
                sys.exit("the child never filled its lane")
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    result = run_python(script, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    wait_for(done.exists, 30, "the orphaned child to finish (did it block?)")
    assert done.read_text() == "ok"
    assert "orphan line 19999" in result.stdout  # it kept writing to its terminal
    master_pid = int(result.stderr.split("master pid ")[1].split()[0])
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith(f"safe_redirect-{master_pid}-")]
    assert leaked == []  # the child that noticed the death removed the segment's name


def test_at_exit_the_final_drain_delivers_what_was_not_flushed(tmp_path) -> None:
    log = tmp_path / "log.txt"
    script = f"""
        import multiprocessing, sys
        import safe_redirect
        log = open({str(log)!r}, "w")
        safe_redirect.install(on_output=lambda r: (log.write(r.tag + r.text), log.flush()))

        def work():
            print("child line")
            sys.stdout.write("child partial")

        p = multiprocessing.get_context("fork").Process(target=work)
        p.start(); p.join()
        sys.stdout.write("master partial")
    """
    result = run_python(script, timeout=60)
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert "child line\n" in text and "child partial" in text and "master partial" in text


def test_the_terminal_shows_what_it_showed_without_safe_redirect() -> None:
    script = """
        import multiprocessing, sys
        if sys.argv[1] == "on":
            import safe_redirect
            safe_redirect.install(on_output=lambda r: None)

        def work(r):
            for i in range(100):
                print(f"child {r} line {i}")
                print(f"child {r} err {i}", file=sys.stderr)

        ps = [multiprocessing.get_context("fork").Process(target=work, args=(r,)) for r in range(4)]
        for p in ps: p.start()
        for p in ps: p.join()
        print("master done")
    """
    import subprocess
    import textwrap

    def run(flag: str) -> tuple[list[str], list[str]]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), flag],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        return sorted(done.stdout.splitlines()), sorted(done.stderr.splitlines())

    assert run("on") == run("off")


def test_children_beyond_the_lane_count_fall_back_and_are_counted(capfd) -> None:
    records: list[Record] = []
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()
    with safe_redirect.install(on_output=records.append, lanes=3) as session:
        def child(i: int) -> None:
            print(f"child {i}")  # into a lane, or to the terminal once no lane was free
            os.write(ready_w, b"1")
            os.read(release_r, 1)

        pids = [fork_call(child, i) for i in range(4)]  # the master holds one of the 3 lanes
        assert b"".join(os.read(ready_r, 1) for _ in pids) == b"1111"  # all printed, none left
        os.write(release_w, b"1111")
        assert all(wait_pid(pid, 60) == 0 for pid in pids)
        assert session.flush(timeout=30)
        stats = session.stats()
    delivered = [r.text for r in records if r.pid != os.getpid()]
    assert len(delivered) == 2 and stats.lane_misses >= 1
    assert "no free lane" in capfd.readouterr().err
    for fd in (release_r, release_w, ready_r, ready_w):
        os.close(fd)


def test_lanes_of_exited_children_are_reused() -> None:
    records: list[Record] = []
    with safe_redirect.install(on_output=records.append, lanes=2) as small:
        for i in range(20):  # one child lane, reclaimed after each child exits
            assert wait_pid(fork_call(lambda i=i: print(f"serial child {i}")), 30) == 0
            # the drain frees the lane of an exited child by itself (every reap interval)
            wait_for(lambda: small.stats().lanes_in_use == 1, 10, "the lane to be reclaimed")
        assert small.flush(timeout=10)
        stats = small.stats()
    assert sorted(r.text for r in records if r.pid != os.getpid()) == sorted(
        f"serial child {i}\n" for i in range(20))
    assert stats.lanes_reclaimed == 20 and stats.lane_misses == 0


def test_a_bad_configuration_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="overflow"):
        safe_redirect.install(overflow="drop")
    with pytest.raises(ValueError, match="unknown stream"):
        safe_redirect.install(streams=("stdin",))
    with pytest.raises(ValueError, match="lane_bytes"):
        safe_redirect.install(lane_bytes=5000)
    with pytest.raises(ValueError, match="unknown field"):
        safe_redirect.install(tag="[{nope}] ")
    with pytest.raises(ValueError, match="mode"):
        safe_redirect.install(mode="tty")


def test_stats_of_the_module_follow_the_active_session(capture) -> None:
    session, _ = capture
    print("counted")
    assert session.flush(timeout=10)
    stats = safe_redirect.stats()
    assert stats.records >= 1 and stats.delivered >= 1 and stats.lanes_in_use >= 1
    assert "records=" in str(stats)


def test_signals_kill_children_mid_write_without_losing_earlier_lines(capture) -> None:
    session, records = capture
    ready_r, ready_w = os.pipe()

    def child() -> None:
        for i in range(100):
            print(f"before kill {i}")
        os.write(ready_w, b"1")
        while True:
            sys.stdout.write("spinning\n")

    pid = fork_call(child)
    assert os.read(ready_r, 1) == b"1"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert session.flush(timeout=30)
    lines = lines_by_origin(records)[(pid, "stdout")]
    assert lines[:100] == [f"before kill {i}" for i in range(100)]
    assert set(lines[100:]) <= {"spinning"}
    os.close(ready_r)
    os.close(ready_w)


def test_at_exit_an_idle_child_does_not_hold_the_master_up() -> None:
    script = """
        import os, sys
        import safe_redirect
        safe_redirect.install(on_output=lambda r: None, exit_timeout=20)
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # an idle pool worker: alive and silent until the master is gone
            os.close(w)
            print("idle worker ready")  # it holds a lane from here on
            sys.stdout.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.write(ready_w, b"1")
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        os.read(ready_r, 1)
    """
    t0 = time.monotonic()
    result = run_python(script, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "idle worker ready" in result.stdout
    assert time.monotonic() - t0 < 10  # not the 20 s exit_timeout


def test_at_exit_children_still_printing_are_waited_for(tmp_path) -> None:
    log = tmp_path / "log.txt"
    script = f"""
        import os, time
        import safe_redirect
        log = open({str(log)!r}, "w")
        safe_redirect.install(on_output=lambda r: (log.write(r.text), log.flush()))
        ready_r, ready_w = os.pipe()
        if os.fork() == 0:
            for i in range(40):
                print(f"late child line {{i}}")
                if i == 0:
                    os.write(ready_w, b"1")
                time.sleep(0.01)  # the behaviour under test: a child that prints slowly
            os._exit(0)
        os.read(ready_r, 1)  # the master ends while its child still prints, without joining it
    """
    result = run_python(script, timeout=60)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [f"late child line {i}" for i in range(40)]


def test_threads_with_ranks_of_their_own_are_tagged_by_them(capture) -> None:
    session, records = capture

    def child() -> None:
        def rank_thread(rank: int) -> None:
            safe_redirect.set_thread_rank(rank)
            for i in range(100):
                print(f"thread rank {rank} line {i}")

        threads = [threading.Thread(target=rank_thread, args=(r,)) for r in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("the main thread has no rank")

    pid = fork_call(child)
    assert wait_pid(pid, 60) == 0
    assert session.flush(timeout=30)
    for rank in range(3):
        mine = [line for r in records if r.pid == pid and r.rank == rank
                for line in r.text.splitlines()]
        assert mine == [f"thread rank {rank} line {i}" for i in range(100)]
        assert {r.tag for r in records if r.pid == pid and r.rank == rank} == {f"[rank{rank}] "}
    plain = [r for r in records if r.pid == pid and r.rank is None]
    assert [r.text for r in plain] == ["the main thread has no rank\n"]
    assert plain[0].tag == f"[pid{pid}] "

"""The pytest plugin, proven on real pytest sessions (pytester, each in a subprocess): the capmp
fixture with forked, spawned and killed children, under plain pytest, `--forked` and `-n 2`, next to
pytest's own capture, the report section of a failing test, `--safe-redirect-all`.

Every inner session runs with `filterwarnings = error` and a conftest that fails a test which leaves
a segment, a hook, a session or SAFE_REDIRECT_ATTACH behind; children's lines carry their number, so
that a lost, doubled, misattributed or reordered line fails an assertion.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from . import internals

pytest_plugins = ["pytester"]

SECTION = "Captured output of child processes call"

RUNNERS = {"plain": (), "forked": ("--forked",), "xdist": ("-n", "2")}

# pytest-forked 1.7.5 itself: its test process opens sys.stdout / sys.stderr on files that pytest's
# capture then replaces without closing them (with or without safe_redirect). Python 3.14 words
# it "Exception ignored while finalizing file <...>", earlier ones "Exception ignored in: <...>".
FORKED_UNCLOSED_FILES = (r"ignore:Exception ignored (in.|while finalizing file) "
                         r"<_io.FileIO name='[^']*/std(out|err)'"
                         ":pytest.PytestUnraisableExceptionWarning")

INI = f"""
[pytest]
timeout = 60
filterwarnings =
    error
    {FORKED_UNCLOSED_FILES}
"""

HELPERS = '''
"""Shared by the inner test files: children that print numbered lines, bounded waits, a log of
which process ran what."""

import json
import os
import signal
import sys
import time


def fork_children(count, work):
    """Fork `count` children running work(k), wait for all (bounded); their pids, in order."""
    pids = []
    for k in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work(k)
            except BaseException:
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert wait_pid(pid) == 0
    return pids


def wait_pid(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} hung")


def ranked_lines(k, count, what):
    """A child of rank k (tagged [rank{k}]) prints `count` numbered lines on each stream."""
    os.environ["RANK"] = str(k)
    for i in range(count):
        print(f"{what} {k} out {i}")
        print(f"{what} {k} err {i}", file=sys.stderr)


def expected(k, count, what, kind, tag=None):
    tag = f"[rank{k}] " if tag is None else tag
    return [f"{tag}{what} {k} {kind} {i}" for i in range(count)]


def assert_ranked_children(text, children, count, what, kind):
    """Each child's lines exactly once, in order, tagged with its rank; nothing else tagged."""
    for k in range(children):
        tag = f"[rank{k}] "
        assert [line for line in text.splitlines() if line.startswith(tag)] == expected(
            k, count, what, kind)
    assert sum(line.startswith("[") for line in text.splitlines()) == children * count


def log_run(**fields):
    """One JSON line per event, appended by any process (xdist workers, forked tests)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(fields) + "\\n").encode())
    finally:
        os.close(fd)
'''

CONFTEST = '''
import os

import pytest

import internals
from helpers import log_run


def pytest_configure(config):
    log_run(event="configure", pid=os.getpid(), worker=os.environ.get("PYTEST_XDIST_WORKER"),
            attach=os.environ.get("SAFE_REDIRECT_ATTACH"))


def pytest_runtest_setup(item):
    log_run(event="test", name=item.name, pid=os.getpid(), ppid=os.getppid(),
            worker=os.environ.get("PYTEST_XDIST_WORKER"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    """After the test's fixtures are gone, nothing of safe_redirect may be left in this process."""
    result = yield
    shm = f"safe_redirect-{os.getpid()}-"
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(shm)]
    assert "SAFE_REDIRECT_ATTACH" not in os.environ
    assert internals.active_sessions() == []
    assert internals.hook_patches() == {}
    return result
'''


@pytest.fixture
def inner(pytester: pytest.Pytester) -> Callable[..., pytest.RunResult]:
    """Write test files next to the shared helpers; run pytest on them in a subprocess, bounded."""
    pytester.makefile(".ini", pytest=INI)
    pytester.makepyfile(helpers=HELPERS, conftest=CONFTEST,
                        internals=Path(internals.__file__).read_text())

    def run(files: dict[str, str], *args: str) -> pytest.RunResult:
        pytester.makepyfile(**{name: textwrap.dedent(code) for name, code in files.items()})
        # pytest-benchmark, where installed, warns under xdist
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:benchmark", "-rf",
                                             *args, timeout=100)

    return run


def runs(pytester: pytest.Pytester) -> list[dict[str, object]]:
    return [json.loads(line) for line in Path(pytester.path, "runs.jsonl").read_text().splitlines()]


def failure_blocks(lines: list[str]) -> dict[str, list[str]]:
    """The FAILURES part of a report, per test name."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        header = re.fullmatch(r"_{3,} (\S+) _{3,}", line)
        if header:
            current = blocks.setdefault(header.group(1), [])
        elif re.fullmatch(r"={3,} .* ={3,}", line):
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def section(block: list[str], title: str = SECTION) -> list[str]:
    """The body of the report section `title` in a failure block; [] if absent."""
    body: list[str] | None = None
    for line in block:
        if re.fullmatch(r"-{3,} .* -{3,}", line):
            if body is not None:
                break
            if re.fullmatch(rf"-{{3,}} {re.escape(title)} -{{3,}}", line):
                body = []
        elif body is not None:
            body.append(line)
    return body or []


def groups(body: list[str]) -> dict[str, list[str]]:
    """A section's lines per "pid N stream:" header; a header seen twice fails."""
    out: dict[str, list[str]] = {}
    current = None
    for line in body:
        if re.fullmatch(r"pid \d+ std(out|err):", line):
            assert line not in out, f"{line} appears twice: the section is not grouped"
            current = out[line] = []
        else:
            assert current is not None, f"a line before any process header: {line!r}"
            current.append(line)
    return out


def assert_ran_under(runner: str, events: list[dict[str, object]]) -> None:
    """The runner really did what it is named for."""
    configured = [e for e in events if e["event"] == "configure"]
    tests = [e for e in events if e["event"] == "test"]
    assert tests
    assert all(e["attach"] is None for e in configured)  # no process exported ours at start-up
    if runner == "plain":
        assert {e["pid"] for e in tests} == {configured[0]["pid"]}
    elif runner == "forked":
        assert len({e["pid"] for e in tests}) == len(tests)  # one process per test...
        assert {e["ppid"] for e in tests} == {configured[0]["pid"]}  # ...forked by pytest
    else:
        workers = {e["worker"] for e in configured}
        assert {e["worker"] for e in tests} <= workers and workers >= {"gw0", "gw1"}


FOUR_CHILDREN = {"test_four_children": '''
    import os
    import time

    import pytest

    from helpers import assert_ranked_children, fork_children, log_run, ranked_lines

    LINES = 100


    @pytest.mark.parametrize("round", range(3))
    def test_four_forked_children(capmp, round):
        started = time.time_ns()
        print(f"test process {round}")
        pids = fork_children(4, lambda k: ranked_lines(k, LINES, f"round {round} child"))
        out, err = capmp.readouterr()
        assert_ranked_children(out, 4, LINES, f"round {round} child", "out")
        assert_ranked_children(err, 4, LINES, f"round {round} child", "err")
        # the test's own line, untagged, once; nothing of another test (fresh in every process)
        assert out.splitlines().count(f"test process {round}") == 1
        assert len(out.splitlines()) == 4 * LINES + 1 and len(err.splitlines()) == 4 * LINES
        assert capmp.readouterr() == ("", "")  # since the last call

        per_process = capmp.by_process()
        assert set(per_process) == {os.getpid(), *pids}
        assert per_process[os.getpid()] == (f"test process {round}\\n", "")
        for k, pid in enumerate(pids):
            assert per_process[pid].out == "".join(
                f"round {round} child {k} out {i}\\n" for i in range(LINES))
            assert per_process[pid].err == "".join(
                f"round {round} child {k} err {i}\\n" for i in range(LINES))
        for record in capmp.records():
            assert record.time_ns >= started
            if record.pid != os.getpid():
                k = pids.index(record.pid)
                assert (record.rank, record.tag) == (k, f"[rank{k}] ")


    def test_fails_after_its_children_printed(capmp):
        pids = fork_children(2, lambda k: ranked_lines(k, 3, "failing child"))
        log_run(event="failing", children=pids)
        assert False, "fails on purpose"
'''}


@pytest.mark.parametrize("runner", RUNNERS)
def test_capmp_has_every_line_of_four_forked_children_and_a_failure_shows_them(
        inner, pytester, runner) -> None:
    result = inner(FOUR_CHILDREN, *RUNNERS[runner])
    result.assert_outcomes(passed=3, failed=1)
    events = runs(pytester)
    assert_ran_under(runner, events)

    # The failing test's report: the children's lines, tagged, grouped by process.
    children = next(e["children"] for e in events if e["event"] == "failing")
    assert isinstance(children, list)
    block = failure_blocks(result.stdout.lines)["test_fails_after_its_children_printed"]
    want = {}
    for k, pid in enumerate(children):
        for stream, kind in (("stdout", "out"), ("stderr", "err")):
            want[f"pid {pid} {stream}:"] = [
                f"[rank{k}] failing child {k} {kind} {i}" for i in range(3)]
    assert groups(section(block)) == want
    # passing tests show no section, as pytest shows no "Captured stdout call" for them
    assert sum(SECTION in line for line in result.stdout.lines) == 1


def test_show_capture_no_hides_the_section(inner) -> None:
    result = inner(FOUR_CHILDREN, "--show-capture=no", "-k", "fails")
    result.assert_outcomes(failed=1, deselected=3)
    assert "fails on purpose" in result.stdout.str()
    assert SECTION not in result.stdout.str()


SPAWNED = {"test_spawned": '''
    import multiprocessing
    import os
    import re
    import subprocess
    import sys

    import pytest


    def spawned_work(n):
        name = multiprocessing.current_process().name
        print(f"{name} out {n}")
        print(f"{name} err {n}", file=sys.stderr)


    # forkserver twice: the second test's children come from the forkserver started under the
    # first test's capture
    @pytest.mark.parametrize("round", [1, 2])
    @pytest.mark.parametrize("method", ["spawn", "forkserver"])
    def test_multiprocessing_children(capmp, method, round):
        context = multiprocessing.get_context(method)
        children = [context.Process(target=spawned_work, args=(n,)) for n in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
            assert child.exitcode == 0
        out, err = capmp.readouterr()
        for kind, text in (("out", out), ("err", err)):
            assert sorted(text.splitlines()) == sorted(
                f"[{child.name}] {child.name} {kind} {n}" for n, child in enumerate(children))


    SCRIPT = """
    import os, sys
    print("python subprocess", os.getpid())
    pid = os.fork()
    if pid == 0:
        print("its forked child", os.getpid())
        sys.stdout.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    print("python subprocess", os.getpid(), file=sys.stderr)
    """


    def test_a_python_subprocess_and_its_forked_child(capmp):
        subprocess.run([sys.executable, "-c", SCRIPT], check=True, timeout=60)
        out, err = capmp.readouterr()
        seen = {}
        for line in out.splitlines():
            tag_pid, what, printed_pid = re.fullmatch(r"\\[pid(\\d+)\\] (.+) (\\d+)", line).groups()
            assert tag_pid == printed_pid  # tagged with the pid of the process that printed it
            seen[what] = int(printed_pid)
        assert sorted(seen) == ["its forked child", "python subprocess"]
        assert len(out.splitlines()) == 2
        parent = seen["python subprocess"]
        assert err == f"[pid{parent}] python subprocess {parent}\\n"
'''}


def test_spawn_forkserver_and_subprocess_children_are_captured_tagged(inner) -> None:
    result = inner(SPAWNED)
    result.assert_outcomes(passed=5)


KILLED = {"test_killed": '''
    import multiprocessing
    import os
    import signal
    import sys
    import time

    import pytest


    def test_a_forked_child_killed_by_sigkill_after_printing(capmp):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["RANK"] = "7"
                for i in range(50):
                    print(f"doomed line {i}")
                print("doomed err", file=sys.stderr)
                print("a last line without its end", end="")
                os.write(ready_w, b"1")
                time.sleep(60)  # alive until the test kills it
            finally:
                os._exit(1)
        assert os.read(ready_r, 1) == b"1"
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        out, err = capmp.readouterr()
        assert out == "".join(f"[rank7] doomed line {i}\\n" for i in range(50)) + (
            "[rank7] a last line without its end")
        assert err == "[rank7] doomed err\\n"


    def killed_worker():
        print(f"{multiprocessing.current_process().name} prints, then dies")  # never flushed
        os.kill(os.getpid(), signal.SIGKILL)


    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_a_multiprocessing_child_killed_by_sigkill(capmp, method):
        child = multiprocessing.get_context(method).Process(target=killed_worker)
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL
        assert capmp.readouterr() == (f"[{child.name}] {child.name} prints, then dies\\n", "")
'''}


def test_children_killed_by_sigkill_after_printing_have_their_lines_delivered(inner) -> None:
    result = inner(KILLED)
    result.assert_outcomes(passed=3)


PROGRESS = {"test_progress": '''
    import os
    import sys

    from helpers import wait_pid


    def test_a_flushed_partial_line_of_a_child_never_shares_a_line(capmp):
        step_r, step_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["RANK"] = "0"
                print("progress 50%", end="", flush=True)
                os.write(step_w, b"1")
                os.read(go_r, 1)
                print(" 100%")
                sys.stdout.flush()
            finally:
                os._exit(0)
        assert os.read(step_r, 1) == b"1"
        capmp.records()  # the child's half line is delivered now, before the next line
        print("the test process writes a line meanwhile")
        capmp.records()
        os.write(go_w, b"1")
        assert wait_pid(pid) == 0
        assert capmp.readouterr().out == (
            "[rank0] progress 50%\\n"
            "the test process writes a line meanwhile\\n"
            "[rank0]  100%\\n")
        assert capmp.by_process()[pid].out == "progress 50% 100%\\n"
'''}


def test_a_flushed_partial_line_of_a_child_never_shares_a_line_with_another(inner) -> None:
    result = inner(PROGRESS)
    result.assert_outcomes(passed=1)


COOPERATION = {"test_cooperation": '''
    import os
    import sys

    import pytest

    from helpers import assert_ranked_children, expected, fork_children, ranked_lines, wait_pid

    OWN = "the test's own line"


    def run_children():
        print(OWN)
        print(OWN, file=sys.stderr)
        fork_children(2, lambda k: ranked_lines(k, 5, "child"))


    def assert_capmp_has_all(capmp):
        out, err = capmp.readouterr()
        assert_ranked_children(out, 2, 5, "child", "out")
        assert_ranked_children(err, 2, 5, "child", "err")
        assert out.splitlines().count(OWN) == 1 and len(out.splitlines()) == 11
        assert err.splitlines().count(OWN) == 1 and len(err.splitlines()) == 11


    def test_capmp_alone(capmp):
        run_children()
        assert_capmp_has_all(capmp)


    def test_capsys_then_capmp(capsys, capmp):
        run_children()
        # capsys: the test's own output, as without safe_redirect (children print into their
        # own copies of its buffer)
        assert capsys.readouterr() == (OWN + "\\n", OWN + "\\n")
        assert_capmp_has_all(capmp)


    def test_capmp_then_capsys(capmp, capsys):
        run_children()
        assert capsys.readouterr() == (OWN + "\\n", OWN + "\\n")
        assert_capmp_has_all(capmp)


    def untagged(kind):
        lines = [OWN] + [line[len("[rankN] "):] for k in range(2)
                         for line in expected(k, 5, "child", kind)]
        return sorted("".join(line + "\\n" for line in lines))


    def test_capfd_then_capmp(capfd, capmp):
        run_children()
        out, err = capfd.readouterr()
        # capfd: every byte of every process, untagged (and lines may interleave mid-line)
        assert (sorted(out), sorted(err)) == (untagged("out"), untagged("err"))
        assert_capmp_has_all(capmp)


    def test_capmp_then_capfd(capmp, capfd):
        run_children()
        out, err = capfd.readouterr()
        assert (sorted(out), sorted(err)) == (untagged("out"), untagged("err"))
        assert_capmp_has_all(capmp)


    @pytest.fixture
    def child_of_a_fixture():
        """A child forked during setup that prints when the test says so, like a pool worker."""
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["RANK"] = "5"
                os.read(go_r, 1)
                print("a child of a fixture prints during the call")
                sys.stdout.flush()
            finally:
                os._exit(0)

        def go():
            os.write(go_w, b"1")
            assert wait_pid(pid) == 0

        yield go
        os.close(go_r)
        os.close(go_w)


    def test_capmp_capsys_and_a_child_forked_during_setup(capmp, capsys, child_of_a_fixture):
        child_of_a_fixture()
        assert capsys.readouterr() == ("", "")
        assert capmp.readouterr() == ("[rank5] a child of a fixture prints during the call\\n", "")
'''}


@pytest.mark.parametrize("capture", ["--capture=fd", "--capture=sys", "-s"])
def test_capmp_cooperates_with_pytest_capture_capsys_and_capfd(inner, capture) -> None:
    result = inner(COOPERATION, capture)
    result.assert_outcomes(passed=6)


EVERY_TEST = {"test_every": '''
    from helpers import fork_children, ranked_lines


    def test_first_fails():
        fork_children(2, lambda k: ranked_lines(k, 3, "first test child"))
        assert False


    def test_second_fails():
        fork_children(2, lambda k: ranked_lines(k, 3, "second test child"))
        assert False


    def test_passes_and_reads_the_capture(request):
        capmp = request.getfixturevalue("capmp")  # with --safe-redirect-all: the one running
        fork_children(1, lambda k: ranked_lines(k, 2, "third test child"))
        out, err = capmp.readouterr()
        assert out == "[rank0] third test child 0 out 0\\n[rank0] third test child 0 out 1\\n"
        assert err == "[rank0] third test child 0 err 0\\n[rank0] third test child 0 err 1\\n"
'''}


@pytest.mark.parametrize("runner", RUNNERS)
def test_safe_redirect_all_attributes_child_output_to_the_test_that_started_it(
        inner, pytester, runner) -> None:
    result = inner(EVERY_TEST, "--safe-redirect-all", *RUNNERS[runner])
    result.assert_outcomes(passed=1, failed=2)
    assert_ran_under(runner, runs(pytester))
    blocks = failure_blocks(result.stdout.lines)
    for which in ("first", "second"):
        lines = [line for group in groups(section(blocks[f"test_{which}_fails"])).values()
                 for line in group]
        assert sorted(lines) == sorted(f"[rank{k}] {which} test child {k} {kind} {i}"
                                       for k in range(2) for kind in ("out", "err")
                                       for i in range(3))


def test_without_safe_redirect_all_a_test_without_capmp_gets_no_section(inner) -> None:
    result = inner(EVERY_TEST)
    result.assert_outcomes(passed=1, failed=2)
    assert "Captured output of child processes" not in result.stdout.str()
    assert "first test child 0 out 0" in result.stdout.str()  # pytest's own fd capture: untagged


UNUSED = {"test_unused": '''
    import os
    import sys

    import internals
    from helpers import fork_children


    def test_a_test_without_capmp_runs_as_without_the_plugin(capfd):
        assert "SAFE_REDIRECT_ATTACH" not in os.environ
        assert internals.active_sessions() == []
        for stream in (sys.stdout, sys.stderr, sys.stdout.buffer, sys.stderr.buffer):
            assert not [v for v in vars(stream).values() if internals.is_hook(v)]
        fork_children(1, lambda k: print("plain child"))
        assert capfd.readouterr() == ("plain child\\n", "")
'''}


def test_loaded_but_unused_the_plugin_changes_nothing(inner) -> None:
    result = inner(UNUSED, "--trace-config")
    result.assert_outcomes(passed=1)
    assert re.search(r"registered.*safe_redirect\.pytest_plugin", result.stdout.str())


def test_p_no_safe_redirect_turns_the_plugin_off(inner) -> None:
    result = inner(FOUR_CHILDREN, "-p", "no:safe_redirect", "-k", "fails")
    result.assert_outcomes(errors=1, deselected=3)
    assert "fixture 'capmp' not found" in result.stdout.str()

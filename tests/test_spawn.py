"""Spawned interpreters attach by themselves: multiprocessing spawn and forkserver, Pools,
`subprocess` running python, and their children."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import safe_redirect
from safe_redirect import Record, spawn

from . import internals
from .conftest import lines_by_origin, run_all


def _spawned_work(n: int) -> None:
    print(f"spawned {n} out")
    print(f"spawned {n} err", file=sys.stderr)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_children_of_every_start_method_are_captured(capture, method) -> None:
    session, records = capture
    context = multiprocessing.get_context(method)
    children = run_all([context.Process(target=_spawned_work, args=(n,)) for n in range(3)])
    assert session.flush(timeout=30)
    by_origin = lines_by_origin(records)
    for n, child in enumerate(children):
        assert by_origin[(child.pid, "stdout")] == [f"spawned {n} out"]
        assert by_origin[(child.pid, "stderr")] == [f"spawned {n} err"]
        assert {r.tag for r in records if r.pid == child.pid} == {f"[{child.name}] "}


def _square(x: int) -> int:
    print(f"pool square {x}")
    return x * x


def test_a_spawn_pool_is_captured(capture) -> None:
    session, records = capture
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_square, range(20)) == [x * x for x in range(20)]
    assert session.flush(timeout=30)
    lines = sorted(line for r in records if r.pid != os.getpid() for line in r.text.splitlines())
    assert lines == sorted(f"pool square {x}" for x in range(20))


def test_a_python_subprocess_and_its_own_children_are_captured(capture) -> None:
    session, records = capture
    script = textwrap.dedent("""
        import os, subprocess, sys
        print("subprocess", os.getpid())
        pid = os.fork()
        if pid == 0:
            print("its forked child", os.getpid())
            os._exit(0)
        os.waitpid(pid, 0)
        subprocess.run([sys.executable, "-c", "import os; print('grandchild', os.getpid())"],
                       check=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert session.flush(timeout=30)
    pids = {}
    for record in records:
        for line in record.text.splitlines():
            what, pid = line.rsplit(" ", 1)
            pids[what] = (int(pid), record.pid)
    assert set(pids) == {"subprocess", "its forked child", "grandchild"}
    for what, (printed, recorded) in pids.items():
        assert printed == recorded, what  # every process has a lane of its own
    assert "subprocess" in done.stdout  # the terminal (here: the pipe) still gets everything


def test_a_forkserver_started_in_one_session_does_not_swallow_the_next_sessions_children(
        ) -> None:
    """A forkserver outlives the session it started under; each request carries the session of
    its moment, so the next session's children attach to the next, through the same server."""
    context = multiprocessing.get_context("forkserver")
    servers = set()
    for round_ in range(2):
        records: list[Record] = []
        with safe_redirect.install(on_output=records.append) as session:
            (child,) = run_all([context.Process(target=_spawned_work, args=(round_,))])
            assert session.flush(timeout=30)
        assert lines_by_origin(records)[(child.pid, "stdout")] == [f"spawned {round_} out"]
        servers.add(spawn.forkserver_pid())
    assert len(servers) == 1 and None not in servers  # the user's: never stopped nor restarted


def _bare_fork_tags() -> None:
    pid = os.fork()
    if pid == 0:
        print("bare fork of a multiprocessing child")
        sys.stdout.flush()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    print("multiprocessing child")


def test_a_bare_fork_of_a_multiprocessing_child_is_not_tagged_with_its_parents_name(
        capture) -> None:
    session, records = capture
    (child,) = run_all([multiprocessing.get_context("fork").Process(target=_bare_fork_tags)])
    assert session.flush(timeout=30)
    tags = {r.text: (r.pid, r.tag) for r in records if r.pid != os.getpid()}
    assert tags["multiprocessing child\n"] == (child.pid, f"[{child.name}] ")
    grandchild_pid, tag = tags["bare fork of a multiprocessing child\n"]
    assert tag == f"[pid{grandchild_pid}] " and grandchild_pid != child.pid


def test_processes_spawned_after_uninstall_run_uncaptured() -> None:
    records: list[Record] = []
    with safe_redirect.install(on_output=records.append) as session:
        assert spawn.ENV_VAR in os.environ
        name = internals.segment_name(session)
    assert spawn.ENV_VAR not in os.environ
    assert not Path("/dev/shm", name).exists()
    done = subprocess.run([sys.executable, "-c", "print('free')"], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout == "free\n" and done.stderr == ""


def test_a_stale_attach_variable_does_not_break_start_up() -> None:
    env = dict(os.environ)
    env[spawn.ENV_VAR] = spawn.AttachInfo("safe_redirect-1-gone", 1, 1, "wrap",
                                          ("stdout",), "block", 1.0).encode()
    done = subprocess.run([sys.executable, "-c", "print('still runs')"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0 and done.stdout == "still runs\n"
    assert done.stderr == ""


def test_nested_sessions_hand_the_innermost_to_spawned_processes() -> None:
    with safe_redirect.install() as outer:
        outer_value = os.environ[spawn.ENV_VAR]
        assert internals.segment_name(outer) in outer_value
        with safe_redirect.install() as inner:
            assert os.environ[spawn.ENV_VAR] != outer_value
            assert internals.segment_name(inner) in os.environ[spawn.ENV_VAR]
        assert os.environ[spawn.ENV_VAR] == outer_value


def test_the_shipped_pth_is_the_one_install_writes() -> None:
    shipped = Path(__file__).resolve().parent.parent / "safe_redirect.pth"
    assert shipped.read_text() == spawn.PTH_LINE
    assert spawn.PTH_LINE.startswith("import ")  # site.py executes only lines starting so


def test_ensure_pth_writes_it_where_it_is_missing(tmp_path, monkeypatch) -> None:
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    writable = tmp_path / "site"
    writable.mkdir()
    internals.patch_site_dirs(monkeypatch, lambda: [str(readonly), str(writable)])
    if os.access(readonly, os.W_OK):  # root ignores permissions
        internals.patch_site_dirs(monkeypatch, lambda: [str(writable)])
    path = spawn.ensure_pth()
    assert path == str(writable / spawn.PTH_NAME)
    assert Path(path).read_text() == spawn.PTH_LINE
    assert spawn.ensure_pth() == path  # found, not written again
    internals.patch_site_dirs(monkeypatch, lambda: [str(tmp_path / "missing")])
    assert spawn.ensure_pth() is None

"""A multiprocessing forkserver is the user's: one long-lived process that outlives sessions. Its
children attach per request to the session current in the requesting process; the session never
stops or restarts it. Each scenario runs in a fresh interpreter (a forkserver of its own, a real
terminal pipe), reporting what it saw as JSON on the last line of stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from safe_redirect import spawn

from .conftest import run_python_file

WAITING_AT_UNINSTALL = """
import json, multiprocessing, os, sys, time
import safe_redirect

def child(n, printed, go):
    print(f"child {n} before")
    sys.stdout.flush()
    printed.release()
    go.wait(60)
    print(f"child {n} after")
    sys.exit(10 + n)

if __name__ == "__main__":
    mode, method = sys.argv[1:]
    context = multiprocessing.get_context(method)
    records = []
    session = safe_redirect.install(on_output=records.append, mode=mode)
    printed, go = context.Semaphore(0), context.Event()
    children = [context.Process(target=child, args=(n, printed, go)) for n in range(3)]
    for c in children:
        c.start()
    for c in children:
        assert printed.acquire(timeout=60)
    started = time.monotonic()
    session.uninstall(timeout=5)
    took = time.monotonic() - started
    alive = [c.is_alive() for c in children]
    go.set()
    for c in children:
        c.join(60)
    print("master after", flush=True)
    print(json.dumps({"took": took, "alive": alive, "codes": [c.exitcode for c in children],
                      "lines": sorted(r.text for r in records if r.pid != os.getpid())}),
          file=sys.stderr)
"""


def _report(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stderr.strip().splitlines()[-1])
    return report


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["forkserver", "fork"])
@pytest.mark.parametrize("mode", ["wrap", "fd"])
def test_children_waiting_at_uninstall_keep_running_and_their_exit_codes(tmp_path, mode,
                                                                         method) -> None:
    """uninstall() returns within its bound while the children still wait; each child's exit
    code is its own (not 255 from a stopped forkserver); what they printed before is delivered
    (fd mode: also what their pumps had not read yet), what they print after reaches the
    terminal."""
    result = run_python_file(tmp_path / "main.py", WAITING_AT_UNINSTALL, 150,
                             args=(mode, method))
    report = _report(result)
    assert report["alive"] == [True, True, True]  # uninstall() did not wait for them
    assert report["took"] < 5 + 2  # its own bound, and some slack for a loaded machine
    assert report["codes"] == [10, 11, 12]
    assert report["lines"] == [f"child {n} before\n" for n in range(3)]
    for n in range(3):
        assert f"child {n} before" in result.stdout
        assert f"child {n} after" in result.stdout
    # every character once on the terminal, newlines included. Not line by line: with unbuffered
    # stdout (PYTHONUNBUFFERED=1) print makes two writes, and two processes' lines can splice,
    # as they do without safe_redirect.
    written = [f"child {n} {when}\n" for n in range(3) for when in ("before", "after")]
    assert sorted(result.stdout) == sorted("".join(written) + "master after\n")
    assert "Traceback" not in result.stderr


SESSIONS = """
import json, multiprocessing, os, sys
from multiprocessing import forkserver
import safe_redirect

def child(label):
    print(f"{label} in", os.getpid())
    sys.stdout.flush()

def run_child(context, label):
    process = context.Process(target=child, args=(label,))
    process.start()
    process.join(60)
    assert process.exitcode == 0, process.exitcode
    return process.pid

if __name__ == "__main__":
    mode, started = sys.argv[1:]
    context = multiprocessing.get_context("forkserver")
    seen = {}
    if started == "before":
        run_child(context, "before install")  # starts the forkserver
    for round_ in range(2):
        records = []
        with safe_redirect.install(on_output=records.append, mode=mode) as session:
            pid = run_child(context, f"session {round_}")
            assert session.flush(timeout=30)
        seen[f"session {round_}"] = {
            "pid": pid, "server": forkserver._forkserver._forkserver_pid,
            "lines": [(r.pid, r.text) for r in records if r.pid != os.getpid()]}
    run_child(context, "after")
    seen["server after"] = server = forkserver._forkserver._forkserver_pid
    with open(f"/proc/{server}/maps") as maps:  # imported once there, not in every child
        # (the C core: the one shared object in the package's directory)
        seen["server imported the capture"] = "/safe_redirect/" in maps.read()
    seen["server on the terminal"] = all(  # not left on a pipe of the first session's master
        os.stat(f"/proc/{server}/fd/{fd}").st_ino == os.fstat(fd).st_ino for fd in (1, 2))
    print(json.dumps(seen), file=sys.stderr)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("started", ["before", "in the first session"])
@pytest.mark.parametrize("mode", ["wrap", "fd"])
def test_one_forkserver_serves_each_session_its_own_children(tmp_path, mode, started) -> None:
    """The same forkserver process (pid unchanged) through two sessions: each session gets its
    own children's lines, never the other's; a forkserver started before install() is captured
    too, and its children after the last session run uncaptured."""
    result = run_python_file(tmp_path / "main.py", SESSIONS, 150, args=(mode, started))
    seen = _report(result)
    servers = {seen["session 0"]["server"], seen["session 1"]["server"], seen["server after"]}
    assert len(servers) == 1 and None not in servers  # never stopped nor restarted
    assert seen["server on the terminal"]
    assert seen["server imported the capture"] == (started != "before")
    for round_ in range(2):
        session = seen[f"session {round_}"]
        assert session["lines"] == [[session["pid"], f"session {round_} in {session['pid']}\n"]]
    labels = ["session 0", "session 1", "after"] + (["before install"] if started == "before"
                                                     else [])
    for label in labels:
        assert result.stdout.count(f"{label} in ") == 1  # the terminal gets each once
    assert "safe_redirect:" not in result.stderr  # no warning


AFTER_ENV = """
import multiprocessing, os, sys
import safe_redirect

def child(queue):
    queue.put(os.environ.get("SAFE_REDIRECT_ATTACH"))

if __name__ == "__main__":
    context = multiprocessing.get_context("forkserver")
    queue = context.SimpleQueue()
    with safe_redirect.install():
        exported = os.environ["SAFE_REDIRECT_ATTACH"]  # names this session's segment
        process = context.Process(target=child, args=(queue,))
        process.start()
        inside = queue.get()
        process.join(60)
    process = context.Process(target=child, args=(queue,))
    process.start()
    after = queue.get()
    process.join(60)
    print(inside == exported, after, file=sys.stderr)
"""


@pytest.mark.timeout(120)
def test_a_forkserver_childs_environment_names_the_session_of_its_request(tmp_path) -> None:
    """The forkserver's environment is that of the moment it started; a child's own spawned
    processes follow the session its request was made under instead."""
    result = run_python_file(tmp_path / "main.py", AFTER_ENV, 100)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "True None"


WANDB = """
import multiprocessing, os, sys, time
import safe_redirect

def work(rank, printed, go):
    os.environ["RANK"] = str(rank)
    for i in range(5):
        print(f"child {rank} line {i}")
    sys.stdout.flush()
    printed.release()
    go.wait(60)
    print(f"child {rank} after finish")
    sys.exit(20 + rank)

if __name__ == "__main__":
    safe_redirect.patch_wandb()
    import wandb
    context = multiprocessing.get_context("forkserver")
    run = wandb.init(mode="offline", project="safe-redirect-test",
                     settings=wandb.Settings(console=sys.argv[1]))
    printed, go = context.Semaphore(0), context.Event()
    children = [context.Process(target=work, args=(r, printed, go)) for r in range(3)]
    for child in children:
        child.start()
    for child in children:
        assert printed.acquire(timeout=60)
    run.finish()
    alive = [child.is_alive() for child in children]
    go.set()
    for child in children:
        child.join(60)
    print(alive, [child.exitcode for child in children], file=sys.stderr)
    print(run.settings.files_dir, file=sys.stderr)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("console", ["wrap", "redirect"])
def test_wandb_finish_returns_while_forkserver_children_wait(tmp_path, console) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")
    result = run_python_file(tmp_path / "train.py", WANDB, 240, args=(console,), cwd=tmp_path,
                             env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    *_, verdict, files_dir = result.stderr.strip().splitlines()
    assert verdict == "[True, True, True] [20, 21, 22]"  # finish() did not wait for them
    with open(f"{files_dir}/output.log", encoding="utf-8") as log:
        lines = log.read().splitlines()
    for rank in range(3):
        assert [x for x in lines if x.startswith(f"[rank{rank}] ")] == [
            f"[rank{rank}] child {rank} line {i}" for i in range(5)]
        assert f"child {rank} after finish" in result.stdout


def test_the_hand_over_is_installed_once_and_rides_only_in_forkserver_requests() -> None:
    import multiprocessing.spawn as mp_spawn
    import pickle

    spawn.hand_over_to_forkserver_children()
    patched = mp_spawn.get_preparation_data
    spawn.hand_over_to_forkserver_children()
    assert mp_spawn.get_preparation_data is patched  # idempotent: never wrapped twice
    data = mp_spawn.get_preparation_data("worker")
    assert spawn.HAND_OVER_KEY in data
    # a spawn request (or any other pickling) carries None; spawn children attach by their
    # environment
    assert pickle.loads(pickle.dumps(data[spawn.HAND_OVER_KEY])) is None
    assert not spawn.is_forkserver()


FLAT_OUT = """
import multiprocessing, os, sys, time
import safe_redirect

def chatter(started):
    started.set()
    while True:
        os.write(1, b"x" * 100 + b"\\\\n")

if __name__ == "__main__":
    context = multiprocessing.get_context(sys.argv[1])
    records = []
    session = safe_redirect.install(on_output=records.append, mode="fd")
    started = context.Event()
    child = context.Process(target=chatter, args=(started,), daemon=True)
    child.start()
    assert started.wait(60)
    deadline = time.monotonic() + 60
    while not records and time.monotonic() < deadline:  # its lines reach us: it is flat out
        time.sleep(0.001)
    t0 = time.monotonic()
    session.uninstall(timeout=30)
    took = time.monotonic() - t0
    child.kill()
    child.join(60)
    print("master done")
    print(took, len(records) > 0, file=sys.stderr)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["forkserver", "fork"])
def test_uninstall_does_not_wait_for_a_child_printing_flat_out(tmp_path, method) -> None:
    """fd mode waits for what children's pumps have not read yet, not for their pipes to stay
    empty: a child that never stops printing does not use up uninstall()'s timeout."""
    result = run_python_file(tmp_path / "main.py", FLAT_OUT, 150, args=(method,))
    assert result.returncode == 0, result.stderr[-3000:]
    took, captured = result.stderr.strip().splitlines()[-1].split()
    assert float(took) < 15 and captured == "True"  # far below the 30 s it was given


@pytest.mark.parametrize(("args", "expected"), [
    # 3.11 to 3.13
    (["-c", "from multiprocessing.forkserver import main; import sys; CHECK"], True),
    # 3.14: the command imports sys first, and the parent's arguments follow it
    (["-c", "import sys; from multiprocessing.forkserver import main; CHECK", "--lr", "3"], True),
    (["-c", "CHECK"], False),
    (["-u", "-c", "CHECK", "-c", "from multiprocessing.forkserver import main"], False),
])
def test_a_forkserver_is_known_by_its_command_line(args, expected) -> None:
    check = "from safe_redirect.spawn import is_forkserver; print(is_forkserver())"
    args = [arg.replace("CHECK", check) for arg in args]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(expected), done.stderr

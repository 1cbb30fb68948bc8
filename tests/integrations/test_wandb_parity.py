"""Parity with wandb alone: however a run ends, and wandb's callback / capture contract.

Each script runs twice, on wandb alone and patched (SAFE_REDIRECT_PATCH=wandb, as a user turns the
patch on without touching the code), and the two must agree on what wandb alone does; patched,
the children's lines land as well. wandb 0.31 offline, real processes and real signals.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from safe_redirect.spawn import ensure_pth

from ..conftest import run_python, run_python_file

wandb = pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")

pytest_plugins = ["pytester"]


def run_script(tmp_path: Path, code: str, patched: bool, *args: str, timeout: float = 240,
               name: str = "script.py"):
    env = {k: v for k, v in os.environ.items() if k != "SAFE_REDIRECT_PATCH"}
    if patched:
        env["SAFE_REDIRECT_PATCH"] = "wandb"
        assert ensure_pth() is not None  # the start-up hook that reads it
    where = tmp_path / ("patched" if patched else "alone")
    where.mkdir(exist_ok=True)
    return run_python_file(where / name, code, timeout, args=args, cwd=where, env=env)


def output_log(result) -> list[str]:
    (files_dir,) = re.findall(r"^FILES_DIR=(.*)$", result.stderr, flags=re.MULTILINE)
    return Path(files_dir, "output.log").read_text(encoding="utf-8").splitlines()


def report(result) -> dict:
    (line,) = re.findall(r"^REPORT=(.*)$", result.stderr, flags=re.MULTILINE)
    return json.loads(line)


# -- however a run ends, every line lands

ENDINGS_SCRIPT = """
import multiprocessing, os, signal, sys, time
import wandb

WORKERS, LINES = 3, 40

def work(rank):
    os.environ["RANK"] = str(rank)
    for i in range(LINES):
        print(f"worker {rank} line {i}")
    sys.stdout.flush()

def start_workers(method):
    context = multiprocessing.get_context(method)
    children = [context.Process(target=work, args=(r,)) for r in range(WORKERS)]
    for child in children:
        child.start()
    for child in children:
        child.join()
        assert child.exitcode == 0, child.exitcode

def files_dir(run):
    print("FILES_DIR=" + run.settings.files_dir, file=sys.stderr)

if __name__ == "__main__":
    ending, method, console = sys.argv[1:]
    settings = wandb.Settings(console=console)
    if ending == "with":
        with wandb.init(mode="offline", project="endings", settings=settings) as run:
            print("master before")
            start_workers(method)
            print("master after")
    elif ending == "raise":
        try:
            with wandb.init(mode="offline", project="endings", settings=settings) as run:
                print("master before")
                start_workers(method)
                print("master after")
                raise ValueError("raised inside the block")
        except ValueError:
            pass
    elif ending == "interrupt":  # a real SIGINT, as Ctrl-C sends
        try:
            with wandb.init(mode="offline", project="endings", settings=settings) as run:
                print("master before")
                start_workers(method)
                print("master after")
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)
        except KeyboardInterrupt:
            pass
    elif ending == "wandb.finish":
        run = wandb.init(mode="offline", project="endings", settings=settings)
        print("master before")
        start_workers(method)
        print("master after")
        wandb.finish()
    elif ending == "exit":  # no finish at all: the interpreter's exit ends the run
        run = wandb.init(mode="offline", project="endings", settings=settings)
        files_dir(run)
        print("master before")
        start_workers(method)
        print("master after")
        sys.exit(0)
    elif ending == "interrupt-exit":  # Ctrl-C outside any block ends the program
        run = wandb.init(mode="offline", project="endings", settings=settings)
        files_dir(run)
        print("master before")
        start_workers(method)
        print("master after")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    files_dir(run)
"""

MASTER_LINES = ["master before", "master after"]


def worker_lines(lines: list[str]) -> list[str]:
    return [x for x in lines if re.fullmatch(r"\[rank\d\] worker \d line \d+", x)]


def expected_worker_lines() -> list[str]:
    return sorted(f"[rank{r}] worker {r} line {i}" for r in range(3) for i in range(40))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("ending", ["with", "raise", "interrupt"])
def test_every_line_lands_however_the_with_block_ends(tmp_path, ending, method) -> None:
    """`with wandb.init() as run:` ends through `Run.__exit__` -> `Run._finish` (not `finish`):
    the lanes are delivered there. wandb alone logs the master's lines; patched, the same and every
    worker's line, once."""
    alone = run_script(tmp_path, ENDINGS_SCRIPT, False, ending, method, "wrap")
    patched = run_script(tmp_path, ENDINGS_SCRIPT, True, ending, method, "wrap")
    for result in (alone, patched):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "timed out" not in result.stderr
    for line in MASTER_LINES:
        assert line in output_log(alone)
        assert output_log(patched).count(line) == 1
    assert sorted(worker_lines(output_log(patched))) == expected_worker_lines()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("console", "method"), [("wrap", "fork"), ("wrap", "spawn"),
                                                 ("wrap_emu", "fork"), ("redirect", "fork")])
@pytest.mark.parametrize("ending", ["with", "wandb.finish", "exit", "interrupt-exit"])
def test_every_line_lands_whatever_ends_the_run(tmp_path, ending, console, method) -> None:
    """`wandb.finish()`, the interpreter's exit without a finish, and a KeyboardInterrupt that
    ends the program, in every console mode: the patched log holds what wandb alone logs of the
    master, and every worker's line."""
    alone = run_script(tmp_path, ENDINGS_SCRIPT, False, ending, method, console)
    patched = run_script(tmp_path, ENDINGS_SCRIPT, True, ending, method, console)
    assert alone.returncode == patched.returncode, (alone.stderr[-2000:], patched.stderr[-2000:])
    assert "timed out" not in patched.stderr
    logged_alone = {x for x in MASTER_LINES if x in output_log(alone)}
    logged_patched = {x for x in MASTER_LINES if x in output_log(patched)}
    assert logged_alone <= logged_patched
    logged_workers = worker_lines(output_log(patched))
    assert len(logged_workers) == len(set(logged_workers))  # each once
    if console == "wrap" or "exit" not in ending:
        assert logged_patched == set(MASTER_LINES)
        assert sorted(logged_workers) == expected_worker_lines()
    else:
        # At the interpreter's exit wandb never closes output.log's writer in wrap_emu and
        # redirect (alone, it logs none of the master's lines there): the writer holds back the
        # last line it was given (a `\r` may follow), which stays unwritten.
        assert len(set(expected_worker_lines()) - set(logged_workers)) <= 1
        assert len(set(MASTER_LINES) - logged_patched) + len(
            set(expected_worker_lines()) - set(logged_workers)) <= 1


@pytest.mark.timeout(120)
def test_the_ending_method_is_wrapped_and_unwrapped() -> None:
    """wandb 0.31: `Run._finish` (every ending's path) delivers first; unpatch puts it back."""
    code = """
        import sys
        import safe_redirect
        from wandb.sdk import wandb_run
        original = wandb_run.Run._finish
        safe_redirect.patch_wandb()
        wrapped = wandb_run.Run._finish
        safe_redirect.unpatch_wandb()
        print(wrapped is not original, wrapped.__wrapped__ is original,
              wandb_run.Run._finish is original, file=sys.stderr)
    """
    result = run_python(code, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "True True True"


# -- callbacks: wandb's console_capture contract

CALLBACK_RAISES_SCRIPT = """
import json, sys, time
import wandb
from wandb.sdk.lib import console_capture

kind = sys.argv[1]
calls = []

def raises(text, written):
    calls.append(text)
    raise {"interrupt": KeyboardInterrupt, "exit": SystemExit, "error": ValueError}[kind]()

later = []
console_capture.capture_stdout(raises)
reached_the_writer = None
try:
    sys.stdout.write("first\\n")
    sys.stdout.flush()
    for _ in range(300):  # patched, the callback runs on the drain thread: give it time
        time.sleep(0.01)
except (KeyboardInterrupt, SystemExit) as exc:
    reached_the_writer = type(exc).__name__
print("second: no callback left")
remove = console_capture.capture_stdout(lambda text, written: later.append(text))
print("third: a callback added since")
remove()
print("REPORT=" + json.dumps({"calls": calls, "reached": reached_the_writer,
                              "later": "".join(later)}), file=sys.stderr)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["interrupt", "exit", "error"])
def test_a_callback_that_raises_is_removed_and_the_capture_goes_on(tmp_path, kind) -> None:
    """wandb removes every callback once one raises anything. Patched, the drain thread lives
    on: a callback added later gets its lines, and the exit does not wait for a dead drain.
    By design, a KeyboardInterrupt / SystemExit raised on the drain thread is reported, not
    raised into the program (alone it comes out of the `write()` that ran the callback)."""
    results = {}
    for patched in (False, True):
        result = run_script(tmp_path, CALLBACK_RAISES_SCRIPT, patched, kind, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "timed out" not in result.stderr
        results[patched] = report(result)
    reached = {"interrupt": "KeyboardInterrupt", "exit": "SystemExit", "error": None}[kind]
    assert results[False] == {"calls": ["first\n"], "reached": reached,
                              "later": "third: a callback added since\n"}
    assert results[True] == dict(results[False], reached=None)
    if kind != "error":
        assert f"a wandb console callback raised {reached}()" in result.stderr


def test_on_output_raising_keyboardinterrupt_leaves_the_drain_alive() -> None:
    """Any BaseException of on_output is counted, the drain goes on."""
    import safe_redirect

    seen: list[str] = []

    def on_output(record) -> None:
        seen.append(record.text)
        if len(seen) == 1:
            raise KeyboardInterrupt

    session = safe_redirect.install(on_output=on_output)
    try:
        print("one")
        assert session.flush(timeout=10)
        print("two")
        assert session.flush(timeout=10)
    finally:
        session.uninstall(timeout=10)
    assert "".join(seen) == "one\ntwo\n"
    assert session.stats().callback_errors == 1


UNCAPTURE_SCRIPT = """
import json, sys
import wandb
from wandb.sdk.lib import console_capture

got = []
remove = console_capture.capture_stdout(lambda text, written: got.append(text[:written]))
print("written before the callback is removed")
sys.stdout.write("and a partial line")
remove()
remove()  # idempotent
print("after")
print("REPORT=" + json.dumps("".join(got)), file=sys.stderr)
"""


@pytest.mark.timeout(120)
def test_uncapturing_delivers_what_was_written_before(tmp_path) -> None:
    results = [report(run_script(tmp_path, UNCAPTURE_SCRIPT, patched, timeout=100))
               for patched in (False, True)]
    assert results[0] == results[1] == (
        "written before the callback is removed\nand a partial line")


CANNOT_CAPTURE_SCRIPT = """
import io, json, sys

class Refuses(Exception):
    pass

class Unpatchable(io.TextIOBase):
    def __init__(self, delegate):
        self._delegate = delegate
    def __setattr__(self, name, value):
        if name == "write":
            raise Refuses()
        return super().__setattr__(name, value)
    def write(self, text):
        return self._delegate.write(text)

sys.stdout = Unpatchable(sys.stdout)
import wandb
from wandb.sdk.lib import console_capture, redirect
try:
    console_capture.capture_stdout(lambda *unused: None)
except console_capture.CannotCaptureConsoleError as exc:
    caught = type(exc.__cause__).__name__
else:
    caught = None
wrapper = redirect.StreamRawWrapper("stdout", cbs=[])
wrapper.install()  # wandb: logs the failure and warns; nothing raised
wrapper.uninstall()
print("REPORT=" + json.dumps(caught), file=sys.stderr)
"""


@pytest.mark.timeout(120)
def test_a_stdout_that_cannot_be_patched_raises_cannot_capture(tmp_path) -> None:
    results = []
    for patched in (False, True):
        result = run_script(tmp_path, CANNOT_CAPTURE_SCRIPT, patched, timeout=100)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Failed to wrap stdout. Console logs will not be captured." in result.stderr
        results.append(report(result))
    assert results[0] == results[1] == "Refuses"


# -- several redirect objects

REDIRECTS_SCRIPT = """
import json, os, re, sys
import wandb
from wandb.sdk.lib import redirect

cls = getattr(redirect, sys.argv[1])

def lines(chunks):
    text = b"".join(chunks).decode()
    return [x for x in re.split("\\r\\n|\\n", text) if x]

o1, o2 = [], []
kwargs = {} if cls is redirect.StreamRawWrapper else {"flush_periodically": False}
r1 = cls("stdout", cbs=[lambda d: o1.append(d if isinstance(d, bytes) else d.encode())], **kwargs)
r2 = cls("stdout", cbs=[lambda d: o2.append(d if isinstance(d, bytes) else d.encode())], **kwargs)
r1.install()
print("ABCD", flush=True)
r2.install()
print("WXYZ", flush=True)
r1.install()
print("1234", flush=True)
r2.install()
print("5678", flush=True)
r2.uninstall()
r1.uninstall()
print("REPORT=" + json.dumps([lines(o1), lines(o2)]), file=sys.stderr)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cls", ["Redirect", "StreamWrapper", "StreamRawWrapper"])
def test_several_redirect_objects_get_what_wandbs_would(tmp_path, cls) -> None:
    """wandb's `Redirect`: the last one installed for a stream wins (installing takes the
    previous one off); its wrap classes: every installed one gets every write."""
    results = []
    for patched in (False, True):
        result = run_script(tmp_path, REDIRECTS_SCRIPT, patched, cls, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        results.append(report(result))
    assert results[0] == results[1]


LEFT_INSTALLED_TESTS = """
import os
from wandb.sdk.lib import redirect

left = []

def test_leaves_a_redirect_installed():
    redirect.Redirect("stdout", cbs=[left.append], flush_periodically=False).install()
    print("captured by the first")

def test_a_new_redirect_under_capfd_captures(capfd):
    got = []
    r = redirect.Redirect("stdout", cbs=[got.append], flush_periodically=False)
    r.install()
    os.write(1, b"under capfd\\n")  # capfd points sys.stdout at its file: fd 1 it is
    r.uninstall()
    assert b"under capfd" in b"".join(got)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("patched", [False, True], ids=["alone", "patched"])
def test_a_redirect_left_installed_does_not_stop_a_later_one(pytester, patched,
                                                            monkeypatch) -> None:
    """An earlier test left a `Redirect` installed; the next one, under capfd (which swapped
    fds 1 and 2 since), installs its own: it captures what reaches fd 1, on wandb alone and
    patched."""
    monkeypatch.delenv("SAFE_REDIRECT_PATCH", raising=False)
    if patched:
        monkeypatch.setenv("SAFE_REDIRECT_PATCH", "wandb")
        assert ensure_pth() is not None
    pytester.makepyfile(test_left=LEFT_INSTALLED_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly",
                                           "-q", timeout=240)
    result.assert_outcomes(passed=2)

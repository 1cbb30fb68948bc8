"""In a real Jupyter kernel, driven cell by cell with nbclient: the original report's environment.

Kernels tested: every python listed in SAFE_REDIRECT_TEST_KERNELS (os.pathsep-separated; .ci/run
sets up two venvs: ipykernel 7 / IPython 9, and ipykernel 6 / IPython 8 as on Colab), else this
interpreter's, if ipykernel, nbclient and nbformat import here. Each notebook runs in a kernel
of that python (tests/integrations/nbrun.py); the records a session delivered are dumped to a
file by the notebook's last cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from safe_redirect import hooks

from .. import internals

REPO = Path(__file__).resolve().parents[2]
NBRUN = Path(__file__).with_name("nbrun.py")
NEEDS = ("ipykernel", "nbclient", "nbformat")


def _kernel_pythons() -> list[Any]:
    """The pythons named in SAFE_REDIRECT_TEST_KERNELS, else this one."""
    named = [p for p in os.environ.get("SAFE_REDIRECT_TEST_KERNELS", "").split(os.pathsep) if p]
    if not named:
        return [pytest.param(sys.executable, id="this-python")]
    return [pytest.param(python, id=Path(python).parents[1].name) for python in named]


_usable: dict[str, str] = {}


def _why_unusable(python: str) -> str:
    """"" when `python` can run a kernel and nbclient, else the reason."""
    if python not in _usable:
        probe = subprocess.run([python, "-c", f"import {', '.join(NEEDS)}"],
                               capture_output=True, text=True, timeout=60)
        _usable[python] = "" if probe.returncode == 0 else (
            f"{python} cannot run a notebook ({probe.stderr.strip().splitlines()[-1:]}): "
            f"install {', '.join(NEEDS)} (extra: .[notebook]) or name a python that has them "
            "in SAFE_REDIRECT_TEST_KERNELS")
    return _usable[python]


@pytest.fixture(params=_kernel_pythons())
def kernel(request: pytest.FixtureRequest) -> str:
    why = _why_unusable(request.param)
    if why:
        pytest.skip(why)
    return str(request.param)


WORKERS = """
import os, sys, time

LINES = 20

def work(task):
    for i in range(LINES):
        print(f"worker {task} line {i}", flush=True)
    return task

def wait_then_work(task, started):
    print(f"slow {task} started", flush=True)
    open(os.path.join(started, str(task)), "w").close()
    time.sleep(120)

def xla_train(index):
    import torch_xla.runtime as xr
    for i in range(LINES):
        print(f"xla: {xr.global_ordinal()} line {i}", flush=True)
"""

INSTALL = """
import json, multiprocessing, safe_redirect
records = []
session = safe_redirect.install(on_output=records.append{options})
print("master: installed")
"""

POOL = """
import nbworkers
with multiprocessing.get_context({method!r}).Pool(2) as pool:
    print("master: results", pool.map(nbworkers.work, range(4)))
"""

DUMP = """
session.uninstall()
with open("records.json", "w") as f:
    json.dump([[r.tag, r.stream, line] for r in records
               for line in r.text.splitlines()], f)
"""


def run_notebook(kernel: str, tmp_path: Path, cells: list[str], env: dict[str, str] | None = None,
                 interrupt: dict[str, Any] | None = None, timeout: float = 240) -> dict[str, Any]:
    """Run `cells` in a kernel of `kernel` with cwd tmp_path (where nbworkers.py is)."""
    (tmp_path / "nbworkers.py").write_text(WORKERS)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cells": [textwrap.dedent(c) for c in cells],
                                "cwd": str(tmp_path), "timeout": timeout,
                                "interrupt": interrupt}))
    environ = dict(os.environ, **(env or {}))
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                          environ.get("PYTHONPATH")]))
    environ.pop("SAFE_REDIRECT_ATTACH", None)
    # a kernel started under pytest does not watch fds 1 and 2 (ipykernel checks): a user's does
    environ.pop("PYTEST_CURRENT_TEST", None)
    try:
        done = subprocess.run([kernel, str(NBRUN), str(spec)], capture_output=True, text=True,
                              timeout=timeout + 60, env=environ, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"notebook hung; stderr: {exc.stderr!r}")
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def records(tmp_path: Path) -> list[tuple[str, str, str]]:
    return [tuple(row) for row in json.loads((tmp_path / "records.json").read_text())]


def shown(result: dict[str, Any], cell: int) -> str:
    """What the notebook shows under a cell (streams and error names)."""
    return "".join(o.get("text", "") or f"<{o.get('error')}>" for o in result["outputs"][cell])


def assert_each_once(rows: list[tuple[str, str, str]], workers: list[str], master: list[str],
                     result: dict[str, Any]) -> None:
    """Every worker line once, under a child's tag; every master line once, untagged."""
    context = (result["versions"], result["outputs"], result["stderr"][-3000:])
    counts = Counter(text for _, _, text in rows)
    assert {line: counts[line] for line in workers + master} == dict.fromkeys(
        workers + master, 1), (rows, context)
    for tag, _, text in rows:
        if text in workers:
            assert tag, (text, rows)
        if text in master:
            assert tag == "", (text, rows)


WORKER_LINES = [f"worker {t} line {i}" for t in range(4) for i in range(20)]

NEXT_CELL = """
import sys
print("master: next cell")
print("master: next cell, stderr", file=sys.stderr)
"""

SPLITS = {
    # install in one cell, workers in the next, prints after: the common notebook
    "cell-by-cell": lambda method: [INSTALL.format(options=""), POOL.format(method=method),
                                    NEXT_CELL],
    # install and workers in one cell (the seed's training cell)
    "one-cell": lambda method: [INSTALL.format(options="") + POOL.format(method=method),
                                NEXT_CELL],
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_every_line_once_whatever_the_cells(kernel, tmp_path, method, split) -> None:
    result = run_notebook(kernel, tmp_path, [*SPLITS[split](method), DUMP])
    rows = records(tmp_path)
    assert_each_once(rows, WORKER_LINES,
                     ["master: installed", "master: results [0, 1, 2, 3]", "master: next cell",
                      "master: next cell, stderr"], result)
    assert ("", "stderr", "master: next cell, stderr") in rows
    assert "worker 3 line 19" in "".join(shown(result, i) for i in range(len(result["outputs"])))


@pytest.mark.timeout(400)
def test_a_cell_run_again_and_the_install_cell_run_again(kernel, tmp_path) -> None:
    """Run-all twice over the same kernel, as users do: the install cell makes a new session
    (the old one stays installed) and the workers cell runs twice; the new session gets every
    line of its time once."""
    install = INSTALL.format(options="")
    pool = POOL.format(method="fork").replace("range(4)", "range(run, run + 2)")
    counter = "run = globals().get('run', -2) + 2\n"
    result = run_notebook(kernel, tmp_path, [install, install, counter + pool, counter + pool,
                                             'print("master: after the re-runs")', DUMP])
    assert_each_once(records(tmp_path), WORKER_LINES,
                     ["master: installed", "master: results [0, 1]", "master: results [2, 3]",
                      "master: after the re-runs"], result)


@pytest.mark.timeout(400)
def test_an_interrupted_cell_loses_nothing_after_it(kernel, tmp_path) -> None:
    """Jupyter's stop button (SIGINT to the kernel) while forked workers run: the cell ends with
    KeyboardInterrupt, and every later print is still captured, once."""
    started = tmp_path / "started"
    started.mkdir()
    marker = tmp_path / "all-started"
    slow = f"""
        import functools, os, time, nbworkers
        print("master: starting slow workers")
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pending = pool.map_async(functools.partial(nbworkers.wait_then_work,
                                                       started={str(started)!r}), range(2))
            deadline = time.monotonic() + 60
            while len(os.listdir({str(started)!r})) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            open({str(marker)!r}, "w").close()
            pending.get(300)
    """
    result = run_notebook(kernel, tmp_path,
                          [INSTALL.format(options=""), slow, POOL.format(method="fork"),
                           'print("master: after the interrupt")', DUMP],
                          interrupt={"cell": 1, "when_exists": str(marker)})
    assert "<KeyboardInterrupt>" in shown(result, 1), result["outputs"]
    assert_each_once(records(tmp_path), [*WORKER_LINES, "slow 0 started", "slow 1 started"],
                     ["master: installed", "master: starting slow workers",
                      "master: results [0, 1, 2, 3]", "master: after the interrupt"], result)


WANDB_INIT = """
import multiprocessing, wandb
run = wandb.init(mode="offline", project="safe-redirect-notebook")
print("master: run started")
"""

WANDB_FINISH = """
run.finish()
with open("files_dir.txt", "w") as f:
    f.write(run.settings.files_dir)
"""


def output_log(tmp_path: Path) -> list[str]:
    files_dir = (tmp_path / "files_dir.txt").read_text()
    return Path(files_dir, "output.log").read_text().splitlines()


def assert_log_each_once(log: list[str], workers: list[str], master: list[str],
                         result: dict[str, Any]) -> None:
    """output.log: every worker line once with a tag before it, every master line once bare.
    A failure shows the log, what the notebook showed and the kernel's stderr."""
    context = (log, result["outputs"], result["stderr"][-3000:])
    bare = Counter(log)
    tagged = Counter(line.split("] ", 1)[1] for line in log
                     if line.startswith("[") and "] " in line)
    assert {line: (tagged[line], bare[line]) for line in workers} == dict.fromkeys(
        workers, (1, 0)), context
    assert {line: (tagged[line], bare[line]) for line in master} == dict.fromkeys(
        master, (0, 1)), context


@pytest.mark.timeout(400)
@pytest.mark.parametrize("split", ["cell-by-cell", "one-cell"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_patched_wandb_run_in_a_notebook(kernel, tmp_path, method, split) -> None:
    """SAFE_REDIRECT_PATCH=wandb and an offline run: output.log has every line once."""
    pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")
    pool = POOL.format(method=method)
    cells = ([WANDB_INIT, pool] if split == "cell-by-cell" else [WANDB_INIT + pool])
    cells += ['print("master: next cell")', WANDB_FINISH]
    result = run_notebook(kernel, tmp_path, cells,
                          env={"SAFE_REDIRECT_PATCH": "wandb", "WANDB_MODE": "offline",
                               "WANDB_SILENT": "true"})
    assert_log_each_once(output_log(tmp_path), WORKER_LINES,
                         ["master: run started", "master: results [0, 1, 2, 3]",
                          "master: next cell"], result)


@pytest.mark.timeout(400)
def test_two_wandb_runs_one_after_the_other_in_one_notebook(kernel, tmp_path) -> None:
    """run.finish() in a cell, a print, then a second run: each output.log has its own run's
    lines once, and nothing printed between the runs."""
    pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")
    logs = []
    cells = []
    for n, method in enumerate(["fork", "spawn"]):
        cells += [WANDB_INIT, POOL.format(method=method), 'print("master: next cell")',
                  WANDB_FINISH + f"import shutil; shutil.move('files_dir.txt', 'run{n}.txt')\n",
                  'print("master: between runs")']
    result = run_notebook(kernel, tmp_path, cells,
                          env={"SAFE_REDIRECT_PATCH": "wandb", "WANDB_MODE": "offline",
                               "WANDB_SILENT": "true"})
    for n in range(2):
        files_dir = (tmp_path / f"run{n}.txt").read_text()
        logs.append(Path(files_dir, "output.log").read_text().splitlines())
        assert_log_each_once(logs[n], WORKER_LINES,
                             ["master: run started", "master: results [0, 1, 2, 3]",
                              "master: next cell"], result)
        assert "master: between runs" not in logs[n]


@pytest.mark.timeout(600)
def test_the_seeds_notebook_xmp_spawn_with_wandb(kernel, tmp_path) -> None:
    """The original report: wandb.init in one cell, xmp.spawn on the CPU in the next, a print
    after it; with safe_redirect.patch_wandb() every rank's lines are in output.log, once."""
    probe = subprocess.run([kernel, "-c", "import torch_xla"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("torch_xla is not importable in this kernel (extra: .[xla])")
    cells = ["import safe_redirect\nsafe_redirect.patch_wandb()\n" + WANDB_INIT,
             """
             import nbworkers
             import torch_xla.distributed.xla_multiprocessing as xmp
             xmp.spawn(nbworkers.xla_train, args=(), nprocs=None)
             print("master: training done")
             """,
             WANDB_FINISH]
    result = run_notebook(kernel, tmp_path, cells, timeout=500,
                          env={"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                               "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
    log = output_log(tmp_path)
    ranks = [f"xla: {r} line {i}" for r in range(4) for i in range(20)]
    assert_log_each_once(log, ranks, ["master: run started", "master: training done"], result)
    for line in log:
        if line.endswith("line 0") and "xla: " in line:
            rank = line.split("xla: ")[1].split()[0]
            assert line.startswith(f"[rank{rank}] "), log


@pytest.mark.timeout(400)
def test_fd_mode_in_a_kernel_captures_the_kernels_prints(kernel, tmp_path) -> None:
    """mode="fd" (wandb console="redirect"): the kernel's prints do not pass through fds 1 and 2,
    but fd mode takes Python-level writes through the same hooks as wrap mode, so they are
    captured, and nothing needs saying about what is not."""
    fd_install = INSTALL.format(options=', mode="fd"')
    result = run_notebook(kernel, tmp_path, [fd_install, DUMP, fd_install, DUMP])
    note = "captures only what reaches fds 1 and 2"
    said = [note in shown(result, cell) for cell in range(4)]
    assert "master: installed" in [text for _, _, text in records(tmp_path)], result["outputs"]
    assert said == [False] * 4, result["outputs"]


# -- the hooks against a host's swap, without a kernel


class Stream:
    """A stream object like ipykernel's OutStream: writes land in a list."""

    def __init__(self) -> None:
        self.got: list[str] = []

    def write(self, text: str) -> int:
        self.got.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_rearm_after_a_host_puts_back_the_writer_it_saved(monkeypatch) -> None:
    """IPython 9's per-cell `_tee`: saves `write`, wraps it, and puts the saved one back when the
    cell ends, dropping a hook installed in the cell. `rearm` puts ours back on top of it."""
    stream = Stream()
    monkeypatch.setattr(sys, "stdout", stream)
    saved = stream.write  # the cell starts: the host saves the writer
    history: list[str] = []

    def tee(text: str) -> int:
        history.append(text)
        return saved(text)

    stream.write = tee  # type: ignore[method-assign]
    hooked = hooks.StreamHooks(("stdout",), lambda hook: None, lambda hook, s, rest: None)
    hooked.install(None)
    try:
        assert internals.is_hook(vars(stream)["write"])
        stream.write = saved  # type: ignore[method-assign]  # the cell ends
        hooks.rearm()
        hook = vars(stream)["write"]
        assert internals.is_hook(hook) and hook.target == saved
        stream.write("after\n")
        assert stream.got == ["after\n"] and history == []  # the old cell's tee is gone
        # the next cell's tee wraps our hook and puts it back: nothing to re-arm
        outer = stream.write
        stream.write = lambda text: outer(text)  # type: ignore[method-assign]
        hooks.rearm()
        assert not internals.is_hook(vars(stream)["write"])
        stream.write = outer  # type: ignore[method-assign]
        hooks.rearm()
        assert vars(stream)["write"] is hook
    finally:
        hooked.uninstall()
    assert "write" not in vars(stream) or vars(stream)["write"] == saved


def test_rearm_leaves_a_writer_set_since_alone(monkeypatch) -> None:
    stream = Stream()
    monkeypatch.setattr(sys, "stdout", stream)
    hooked = hooks.StreamHooks(("stdout",), lambda hook: None, lambda hook, s, rest: None)
    hooked.install(None)
    try:
        def theirs(text: str) -> int:
            return len(text)

        stream.write = theirs  # type: ignore[method-assign]
        hooks.rearm()
        assert vars(stream)["write"] is theirs
    finally:
        hooked.uninstall()


def test_writes_of_a_hosts_fd_echo_thread_are_passed_on_not_captured(capture) -> None:
    """ipykernel's fd watcher re-writes what a spawned child sent to fd 1 (already in the
    child's lane) through the hooked write: the hook lets it through, uncaptured."""
    import threading

    session, got = capture
    hook = vars(sys.stdout)["write"]
    go = threading.Event()

    def echo() -> None:
        go.wait(10)
        sys.stdout.write("echoed by the host\n")

    thread = threading.Thread(target=echo)
    thread.start()
    hook.host_thread = thread.ident
    go.set()
    thread.join(10)
    print("the master's own")
    assert session.flush()
    texts = [record.text for record in got]
    assert "the master's own\n" in texts and "echoed by the host\n" not in texts


def test_inside_ipython_a_flush_rearms_the_hooks(monkeypatch) -> None:
    """ipykernel flushes sys.stdout after each cell, after IPython put back its saved writer:
    inside IPython, that flush puts our write hook back."""
    from safe_redirect import hosts

    monkeypatch.setattr(hosts, "in_ipython", lambda: True)
    stream = Stream()
    monkeypatch.setattr(sys, "stdout", stream)
    saved = stream.write
    stream.write = lambda text: saved(text)  # type: ignore[method-assign]  # the cell's tee
    hooked = hooks.StreamHooks(("stdout",), lambda hook: None, lambda hook, s, rest: None)
    hooked.install(None)
    try:
        stream.write = saved  # type: ignore[method-assign]  # the cell ends
        stream.flush()
        assert internals.is_hook(vars(stream)["write"])
        assert vars(stream)["write"].target == saved
    finally:
        hooked.uninstall()

"""The wandb drop-in against the real wandb, offline: what lands in the run's output.log."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ..conftest import run_python, run_python_file

wandb = pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")

SCRIPT = """
import multiprocessing, os, sys
import safe_redirect

def work(rank, *_):
    os.environ["RANK"] = str(rank)
    for i in range(20):
        print(f"child {rank} line {i}")
    print(f"child {rank} warns", file=sys.stderr)
    sys.stdout.flush()

if __name__ == "__main__":
    console, method, patch = sys.argv[1:]
    if patch == "yes":
        safe_redirect.patch_wandb()
    import wandb
    run = wandb.init(mode="offline", project="safe-redirect-test",
                     settings=wandb.Settings(console=console))
    print("master line")
    if method == "torch":
        import torch.multiprocessing
        torch.multiprocessing.spawn(work, nprocs=3)  # rank passed as the first argument
    else:
        context = multiprocessing.get_context(method)
        children = [context.Process(target=work, args=(r,)) for r in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join()
            assert child.exitcode == 0, child.exitcode
    run.finish()
    print(run.settings.files_dir, file=sys.stderr)
"""


def output_log(result) -> str:
    files_dir = result.stderr.strip().splitlines()[-1]
    with open(f"{files_dir}/output.log", encoding="utf-8") as log:
        return log.read()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["explicit", "env"])
@pytest.mark.parametrize("console", ["wrap", "wrap_emu", "redirect"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver", "torch"])
def test_every_childs_lines_land_in_output_log_once_tagged(tmp_path, method, console,
                                                          how) -> None:
    """console mode x birth method x {patch_wandb(), SAFE_REDIRECT_PATCH=wandb}."""
    if method == "torch":
        pytest.importorskip("torch", reason="torch is not installed (extra: .[xla])")
    env = dict(os.environ)
    if how == "env":
        env["SAFE_REDIRECT_PATCH"] = "wandb"
    result = run_python_file(tmp_path / "train.py", SCRIPT, 240,
                             args=(console, method, "yes" if how == "explicit" else "no"),
                             cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = output_log(result).splitlines()
    assert lines.count("master line") == 1
    for rank in range(3):
        mine = [x for x in lines if x.startswith(f"[rank{rank}] ")]
        assert mine.count(f"[rank{rank}] child {rank} warns") == 1
        assert [x for x in mine if "line" in x] == [
            f"[rank{rank}] child {rank} line {i}" for i in range(20)]


@pytest.mark.timeout(300)
def test_without_the_patch_wandb_loses_the_childrens_lines(tmp_path) -> None:
    """The bug this exists for (wandb/wandb#4990), so that the test above means something."""
    result = run_python_file(tmp_path / "train.py", SCRIPT, 240, args=("wrap", "fork", "no"),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = output_log(result)
    assert "master line" in log
    assert "child 0 line 0" not in log


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["import", "env"])
def test_the_import_time_patch_and_the_environment_variable(tmp_path, how) -> None:
    """`import safe_redirect.wandb`, or SAFE_REDIRECT_PATCH=wandb with no code change at all."""
    script = SCRIPT.replace("    if patch == \"yes\":\n        safe_redirect.patch_wandb()\n",
                            "    if patch == \"import\":\n        import safe_redirect.wandb\n")
    assert script != SCRIPT
    env = dict(os.environ)
    if how == "env":
        env["SAFE_REDIRECT_PATCH"] = "wandb"
    result = run_python_file(tmp_path / "train.py", script, 240,
                             args=("wrap", "fork", "import" if how == "import" else "no"),
                             cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = output_log(result).splitlines()
    for rank in range(3):
        assert lines.count(f"[rank{rank}] child {rank} line 19") == 1


@pytest.mark.timeout(120)
def test_wandbs_import_time_write_hook_is_taken_off_and_put_back() -> None:
    """console_capture wraps sys.stdout.write at import, for every process; patched, the plain
    writer is back (no lock per print), and unpatch puts wandb's hook back."""
    code = """
        import sys
        import wandb
        import safe_redirect
        before = sys.stdout.__dict__.get("write").__qualname__
        safe_redirect.patch_wandb()
        safe_redirect.patch_wandb()  # idempotent
        patched = "write" in sys.stdout.__dict__
        from wandb.sdk.lib import console_capture, redirect
        seen = []
        remove = console_capture.capture_stdout(lambda text, n: seen.append((text, n)))
        print("through the shared session")
        remove()  # delivers what was written before it returns
        safe_redirect.unpatch_wandb()
        after = sys.stdout.__dict__.get("write").__qualname__
        print(before, patched, redirect.StreamRawWrapper.__module__, after, seen, file=sys.stderr)
    """
    result = run_python(code, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stderr.strip().splitlines()[-1]
    assert report.startswith("_patch.<locals>.write_with_callbacks False wandb.sdk.lib.redirect "
                             "_patch.<locals>.write_with_callbacks")
    assert "('through the shared session\\n', 27)" in report


@pytest.mark.timeout(300)
def test_a_child_line_of_4000_characters_is_one_line_in_output_log(tmp_path) -> None:
    script = SCRIPT.replace('        print(f"child {rank} line {i}")',
                            '        print(f"child {rank} line {i} " + "x" * 4000)')
    assert script != SCRIPT
    result = run_python_file(tmp_path / "train.py", script, 240, args=("wrap", "fork", "yes"),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = output_log(result).splitlines()
    for rank in range(3):
        assert [x for x in lines if x.startswith(f"[rank{rank}] child {rank} line")] == [
            f"[rank{rank}] child {rank} line {i} " + "x" * 4000 for i in range(20)]


XLA_SCRIPT = """
import sys
import safe_redirect

def train(index):
    import torch_xla.runtime as xr
    print(f"xla: {xr.global_ordinal()} start train model")

if __name__ == "__main__":
    safe_redirect.patch_wandb()
    import wandb
    import torch_xla.distributed.xla_multiprocessing as xmp
    run = wandb.init(mode="offline", project="safe-redirect-xla",
                     settings=wandb.Settings(console=sys.argv[2]))
    xmp.spawn(train, args=(), nprocs=None, start_method=sys.argv[1])
    print("master: training done")
    run.finish()
    print(run.settings.files_dir, file=sys.stderr)
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("console", ["wrap", "redirect"])
def test_the_original_report_torch_xla_ranks_into_output_log(tmp_path, start_method,
                                                            console) -> None:
    """wandb/wandb#1808: each rank's `xla: {rank} start train model` under xmp.spawn."""
    pytest.importorskip("torch_xla", reason="torch_xla is not installed (extra: .[xla])")
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
    result = run_python_file(tmp_path / "train.py", XLA_SCRIPT, 500,
                             args=(start_method, console), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "can only test a child process" not in result.stderr
    log = output_log(result)
    lines = log.splitlines()
    if console == "wrap":  # thread ranks are known to the Python-level hooks: whole lines
        expected = [f"[rank{r}] xla: {r} start train model" for r in range(4)]
        assert sorted(x for x in lines if x.endswith(" start train model")) == expected
    else:
        # At fd level the writing thread is invisible: print's text and newline are two writes,
        # and four rank threads may interleave them exactly as the terminal shows. Each write
        # arrives once and whole.
        for r in range(4):
            assert log.count(f"xla: {r} start train model") == 1
    assert lines.count("master: training done") == 1


CHILD_RUN_SCRIPT = """
import multiprocessing, os, sys
import safe_redirect

def work(rank):
    os.environ["RANK"] = str(rank)
    if rank == 0:  # as in the original report: only rank 0 logs to wandb
        import wandb
        run = wandb.init(mode="offline", project="child-run",
                         settings=wandb.Settings(console="wrap"))
        print("rank 0 inside its own run")
        run.finish()
        print(run.settings.files_dir, file=sys.stderr)
    else:
        for i in range(20):
            print(f"sibling {rank} line {i}")

if __name__ == "__main__":
    safe_redirect.patch_wandb()
    import wandb
    run = wandb.init(mode="offline", project="master-run", settings=wandb.Settings(console="wrap"))
    children = [multiprocessing.get_context("fork").Process(target=work, args=(r,))
                for r in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join()
        assert child.exitcode == 0
    run.finish()
    print(run.settings.files_dir, file=sys.stderr)
"""


@pytest.mark.timeout(300)
def test_a_child_with_a_run_of_its_own_gets_its_own_lines_and_no_siblings(tmp_path) -> None:
    result = run_python_file(tmp_path / "train.py", CHILD_RUN_SCRIPT, 240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = [x for x in result.stderr.strip().splitlines() if x.endswith("/files")]
    child_dir, master_dir = dirs[0], dirs[-1]
    assert child_dir != master_dir
    child_log = Path(child_dir, "output.log").read_text(encoding="utf-8")
    master_log = Path(master_dir, "output.log").read_text(encoding="utf-8")
    assert "rank 0 inside its own run" in child_log
    assert "sibling" not in child_log  # siblings are not its descendants
    for rank in (1, 2):
        assert master_log.count(f"[rank{rank}] sibling {rank} line 19") == 1
    assert master_log.count("[rank0] rank 0 inside its own run") == 1  # the master sees it too


LAUNCHERS_SCRIPT = """
import multiprocessing, os, subprocess, sys
import safe_redirect

def square(x):
    print(f"pool square {x}")
    return x * x

def raises():
    os.environ["RANK"] = "7"
    raise ValueError("boom from a child")

class Numbers:
    def __len__(self):
        return 4
    def __getitem__(self, i):
        print(f"dataloader item {i}")
        return i

if __name__ == "__main__":
    console = sys.argv[1]
    safe_redirect.patch_wandb()
    import wandb
    run = wandb.init(mode="offline", project="safe-redirect-test",
                     settings=wandb.Settings(console=console))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(square, range(6)) == [x * x for x in range(6)]
    subprocess.run([sys.executable, "-c", "print('subprocess line')"], check=True)
    child = multiprocessing.get_context("fork").Process(target=raises)
    child.start()
    child.join(60)
    assert child.exitcode == 1, child.exitcode
    try:
        import torch.utils.data
    except ImportError:
        print("no torch")
    else:
        loader = torch.utils.data.DataLoader(Numbers(), batch_size=None, num_workers=2)
        assert sorted(int(x) for x in loader) == [0, 1, 2, 3]
    run.finish()
    print(run.settings.files_dir, file=sys.stderr)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("console", ["wrap", "redirect"])
def test_pools_dataloader_workers_subprocesses_and_tracebacks_land_in_output_log(
        tmp_path, console) -> None:
    result = run_python_file(tmp_path / "train.py", LAUNCHERS_SCRIPT, 240, args=(console,),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = output_log(result).splitlines()
    # every child's line once, under a tag of its own (wrap: the worker's name; fd mode claims
    # the lane at start-up, before multiprocessing names the process: its pid)
    pool = [x for x in lines if "pool square" in x]
    assert all(re.fullmatch(r"\[(SpawnPoolWorker-\d+|pid\d+)\] pool square \d", x) for x in pool)
    assert sorted(x.split("] ", 1)[1] for x in pool) == [f"pool square {x}" for x in range(6)]
    assert len([x for x in lines if re.fullmatch(r"\[pid\d+\] subprocess line", x)]) == 1
    # the child's traceback, every line of it under the child's tag: its rank (in fd mode, a
    # child that dies before its pump saw the rank is tagged by pid: the master empties its pipe)
    (tag,) = {x.split("] ")[0] + "] " for x in lines if x.endswith("] Process ForkProcess-3:")}
    assert re.fullmatch(r"\[(rank7|pid\d+)\] ", tag)
    assert console == "redirect" or tag == "[rank7] "
    traceback = [x for x in lines if x.startswith(tag)]
    assert traceback[:2] == [tag + "Process ForkProcess-3:",
                             tag + "Traceback (most recent call last):"]
    assert traceback[-1] == tag + "ValueError: boom from a child"
    assert len([x for x in lines if "boom from a child" in x]) == 2  # the raise, and the error
    if "no torch" not in lines:
        items = sorted(x.split("] ", 1)[1] for x in lines if "dataloader item" in x)
        assert items == [f"dataloader item {i}" for i in range(4)]


AFTER_FINISH_SCRIPT = """
import os, sys
import safe_redirect
safe_redirect.patch_wandb()
import wandb
run = wandb.init(mode="offline", project="safe-redirect-test",
                 settings=wandb.Settings(console=sys.argv[1]))
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    print("child before finish", flush=True)
    os.write(ready_w, b"1")
    os.read(go_r, 1)  # the parent has finished its run
    for i in range(20000):  # 1.6 MB: far more than a pipe or a pty holds
        print(f"child after finish {i:05d} " + "x" * 60)
    sys.stdout.flush()
    os._exit(0)
os.read(ready_r, 1)
run.finish()
os.write(go_w, b"1")
_, status = os.waitpid(pid, 0)
print("child exit status", status, file=sys.stderr)
print(run.settings.files_dir, file=sys.stderr)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("console", ["wrap", "redirect"])
def test_a_child_printing_after_the_runs_finish_never_blocks(tmp_path, console) -> None:
    """wandb's own redirect hangs here for good: the child fills the pty nobody reads."""
    result = run_python_file(tmp_path / "after.py", AFTER_FINISH_SCRIPT, 120, args=(console,),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "child exit status 0" in result.stderr
    assert any(x.endswith("] child before finish") for x in output_log(result).splitlines())
    # after the finish the child's lines went to its terminal, in order, each once
    after = [x for x in result.stdout.splitlines() if x.startswith("child after finish")]
    expected = [f"child after finish {i:05d} " + "x" * 60 for i in range(20000)]
    if console == "wrap":
        assert after == expected
    else:  # fd mode: what its pump could not tee within os._exit()'s 1 s may be lost
        assert after == expected[:len(after)] and len(after) >= len(expected) - 800

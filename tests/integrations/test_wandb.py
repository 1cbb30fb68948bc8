"""The wandb drop-in against the real wandb, offline: what lands in the run's output.log."""

from __future__ import annotations

import pytest

from ..conftest import run_python_file

wandb = pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")

SCRIPT = """
import multiprocessing, os, sys
import safe_redirect

def work(rank):
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
@pytest.mark.parametrize("console", ["wrap", "wrap_emu", "redirect"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_every_childs_lines_land_in_output_log_once_tagged(tmp_path, console, method) -> None:
    result = run_python_file(tmp_path / "train.py", SCRIPT, 240, args=(console, method, "yes"),
                             cwd=tmp_path)
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

"""The original report, reproduced: wandb 0.10.23 (the seed's era) crashes every forked child at
its first print with `AssertionError: can only test a child process`; patched, it does not, and
the children's lines land in output.log.

wandb 0.10.23 imports on Python 3.11 only with protobuf 3.20.3 and a start-up shim for removed
aliases (../shared/compat). The test builds that environment once, in a temporary venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO.parent / "shared" / "compat" / "wandb010_py311_shim.py"

SEED = """
import multiprocessing, os, sys
import wandb
if sys.argv[1] == "patched":
    import safe_redirect
    safe_redirect.patch_wandb()

def work(rank):
    try:
        print(f"xla: {rank} start train model")
    except BaseException as exc:  # its traceback would go through the same broken writer
        os.write(2, f"child {rank}: {type(exc).__name__}: {exc}\\n".encode())
        raise

if __name__ == "__main__":
    run = wandb.init(mode="offline", project="seed", settings=wandb.Settings(console="wrap"))
    children = [multiprocessing.get_context("fork").Process(target=work, args=(r,))
                for r in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    print("exitcodes", [child.exitcode for child in children], file=sys.stderr)
    run.finish()
    print(run.dir, file=sys.stderr)
"""


@pytest.fixture(scope="module")
def wandb010(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHIM.exists():
        pytest.skip(f"the compat shim is not at {SHIM}")
    venv = tmp_path_factory.mktemp("w010") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "wandb==0.10.23",
                              "protobuf==3.20.3", "psutil"], capture_output=True, text=True,
                             timeout=600)
    if install.returncode != 0:
        pytest.skip(f"wandb 0.10.23 did not install: {install.stderr[-500:]}")
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(SHIM, site)
    Path(site, "zzz_wandb010_shim.pth").write_text("import wandb010_py311_shim\n")
    return python


def run_seed(python: Path, tmp_path: Path, patched: bool) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "seed.py"
    script.write_text(SEED)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return subprocess.run([str(python), str(script), "patched" if patched else "plain"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)


@pytest.mark.timeout(900)
def test_the_seed_crash_without_the_patch(wandb010: Path, tmp_path: Path) -> None:
    result = run_seed(wandb010, tmp_path, patched=False)
    for rank in range(4):
        assert f"child {rank}: AssertionError: can only test a child process" in result.stderr
    assert "exitcodes [1, 1, 1, 1]" in result.stderr


@pytest.mark.timeout(900)
def test_the_seed_runs_with_the_patch_and_logs_every_child(wandb010: Path,
                                                           tmp_path: Path) -> None:
    result = run_seed(wandb010, tmp_path, patched=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "can only test a child process" not in result.stderr
    assert "exitcodes [0, 0, 0, 0]" in result.stderr
    files_dir = result.stderr.strip().splitlines()[-1]
    log = Path(files_dir, "output.log").read_text(encoding="utf-8").splitlines()
    for rank in range(4):
        assert sum(line.endswith(f"] xla: {rank} start train model") for line in log) == 1

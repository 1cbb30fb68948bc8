"""The original report's setting: fastai's WandbCallback training in several processes at once.

wandb/wandb#1808: a fastai `Learner` with `WandbCallback` on 8 TPU cores died with `AssertionError:
can only test a child process` at a worker's first print. Here the master (rank 0) trains with
the callback logging to its run, and forked or spawned workers train and print fastai's progress
table; everything must land in the run's output.log, each line once, under its own tag.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ..conftest import run_python_file

pytest.importorskip("wandb", reason="wandb is not installed (extra: .[test])")
pytest.importorskip("fastai.callback.wandb", reason="fastai is not installed (extra: .[fastai])")

SCRIPT = """
import multiprocessing, os, sys
import numpy as np, torch
import safe_redirect

XS = np.random.RandomState(0).randn(64, 4).astype("float32")

def get_x(i): return torch.tensor(XS[i])
def get_y(i): return torch.tensor([XS[i].sum()])

def train(rank):
    import wandb
    from fastai.callback.wandb import WandbCallback
    from fastai.data.block import DataBlock, RegressionBlock
    from fastai.data.transforms import RandomSplitter
    from fastai.learner import Learner
    os.environ["RANK"] = str(rank)  # fastai's rank_distrib(): only rank 0 logs to wandb
    print(f"xla: {rank} start train model")
    block = DataBlock(blocks=(RegressionBlock(), RegressionBlock()), get_x=get_x, get_y=get_y,
                      splitter=RandomSplitter(seed=0))
    dls = block.dataloaders(list(range(64)), bs=16, num_workers=0)
    # a forked worker has the master's wandb.run, a spawned one has none
    cbs = [WandbCallback(log_preds=False, log_model=False)] if wandb.run is not None else []
    Learner(dls, torch.nn.Linear(4, 1), loss_func=torch.nn.MSELoss(), cbs=cbs).fit(1)
    print(f"xla: {rank} done", file=sys.stderr)

if __name__ == "__main__":
    console, method = sys.argv[1:]
    safe_redirect.patch_wandb()
    import wandb
    run = wandb.init(mode="offline", project="safe-redirect-fastai",
                     settings=wandb.Settings(console=console))
    train(0)
    context = multiprocessing.get_context(method)
    workers = [context.Process(target=train, args=(rank,)) for rank in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0, worker.exitcode
    run.finish()
    print(run.settings.files_dir, file=sys.stderr)
"""

#: fastai's row of results for epoch 0: epoch, train_loss, valid_loss, time
RESULT_ROW = r"0\s+\d+\.\d+\s+\d+\.\d+\s+00:\d\d"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("console", ["wrap", "redirect"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_fastai_workers_training_with_wandb_callback_all_land_in_output_log(
        tmp_path: Path, method: str, console: str) -> None:
    result = run_python_file(tmp_path / "train.py", SCRIPT, 240, args=(console, method),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    files_dir = Path(result.stderr.strip().splitlines()[-1])
    lines = (files_dir / "output.log").read_text(encoding="utf-8").splitlines()
    for rank in range(3):
        tag = f"[rank{rank}] " if rank else ""
        assert lines.count(f"{tag}xla: {rank} start train model") == 1, lines
        assert lines.count(f"{tag}xla: {rank} done") == 1, lines
        header = [x for x in lines if re.fullmatch(rf"{re.escape(tag)}epoch\s+train_loss.*", x)]
        rows = [x for x in lines if re.match(re.escape(tag) + RESULT_ROW, x)]
        assert len(header) == 1 and len(rows) == 1, (rank, header, rows)
    # no line holds two processes' text: a tag only ever at the start
    assert all(x.count("[rank") <= 1 and (x.startswith("[rank") or "[rank" not in x)
               for x in lines)
    # and the master's WandbCallback logged its metrics to the same run (offline: the run's
    # transaction log holds the history records)
    (transactions,) = files_dir.parent.glob("run-*.wandb")
    assert b"train_loss" in transactions.read_bytes()

"""Real launchers: torch.multiprocessing.spawn, DataLoader workers, torch_xla's xmp.spawn.

They need the optional extras (`pip install -e ".[xla]"`); without them the tests are skipped
with the reason.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

import safe_redirect

from .conftest import lines_by_origin

torch = pytest.importorskip("torch", reason="torch is not installed (extra: .[xla])")


def _torch_worker(rank: int, world: int) -> None:
    print(f"torch worker {rank}/{world}")
    print(f"torch worker {rank} warns", file=sys.stderr)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["wrap", "fd"])
def test_torch_multiprocessing_spawn_ranks_are_tagged(mode) -> None:
    import torch.multiprocessing as tmp

    records: list[safe_redirect.Record] = []
    session = safe_redirect.install(on_output=records.append, mode=mode)  # in the test body:
    try:  # pytest re-points fds 1 and 2 between a fixture's setup and the test
        context = tmp.spawn(_torch_worker, args=(4,), nprocs=4, join=False)
        while not context.join(timeout=60):
            pass
        assert session.flush(timeout=30)
    finally:
        session.uninstall()
    pids = [p.pid for p in context.processes]
    by_origin = lines_by_origin(records)
    for rank, pid in enumerate(pids):
        assert by_origin[(pid, "stdout")] == [f"torch worker {rank}/4"]
        assert by_origin[(pid, "stderr")] == [f"torch worker {rank} warns"]
        assert {r.tag for r in records if r.pid == pid} == {f"[rank{rank}] "}
        assert {r.rank for r in records if r.pid == pid} == {rank}


class _Squares(torch.utils.data.Dataset):  # type: ignore[misc]
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> int:
        print(f"loading item {index} in {os.getpid()}")
        return index * index


@pytest.mark.timeout(300)
def test_dataloader_workers_are_captured(capture) -> None:
    session, records = capture
    loader = torch.utils.data.DataLoader(_Squares(), batch_size=2, num_workers=2)
    assert [int(x) for batch in loader for x in batch] == [i * i for i in range(8)]
    assert session.flush(timeout=30)
    lines = [line for r in records if r.pid != os.getpid() for line in r.text.splitlines()]
    assert sorted(line.split(" in ")[0] for line in lines) == sorted(
        f"loading item {i}" for i in range(8))
    for record in records:
        for line in record.text.splitlines():
            assert line.endswith(f" in {record.pid}")  # each worker wrote into its own lane


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["wrap", "fd"])
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_torch_xla_spawn_on_the_cpu_prints_reach_the_master(tmp_path, start_method, mode) -> None:
    """The original report's scenario: `print(f'xla: {rank} start train model')` in each rank.
    The ranks are threads of one process: each thread's lines whole, once, under its rank, in
    both modes (fd mode tagged them with the pid and spliced two threads' lines before); in fd
    mode a C-level write of a rank thread too, tagged as its process (the pipe cannot tell
    threads apart)."""
    pytest.importorskip("torch_xla", reason="torch_xla is not installed (extra: .[xla])")
    log = tmp_path / "records.txt"
    script = textwrap.dedent(f"""
        import os, sys
        import safe_redirect

        def train(index):
            import torch_xla.runtime as xr
            rank = xr.global_ordinal()
            print(f"xla: {{rank}} start train model", flush=True)
            for step in range(50):
                print(f"xla: {{rank}} step {{step}} loss " + "0" * (step % 30))
            os.write(1, f"xla c-level {{rank}}\\n".encode())

        if __name__ == "__main__":
            import torch_xla.distributed.xla_multiprocessing as xmp
            log = open({str(log)!r}, "w")

            def on_output(record):
                for line in record.text.splitlines(keepends=True):
                    log.write(f"{{record.pid}}\t{{record.tag}}\t{{line}}")
                log.flush()

            with safe_redirect.install(on_output=on_output, mode={mode!r}):
                xmp.spawn(train, args=(), nprocs=None, start_method={start_method!r})
                print("master: training done")
    """)
    script_path = tmp_path / "train.py"
    script_path.write_text(script)
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
    import subprocess

    done = subprocess.run([sys.executable, str(script_path)], capture_output=True, text=True,
                          timeout=500, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "can only test a child process" not in done.stderr
    rows = [line.split("\t", 2) for line in log.read_text().splitlines()]
    xla = sorted((tag, text) for _, tag, text in rows if text.startswith("xla:"))
    # each rank thread's lines arrive whole, once, tagged with that thread's ordinal
    assert xla == sorted(
        (f"[rank{r}] ", text) for r in range(4) for text in [
            f"xla: {r} start train model",
            *(f"xla: {r} step {step} loss " + "0" * (step % 30) for step in range(50))]), (
        rows, done.stdout[-2000:], done.stderr[-2000:])
    c_level = sorted((tag, text) for _, tag, text in rows if text.startswith("xla c-level"))
    if mode == "fd":
        assert [text for _, text in c_level] == [f"xla c-level {r}" for r in range(4)]
        assert len({tag for tag, _ in c_level}) == 1 and not c_level[0][0].startswith("[rank")
    else:
        assert c_level == []  # wrap mode does not see os.write
    # the terminal shows every line once (threads' writes may interleave there, as without us)
    for r in range(4):
        assert done.stdout.count(f"xla: {r} start train model") == 1
        for step in range(50):
            assert done.stdout.count(f"xla: {r} step {step} loss") == 1
    assert ("", "master: training done") in [(tag, text) for _, tag, text in rows]
    worker_pids = {int(pid) for pid, _, text in rows if text.startswith("xla:")}
    assert len(worker_pids) == 1 and os.getpid() not in worker_pids

"""The demo, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safe_redirect import Record
from safe_redirect.cli import as_a_log_shows


def test_the_demo_shows_every_worker_tagged_and_the_stats() -> None:
    done = subprocess.run([sys.executable, "-m", "safe_redirect", "demo"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for rank in range(8):
        assert f"  [rank{rank}] rank {rank}: done" in out
        assert f"  [rank{rank}] (stderr) rank {rank}: a warning on stderr" in out
        # the progress bar drawn over itself with \r: its last state, once
        assert out.count(f"  [rank{rank}] rank {rank}: [") == 1
        assert f"  [rank{rank}] rank {rank}: [#####] step 5/5\n" in out
    assert "  [master] master: all workers joined" in out
    assert "stats: records=" in out and "lanes_reclaimed=8" in out
    assert "records: writes stored in the lanes; delivered: Records" in out
    assert "Live output: the terminal as always, raw" in out
    assert "every line of all 8 workers arrived once" in out


def test_the_demo_takes_its_size_from_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "safe_redirect", "demo", "--workers", "3",
                           "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[rank2] rank 2: done" in done.stdout and "[rank3]" not in done.stdout


def test_the_demo_rejects_a_size_below_one() -> None:
    for args in (["--workers", "-1"], ["--workers", "0"], ["--steps", "x"]):
        done = subprocess.run([sys.executable, "-m", "safe_redirect", "demo", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, args
        assert "usage: safe-redirect demo" in done.stderr and "error: argument" in done.stderr


def test_records_as_a_log_shows_them() -> None:
    """Continued records finish the line they go on with; a redrawn line keeps its last state;
    a line cut short ends where it was cut; another process never joins a line."""
    def record(text: str, pid: int = 1, continued: bool = False, stream: str = "stdout") -> Record:
        return Record(stream, text, f"[rank{pid}] " if pid else "", pid, pid, 0, continued)

    records = [record("\rbar 1"), record("a ", pid=2), record("\rbar 2", continued=True),
               record("b\n", pid=2, continued=True), record("\rbar 3\nnext\n", continued=True),
               record("cut"), record("new\n"), record("warn\n", pid=0, stream="stderr")]
    assert as_a_log_shows(records) == [
        "[rank2] a b", "[rank1] bar 3", "[rank1] next", "[rank1] cut", "[rank1] new",
        "[master] (stderr) warn"]


def test_the_readmes_wandb_example_runs_as_written(tmp_path) -> None:
    """The README's wandb example is a script, not pseudo-code: run it as a user would."""
    pytest.importorskip("wandb")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Using with wandb"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in range(4):  # the terminal's line untagged; output.log's (printed last) tagged
        lines = [line for line in done.stdout.splitlines()
                 if line.endswith(f"worker {rank}: loss 0.{rank}")]
        assert len(lines) == 2 and sum(line.startswith("[") for line in lines) == 1, lines

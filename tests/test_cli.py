"""The demo, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_shows_every_worker_tagged_and_the_stats() -> None:
    done = subprocess.run([sys.executable, "-m", "safe_redirect", "demo"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for rank in range(8):
        assert f"  [rank{rank}] rank {rank}: done" in out
        assert f"  [rank{rank}] (stderr) rank {rank}: a warning on stderr" in out
        assert f"  [rank{rank}] rank {rank}: [#####]" in out  # the \r progress bar, last state
    assert "  [master] master: all workers joined" in out
    assert "stats: records=" in out and "lanes_reclaimed=8" in out
    assert "every line of all 8 workers arrived once" in out


def test_the_demo_takes_its_size_from_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "safe_redirect", "demo", "--workers", "3",
                           "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[rank2] rank 2: done" in done.stdout and "[rank3]" not in done.stdout

"""`safe-redirect run -- COMMAND`, run as a user runs it: the real console script (`python -m
safe_redirect run`), real jobs that fork, spawn, use a forkserver and start subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

JOB = textwrap.dedent("""
    import multiprocessing as mp, os, sys
    def work(rank):
        os.environ["RANK"] = str(rank)
        for i in range(3):
            print(f"rank {rank} line {i}")
        print(f"rank {rank} warn", file=sys.stderr)
    if __name__ == "__main__":
        print("main starts")
        methods = ["fork", "spawn", "forkserver"]
        ps = [mp.get_context(m).Process(target=work, args=(r,)) for r, m in enumerate(methods)]
        for p in ps: p.start()
        for p in ps: p.join()
        sys.stdout.flush()
        os.system("echo from a shell")
        print("main done")
        sys.exit(int(sys.argv[1]))
""")


def _run(args: list[str], cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "safe_redirect", "run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("code", [0, 3])
def test_every_process_tagged_on_the_terminal_and_in_its_log(tmp_path, code) -> None:
    (tmp_path / "job.py").write_text(JOB)
    done = _run(["--log-dir", "logs", "--", sys.executable, "job.py", str(code)], tmp_path)
    assert done.returncode == code, done.stderr
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == [
        "all.log", "main.log", "rank0.log", "rank1.log", "rank2.log"]
    for rank in range(3):
        assert (logs / f"rank{rank}.log").read_text() == "".join(
            f"rank {rank} line {i}\n" for i in range(3)) + f"rank {rank} warn\n"
        for i in range(3):
            assert done.stdout.count(f"[rank{rank}] rank {rank} line {i}\n") == 1
        assert done.stderr.count(f"[rank{rank}] rank {rank} warn\n") == 1
    # the command's own lines and its shell's: untagged, as a master's
    assert (logs / "main.log").read_text() == "main starts\nfrom a shell\nmain done\n"
    assert done.stdout.startswith("main starts\n") and done.stdout.endswith("main done\n")
    merged = (logs / "all.log").read_text().splitlines()
    assert len(merged) == 3 + 3 * 4 and merged[-1] == "main done"
    assert sorted(merged) == sorted(
        ["main starts", "from a shell", "main done"] +
        [f"[rank{r}] rank {r} line {i}" for r in range(3) for i in range(3)] +
        [f"[rank{r}] rank {r} warn" for r in range(3)])


def test_a_command_killed_by_a_signal_exits_128_plus_n(tmp_path) -> None:
    code = "import os, signal; print('before', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    done = _run(["--", sys.executable, "-c", code], tmp_path)
    assert done.returncode == 128 + signal.SIGKILL
    assert done.stdout == "before\n"


def test_a_command_that_is_not_python(tmp_path) -> None:
    done = _run(["--log-dir", "logs", "--", "sh", "-c", "echo out; echo err >&2"], tmp_path)
    assert done.returncode == 0
    assert (done.stdout, done.stderr) == ("out\n", "err\n")
    assert (tmp_path / "logs" / "main.log").read_text() in ("out\nerr\n", "err\nout\n")


def test_a_command_that_does_not_exist(tmp_path) -> None:
    done = _run(["--", "no-such-command-anywhere"], tmp_path)
    assert done.returncode == 127
    assert "cannot run 'no-such-command-anywhere'" in done.stderr


@pytest.mark.parametrize("args", [[], ["--"], ["--tag", "[{nope}] ", "--", "true"]])
def test_bad_arguments_are_a_usage_error(tmp_path, args) -> None:
    done = _run(args, tmp_path)
    assert done.returncode == 2
    assert "usage: safe-redirect run" in done.stderr


SIGTERM_JOB = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    pids = open(sys.argv[1], "w")
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    pids.write(f"{os.getpid()} {leftover.pid}\\n"); pids.close()
    def stop(signum, frame):
        print("terminated: cleaning up", flush=True)
        sys.exit(7)
    signal.signal(signal.SIGTERM, stop)
    print("working", flush=True)
    time.sleep(120)
""")


def test_sigterm_reaches_the_job_and_leaves_no_process(tmp_path) -> None:
    """SIGTERM to `safe-redirect run` goes to the job's process group; the command's exit code
    comes back; what the job printed is logged; the child it left behind is stopped too."""
    (tmp_path / "job.py").write_text(SIGTERM_JOB)
    pids_file = tmp_path / "pids"
    cli = subprocess.Popen([sys.executable, "-m", "safe_redirect", "run", "--log-dir", "logs",
                            "--", sys.executable, "job.py", str(pids_file)], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "logs" / "main.log").exists() or "working" not in (
                tmp_path / "logs" / "main.log").read_text():
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)
        cli.send_signal(signal.SIGTERM)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 7, err
    assert out == "working\nterminated: cleaning up\n"
    assert (tmp_path / "logs" / "main.log").read_text() == out
    for pid in map(int, pids_file.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_torchrun_under_run_gives_a_log_per_rank(tmp_path) -> None:
    pytest.importorskip("torch.distributed.run")
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import os, sys
        rank = int(os.environ["RANK"])
        for i in range(5):
            print(f"rank {rank} step {i}")
        print(f"rank {rank} warns", file=sys.stderr)
    """))
    done = _run(["--log-dir", "logs", "--", sys.executable, "-m", "torch.distributed.run",
                 "--standalone", "--nproc-per-node", "2", "train.py"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in range(2):
        assert (tmp_path / "logs" / f"rank{rank}.log").read_text() == "".join(
            f"rank {rank} step {i}\n" for i in range(5)) + f"rank {rank} warns\n"
        assert done.stdout.count(f"[rank{rank}] rank {rank} step 4\n") == 1


def test_run_wandb_torchrun_every_rank_in_rank_0s_run_and_in_the_logs(tmp_path) -> None:
    """`safe-redirect run --wandb -- torchrun ...`: the ranks attach to the run's capture and
    join their job, so that rank 0's wandb run has every rank's lines, as the logs do."""
    pytest.importorskip("torch.distributed.run")
    pytest.importorskip("wandb")
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import os, sys, time
        rank = int(os.environ["RANK"])
        run = None
        if rank == 0:
            import wandb
            run = wandb.init(mode="offline", project="run")
        for i in range(20):
            print(f"rank {rank} step {i}")
        time.sleep(1.0)
        if run is not None:
            run.finish()
            open("log", "w").write(os.path.join(run.settings.files_dir, "output.log"))
    """))
    done = subprocess.run(
        [sys.executable, "-m", "safe_redirect", "run", "--wandb", "--log-dir", "logs", "--",
         sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-2000:]
    output_log = Path((tmp_path / "log").read_text()).read_text().splitlines()
    for rank in range(2):
        steps = [f"rank {rank} step {i}" for i in range(20)]
        assert [line for line in output_log if f"rank {rank} step" in line] == [
            f"[rank{rank}] {step}" for step in steps]
        assert (tmp_path / "logs" / f"rank{rank}.log").read_text().splitlines() == steps


CROWD = textwrap.dedent("""
    import multiprocessing as mp, os
    def work(rank):
        os.environ["RANK"] = str(rank)
        for step in range(3):
            print(f"step {step} loss 0.{rank}{step}7 grad 0x{rank:x}f")
        print(f"rank {rank} says {'hello' if rank % 2 else 'bye'}")
    if __name__ == "__main__":
        print("main")
        ps = [mp.get_context("fork").Process(target=work, args=(r,)) for r in range(4)]
        for p in ps: p.start()
        for p in ps: p.join()
""")


def test_ranks_filter_the_terminal_only(tmp_path) -> None:
    (tmp_path / "crowd.py").write_text(CROWD)
    done = _run(["--ranks", "1,3", "--log-dir", "logs", "--", sys.executable, "crowd.py"],
                tmp_path)
    assert done.returncode == 0, done.stderr
    shown = done.stdout.splitlines()
    assert "main" in shown  # no rank: always shown
    assert {line[:7] for line in shown if line.startswith("[")} == {"[rank1]", "[rank3]"}
    for rank in range(4):  # every rank logged
        assert len((tmp_path / "logs" / f"rank{rank}.log").read_text().splitlines()) == 4


def test_dedup_shows_a_crowds_line_once_and_counts_the_rest(tmp_path) -> None:
    """4 ranks print 3 steps alike (numbers and hex words aside) and a line in one of two
    words: the first rank's steps show, the 9 others are counted; each word's line shows once
    and is counted once more; the logs keep every line."""
    (tmp_path / "crowd.py").write_text(CROWD)
    done = _run(["--dedup", "--log-dir", "logs", "--", sys.executable, "crowd.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if " step " in line]
    assert len(steps) == 4, steps  # one rank's 3 steps, and the summary
    first = steps[0]
    assert steps[3] == f"{first} [repeated 9x across ranks]"
    assert len({line[:7] for line in steps[:3]}) == 1  # the steps of the rank shown first
    says = [line for line in done.stdout.splitlines() if " says " in line]
    shown = sorted(line.split(" says ")[1] for line in says if "repeated" not in line)
    assert shown == ["bye", "hello"]  # one of each word: ranks 0, 2 alike, ranks 1, 3 alike
    assert sum(line.endswith(" [repeated 1x across ranks]") for line in says) == 2
    assert len((tmp_path / "logs" / "all.log").read_text().splitlines()) == 1 + 4 * 4


@pytest.mark.parametrize("args", [["--ranks", "a"], ["--ranks", "-1"],
                                  ["--dedup-window", "0"], ["--dedup-window", "x"]])
def test_bad_filter_arguments_are_a_usage_error(tmp_path, args) -> None:
    done = _run([*args, "--", "true"], tmp_path)
    assert done.returncode == 2
    assert "usage: safe-redirect run" in done.stderr


BARS = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    def work(rank):
        os.environ["RANK"] = str(rank)
        for step in range(1, 21):
            sys.stdout.write(f"\\rtraining [{'#' * step}{'.' * (20 - step)}] {step}/20")
            sys.stdout.flush()
            time.sleep(0.005)
        sys.stdout.write("\\n")
        print(f"rank {rank} done")
    if __name__ == "__main__":
        ps = [mp.get_context("fork").Process(target=work, args=(r,)) for r in range(3)]
        for p in ps: p.start()
        for p in ps: p.join()
""")


def test_progress_bars_in_a_pipe_and_the_logs_in_their_last_state(tmp_path) -> None:
    (tmp_path / "bars.py").write_text(BARS)
    done = _run(["--log-dir", "logs", "--", sys.executable, "bars.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    for rank in range(3):
        bar = f"training [{'#' * 20}] 20/20"
        assert done.stdout.splitlines().count(f"[rank{rank}] {bar}") == 1
        assert (tmp_path / "logs" / f"rank{rank}.log").read_text() == f"{bar}\nrank {rank} done\n"
    assert "\r" not in done.stdout and "/20" not in done.stdout.replace("20/20", "")


def _on_a_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with fds 0, 1 and 2 on a pseudo-terminal; its exit code and what it drew."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "safe_redirect", "run", *args], cwd=cwd,
                            stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), out.decode("utf-8", "replace")


@pytest.mark.parametrize("no_color", [False, True])
def test_on_a_terminal_tags_are_coloured_and_bars_live(tmp_path, no_color) -> None:
    """On a tty: each rank's tag in a colour of its own (none with NO_COLOR), the bars drawn in
    a live region (cursor movements), every finished line once."""
    pytest.importorskip("rich")
    (tmp_path / "bars.py").write_text(BARS)
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    code, drawn = _on_a_terminal(["--", sys.executable, "bars.py"], tmp_path, env)
    assert code == 0, drawn[-2000:]
    colours = {"\x1b[36m[rank0] ", "\x1b[35m[rank1] ", "\x1b[32m[rank2] "}
    assert all((colour in drawn) != no_color for colour in colours), drawn[-1000:]
    assert "\x1b[1A\x1b[2K" in drawn  # the live region redrawn in place
    plain = drawn.replace("\x1b[0m", "")
    for rank in range(3):
        assert plain.count(f"[rank{rank}] rank {rank} done\r\n") == 1

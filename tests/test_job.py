"""Sibling ranks of one job (torchrun, accelerate, srun, N processes with RANK / WORLD_SIZE): every
rank's lines reach the rank that installs a capture, or opens a wandb run (safe_redirect/job.py).

Each test starts real processes with a launcher's environment; they meet through files in a
directory of the test's (bounded waits), never through sleeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from safe_redirect import spawn
from safe_redirect.job import JOB_PREFIX, job_key, job_name
from safe_redirect.ring import shm_dir

RANK_SCRIPT = textwrap.dedent('''
    import json, os, signal, sys, time
    plan = json.loads(sys.argv[1])
    meet = plan["meet"]
    rank = int(os.environ["RANK"])

    def mark(name):
        open(os.path.join(meet, name), "w").close()

    def wait(names):
        deadline = time.monotonic() + 60
        while not all(os.path.exists(os.path.join(meet, n)) for n in names):
            assert time.monotonic() < deadline, names
            time.sleep(0.002)

    if plan.get("join"):
        import safe_redirect
        assert safe_redirect.join_job() is not None
    others = [f"printed{r}" for r in range(1, int(os.environ["WORLD_SIZE"]))]
    lines = plan["lines"]
    if rank == 0:
        wait(others)  # the run begins after the others printed: their lines wait in the lanes
        run = None
        if plan.get("wandb"):
            import wandb
            run = wandb.init(mode="offline", project="job",
                             settings=wandb.Settings(console=plan["wandb"]))
        elif plan.get("install"):
            import safe_redirect
            got = []
            session = safe_redirect.install(lambda r: got.append([r.tag, r.stream, r.text]),
                                            mode=plan["install"])
        mark("reading")
        for i in range(lines):
            print(f"rank 0 line {i}")
        if plan.get("fdlines"):
            sys.stdout.flush()
            os.write(1, b"rank 0 fd write\\n")
            os.system("echo rank 0 shell")
        if plan.get("die"):
            wait(["killme"])
            os.kill(os.getpid(), signal.SIGKILL)
        wait([f"after{r}" for r in range(1, int(os.environ["WORLD_SIZE"]))])
        if run is not None:
            run.finish()
            print(os.path.join(run.settings.files_dir, "output.log"), file=open(
                os.path.join(meet, "log"), "w"))
        elif plan.get("install"):
            session.uninstall()
            json.dump(got, open(os.path.join(meet, "got.json"), "w"))
    else:
        if rank != plan.get("silent"):
            for i in range(lines):
                print(f"rank {rank} line {i}")
                if i % 10 == 0:
                    print(f"rank {rank} error {i}", file=sys.stderr)
            if plan.get("fdlines"):
                sys.stdout.flush()
                os.write(1, f"rank {rank} fd write\\n".encode())
                os.system(f"echo rank {rank} shell")
            if plan.get("fork"):
                pid = os.fork()
                if pid == 0:
                    print(f"rank {rank} forked child")
                    sys.stdout.flush()
                    os._exit(0)
                os.waitpid(pid, 0)
        sys.stdout.flush()
        mark(f"printed{rank}")
        if plan.get("reader_first", True):
            wait(["reading"])
        for i in range(plan.get("after", 0)):
            print(f"rank {rank} after {i}")
            if i == 100 and rank == 1:
                mark("killme")
        sys.stdout.flush()
        mark(f"after{rank}")
        if "stats" in plan:
            import safe_redirect
            json.dump(vars(safe_redirect.stats()), open(os.path.join(meet, f"stats{rank}"), "w"))
''')


def _job_segments() -> set[str]:
    return {n for n in os.listdir(shm_dir()) if n.startswith(JOB_PREFIX)}


@pytest.fixture
def job(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Run RANK_SCRIPT as the ranks of one job: `job(world, plan, env)` -> (returncodes, meet)."""
    if spawn.ensure_pth() is None:
        pytest.skip("no writable site-packages for safe_redirect.pth")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(20000 + (os.getpid() * 7 + len(request.node.name)) % 20000)

    def run(world: int, plan: dict[str, Any], env: dict[str, str] | None = None,
            timeout: float = 120.0) -> tuple[list[int], Path]:
        meet = tmp_path / "meet"
        shutil.rmtree(meet, ignore_errors=True)
        meet.mkdir()
        plan = {"meet": str(meet), "lines": 50, **plan}
        procs, files = [], []
        for rank in range(world):
            rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                        "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
            rank_env.pop("SAFE_REDIRECT_JOB", None)
            files += [open(meet / f"out{rank}", "w"), open(meet / f"err{rank}", "w")]
            procs.append(subprocess.Popen(
                [sys.executable, str(script), json.dumps(plan)], cwd=tmp_path, env=rank_env,
                stdout=files[-2], stderr=files[-1]))
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                pytest.fail(f"a rank hung for {timeout} s")
        for f in files:
            f.close()
        return codes, meet

    before = _job_segments()
    yield run
    assert _job_segments() <= before, "a job segment was left in /dev/shm"


def _rank_lines(texts: list[tuple[str, str]], world: int, lines: int) -> None:
    """Every rank's stdout lines once, in order, under its own tag; stderr likewise."""
    for rank in range(world):
        tag = f"[rank{rank}] "
        out = [t for tg, t in texts if tg == tag and " line " in t]
        assert out == [f"rank {rank} line {i}" for i in range(lines)], (rank, out[:5])
        if rank:
            err = [t for tg, t in texts if tg == tag and " error " in t]
            assert err == [f"rank {rank} error {i}" for i in range(0, lines, 10)], (rank, err)


def _split(got: list[list[str]]) -> list[tuple[str, str]]:
    return [(tag, line) for tag, _stream, text in got for line in text.splitlines()]


@pytest.mark.parametrize("mode", ["wrap", "fd"])
def test_every_ranks_lines_reach_the_rank_that_installs(job, mode) -> None:
    codes, meet = job(4, {"join": True, "install": mode, "fork": True})
    assert codes == [0, 0, 0, 0], [(meet / f"err{r}").read_text()[-500:] for r in range(4)]
    texts = _split(json.loads((meet / "got.json").read_text()))
    _rank_lines(texts, 4, 50)
    for rank in (1, 2, 3):  # a rank's forked child (a DataLoader worker) writes under its rank
        assert texts.count((f"[rank{rank}] ", f"rank {rank} forked child")) == 1


@pytest.mark.parametrize("reader", ["fd", "wrap"])
def test_ranks_in_fd_mode_also_deliver_what_c_code_and_subprocesses_write(job, reader) -> None:
    """SAFE_REDIRECT_JOB_MODE=fd: every rank captures fds 1 and 2 (os.write, a shell's echo),
    whatever mode the reading rank installs, each line once."""
    codes, meet = job(3, {"join": True, "install": reader, "fdlines": True, "fork": True},
                      env={"SAFE_REDIRECT_JOB_MODE": "fd"})
    assert codes == [0, 0, 0], [(meet / f"err{r}").read_text()[-500:] for r in range(3)]
    texts = _split(json.loads((meet / "got.json").read_text()))
    _rank_lines(texts, 3, 50)
    for rank in range(3):
        for line in (f"rank {rank} fd write", f"rank {rank} shell"):
            assert texts.count((f"[rank{rank}] ", line)) == 1, (line, texts[-12:])
    for rank in (1, 2):
        assert texts.count((f"[rank{rank}] ", f"rank {rank} forked child")) == 1


@pytest.mark.parametrize("console", ["wrap", "redirect", "wrap_emu"])
def test_patched_wandb_run_of_rank_0_has_every_ranks_lines(job, console) -> None:
    """SAFE_REDIRECT_PATCH=wandb and nothing else: no code of ours in the script."""
    codes, meet = job(3, {"wandb": console}, env={"SAFE_REDIRECT_PATCH": "wandb"})
    assert codes == [0, 0, 0], [(meet / f"err{r}").read_text()[-800:] for r in range(3)]
    log = Path((meet / "log").read_text().strip()).read_text().splitlines()
    texts = [(line[:line.index("]") + 2], line[line.index("]") + 2:]) for line in log
             if line.startswith("[rank")]
    _rank_lines(texts, 3, 50)


def _torchrun_job(tmp_path: Path, script_text: str) -> tuple[Path, Path, dict[str, str]]:
    """A script for torchrun to run, the directory its ranks meet in, and the environment of
    a job under SAFE_REDIRECT_PATCH=wandb (skips without torch or a writable site-packages)."""
    pytest.importorskip("torch.distributed.run")
    if spawn.ensure_pth() is None:
        pytest.skip("no writable site-packages for safe_redirect.pth")
    script = tmp_path / "job.py"
    script.write_text(script_text)
    meet = tmp_path / "meet"
    meet.mkdir()
    env = {**os.environ, "SAFE_REDIRECT_PATCH": "wandb", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    env.pop("SAFE_REDIRECT_JOB", None)
    return script, meet, env


@pytest.mark.parametrize(("console", "job_mode", "tee"), [
    ("wrap", "wrap", False), ("redirect", "wrap", False), ("redirect", "fd", False),
    ("wrap", "wrap", True)])
def test_torchrun_ranks_lines_in_rank_0s_wandb_run(tmp_path, console, job_mode, tee) -> None:
    """A real `torchrun --standalone --nproc-per-node 4`, SAFE_REDIRECT_PATCH=wandb in its
    environment, rank 0 opening its run after the others printed; with
    SAFE_REDIRECT_JOB_MODE=fd what the ranks write to fds 1 and 2 too; with `--tee 3
    --log-dir`, torchrun's own files and console keep every line as before."""
    script, meet, env = _torchrun_job(tmp_path, RANK_SCRIPT)
    env["SAFE_REDIRECT_JOB_MODE"] = job_mode
    plan = {"meet": str(meet), "lines": 50, "wandb": console, "fork": True,
            "fdlines": job_mode == "fd"}
    before = _job_segments()
    logs = tmp_path / "torchrun-logs"
    tee_args = ["--tee", "3", "--log-dir", str(logs)] if tee else []
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         *tee_args, str(script), json.dumps(plan)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if tee:
        for rank in range(4):
            (out,) = logs.glob(f"*/attempt_0/{rank}/stdout.log")
            assert [line for line in out.read_text().splitlines() if " line " in line] == [
                f"rank {rank} line {i}" for i in range(50)]
            assert sum(f"rank {rank} line 7" in line for line in proc.stdout.splitlines()) == 1
    log = Path((meet / "log").read_text().strip()).read_text().splitlines()
    texts = [(line[:line.index("]") + 2], line[line.index("]") + 2:]) for line in log
             if line.startswith("[rank")]
    _rank_lines(texts, 4, 50)
    for rank in (1, 2, 3):
        assert texts.count((f"[rank{rank}] ", f"rank {rank} forked child")) == 1
    if job_mode == "fd":
        for rank in range(4):
            for line in (f"rank {rank} fd write", f"rank {rank} shell"):
                assert texts.count((f"[rank{rank}] ", line)) == 1, line
    assert len(texts) == len(log)  # every line of the log is tagged
    assert _job_segments() <= before


RESTART_SCRIPT = textwrap.dedent('''
    import os, sys, time
    rank = int(os.environ["RANK"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    meet = sys.argv[1]
    run = None
    if rank == 0:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(meet, f"printed{attempt}")):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        import wandb
        run = wandb.init(mode="offline", project="job", settings=wandb.Settings(console="wrap"))
    for i in range(20):
        print(f"attempt {attempt} rank {rank} line {i}")
    sys.stdout.flush()
    if rank == 1:
        open(os.path.join(meet, f"printed{attempt}"), "w").close()
        if attempt == 0:
            sys.exit(3)  # torchrun stops every worker and starts them all again
        while not os.path.exists(os.path.join(meet, "done")):
            time.sleep(0.005)
    if run is not None:
        run.finish()
        with open(os.path.join(meet, "log"), "a") as f:
            f.write(os.path.join(run.settings.files_dir, "output.log") + "\\n")
        open(os.path.join(meet, "done"), "w").close()
''')


def test_torchrun_restart_the_new_attempts_run_has_its_ranks_lines(tmp_path) -> None:
    """torchrun --max-restarts 1: rank 1 fails in the first attempt, every worker is stopped
    and started again (new pids, the same job id): the second attempt's run has both ranks'
    lines of that attempt, once, and nothing is left in /dev/shm."""
    script, meet, env = _torchrun_job(tmp_path, RESTART_SCRIPT)
    before = _job_segments()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", "1", str(script), str(meet)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs = (meet / "log").read_text().split()
    assert len(logs) == 1  # attempt 0's rank 0 was stopped before its run finished
    log = Path(logs[0]).read_text().splitlines()
    for rank in (0, 1):
        assert [line for line in log if line.startswith(f"[rank{rank}] ")] == [
            f"[rank{rank}] attempt 1 rank {rank} line {i}" for i in range(20)]
    assert len(log) == 40
    assert _job_segments() <= before


def test_without_a_reader_no_rank_waits_and_what_does_not_fit_is_counted(job) -> None:
    """Nobody installs: lanes fill, then every write spills at once (no stall), counted."""
    big = 60_000  # about 2 MiB of records per rank, in lanes of 1 MiB
    codes, meet = job(3, {"join": True, "lines": 10, "after": big, "reader_first": False,
                          "stats": True})
    assert codes == [0, 0, 0]
    for rank in (1, 2):
        stats = json.loads((meet / f"stats{rank}").read_text())
        assert stats["stalls"] == 0 and stats["spilled_bytes"] > 0, stats
        out = (meet / f"out{rank}").read_text().splitlines()
        assert out[-1] == f"rank {rank} after {big - 1}"  # the terminal got everything


def test_the_reader_killed_mid_run_leaves_the_others_running(job) -> None:
    codes, meet = job(3, {"join": True, "install": "wrap", "die": True, "after": 20_000})
    assert codes[0] == -signal.SIGKILL
    assert codes[1:] == [0, 0], [(meet / f"err{r}").read_text()[-500:] for r in (1, 2)]
    for rank in (1, 2):
        assert (meet / f"out{rank}").read_text().splitlines()[-1] == f"rank {rank} after 19999"


def test_a_rank_that_never_prints(job) -> None:
    codes, meet = job(3, {"join": True, "install": "wrap", "silent": 2})
    assert codes == [0, 0, 0]
    texts = _split(json.loads((meet / "got.json").read_text()))
    assert not [t for t in texts if t[0] == "[rank2] "]
    _rank_lines([t for t in texts if t[0] != "[rank2] "], 2, 50)


def test_a_segment_left_by_killed_ranks_is_not_joined(tmp_path) -> None:
    """All members SIGKILLed: the next job of the same name starts from an empty segment."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29123"}
    env.pop("SAFE_REDIRECT_JOB", None)
    name = job_name(job_key(env) or "")
    code = ("import os, signal, safe_redirect; safe_redirect.join_job(); print('old line'); "
            "import sys; sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert name in _job_segments()
    code = textwrap.dedent("""
        import safe_redirect
        safe_redirect.join_job()
        got = []
        s = safe_redirect.install(lambda r: got.append(r.text))
        print("new line")
        s.uninstall()
        assert "".join(got) == "new line\\n", got
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "RANK": "0"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert name not in _job_segments()


@pytest.mark.parametrize(("env", "key"), [
    ({}, None),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "1"}, None),  # one rank: no job
    ({"RANK": "1", "WORLD_SIZE": "4"}, None),  # nothing names the job
    ({"RANK": "1", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "abc", "GROUP_RANK": "0",
      "MASTER_PORT": "5"}, "torchelastic:abc:0:4"),
    ({"RANK": "1", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "h",
      "MASTER_PORT": "29500"}, "rendezvous:h:29500:4"),  # accelerate, static rendezvous
    ({"RANK": "1", "WORLD_SIZE": "4", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
      "SLURM_NODEID": "2", "MASTER_PORT": "5"}, "slurm:7.0:2:4"),
])
def test_the_job_is_named_by_the_launchers_environment(env, key) -> None:
    assert job_key(env) == key

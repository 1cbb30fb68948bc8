"""Every way a child is born (the default start method too), in both modes: numbered lines on
both streams, each exactly once, in order per process, tagged with the child's rank. Each case
runs in a fresh interpreter whose terminal is a pipe (pytest's own capture would sit on fds 1
and 2)."""

from __future__ import annotations

import os

import pytest

from .conftest import run_python_file

SCRIPT = """
import multiprocessing, os, subprocess, sys
import safe_redirect

LINES = 200
CHILD = '''
import os, sys
rank = int(os.environ["RANK"])
for i in range({lines}):
    print(f"r{{rank}} out {{i}}")
    print(f"r{{rank}} err {{i}}", file=sys.stderr)
'''.format(lines=LINES)

def work(rank):
    os.environ["RANK"] = str(rank)
    exec(CHILD)
    sys.stdout.flush()
    sys.stderr.flush()

if __name__ == "__main__":
    method, mode, log_path = sys.argv[1:]
    log = open(log_path, "w")

    def on_output(record):
        for line in record.text.splitlines():
            log.write(f"{record.pid}\\t{record.stream}\\t{record.tag}\\t{line}\\n")
        log.flush()

    with safe_redirect.install(on_output=on_output, mode=mode):
        if method == "subprocess":
            for rank in range(3):
                env = dict(os.environ, RANK=str(rank))
                subprocess.run([sys.executable, "-c", CHILD], env=env, check=True)
        else:
            # "default": no context named, as most code does (forkserver since 3.14, fork before)
            context = multiprocessing.get_context(None if method == "default" else method)
            children = [context.Process(target=work, args=(r,)) for r in range(3)]
            for child in children:
                child.start()
            for child in children:
                child.join()
                assert child.exitcode == 0
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["wrap", "fd"])
@pytest.mark.parametrize("method", ["default", "fork", "spawn", "forkserver", "subprocess"])
def test_every_birth_method_in_every_mode(tmp_path, method, mode) -> None:
    log = tmp_path / "records.tsv"
    # the 3.12+ fork warning shown wherever it comes from (multiprocessing's module, say)
    env = dict(os.environ, PYTHONWARNINGS="always:This process:DeprecationWarning")
    result = run_python_file(tmp_path / "main.py", SCRIPT, 240, args=(method, mode, str(log)),
                             env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "multi-threaded" not in result.stderr  # 3.12+: no fork warning of ours
    by_origin: dict[tuple[str, str], list[str]] = {}
    tags: dict[str, set[str]] = {}
    for row in log.read_text().splitlines():
        pid, stream, tag, line = row.split("\t", 3)
        by_origin.setdefault((pid, stream), []).append(line)
        tags.setdefault(pid, set()).add(tag)
    children = {}
    for (pid, stream), lines in by_origin.items():
        rank = int(lines[0][1:].split()[0])
        children.setdefault(rank, set()).add(pid)
        kind = "out" if stream == "stdout" else "err"
        assert lines == [f"r{rank} {kind} {i}" for i in range(200)], (method, mode, pid, stream)
        assert tags[pid] == {f"[rank{rank}] "}
    assert sorted(children) == [0, 1, 2]
    assert all(len(pids) == 1 for pids in children.values())  # one process, one lane, per rank
    # The terminal still gets every byte, once. (Its lines may interleave mid-line across
    # processes, as they do without safe_redirect when PYTHONUNBUFFERED writes text and newline
    # apart.)
    expected = "".join(f"r{rank} out {i}\n" for rank in range(3) for i in range(200))
    assert sorted(result.stdout) == sorted(expected)

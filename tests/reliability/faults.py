"""Run a fault loop as the master in a fresh interpreter, bounded, and get its Tally back.

    python -m tests.reliability.faults NAME '{"runs": 500}' RESULT.json

A fresh master per loop: a loop that forks hundreds of children should not fork pytest's process
(large, and its stdout is pytest's capture file), a hang must be killable as a whole (the loop
runs in a process group of its own), and a segment the loop leaves in /dev/shm is seen by name.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from safe_redirect.ring import sweep_orphaned_segments

from .tally import Tally, wait_until

ROOT = Path(__file__).resolve().parents[2]

#: fault name -> "module:function" of this package; each function takes keyword parameters and
#: returns a Tally
FAULTS = {
    "kill_mid_write": "kill:kill_mid_write",
    "full_ring": "overflow:full_ring",
    "master_death": "master_death:master_death",
    "fork_storm": "storms:fork_storm",
    "pid_reuse": "pid_reuse:pid_reuse",
    "bad_input": "bad_input:bad_input",
    "soak": "soak:soak",
    "ring_model": "ring_model:ring_model",
}

#: variables of a capture that may be installed around the caller: the loop must start clean
_CAPTURE_VARIABLES = ("SAFE_REDIRECT_ATTACH", "SAFE_REDIRECT_PATCH")


def resolve(name: str) -> Callable[..., Tally]:
    module, function = FAULTS[name].split(":")
    loop: Callable[..., Tally] = getattr(importlib.import_module(f"{__package__}.{module}"),
                                         function)
    return loop


def segments_of(pid: int) -> list[str]:
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"safe_redirect-{pid}-")]
    except FileNotFoundError:
        return []


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies waiting for init do not count)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_fault(name: str, timeout: float = 110.0, **params: Any) -> Tally:
    """Run loop `name` with `params` in a new interpreter; a hang or a crash is counted."""
    env = {k: v for k, v in os.environ.items() if k not in _CAPTURE_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="safe_redirect-fault-") as tmp:
        result = Path(tmp) / "tally.json"
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", f"{__package__}.faults", name, json.dumps(params), str(result)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)  # the loop and every child it left
            _, err = proc.communicate()
            sweep_orphaned_segments()  # the segments of the masters just killed
            tally = Tally(fault=name)
            tally.hang(f"the {name} loop ran over {timeout} s; stderr ends {err[-1500:]!r}")
            return tally
        if result.exists():
            tally = Tally.from_json(result.read_text())
        else:
            tally = Tally(fault=name)
            tally.problem(f"the {name} loop exited {proc.returncode} without figures; "
                          f"stderr ends {err[-1500:]!r}")
        if not wait_until(lambda: not _group_alive(proc.pid), 5.0, step=0.01):
            _kill_group(proc.pid)
            tally.problem(f"the {name} loop left processes running")
        tally.seconds = time.monotonic() - t0
    leaked = segments_of(proc.pid)
    if leaked:
        tally.problem(f"the loop's master left segments behind: {leaked}")
        for name_ in leaked:
            os.unlink(f"/dev/shm/{name_}")
    return tally


def main(argv: list[str]) -> int:
    name, params, result = argv
    t0 = time.monotonic()
    tally = resolve(name)(**json.loads(params))
    tally.seconds = time.monotonic() - t0
    Path(result).write_text(tally.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

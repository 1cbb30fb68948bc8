"""Part 5, memory: peak RSS of the master and of a forked child, with the library and without.

Each sample is a fresh interpreter (stdout on /dev/null): `none` imports nothing more than the
standard library; `import` imports what install() loads (safe_redirect, psutil) and installs
nothing; `wrap` and `fd` run install(mode=..., lanes=16) first (16 lanes of 1 MiB: a
16 MiB segment, of which a process keeps resident what it touches). Then one child is forked and
prints 20,000 80-byte lines (1.6 MB: it goes round its lane once at least), the master waits for it
and for every line to be delivered: the child's peak RSS as it ends, the master's at the end.
Peak RSS is VmHWM of /proc/self/status, the high-water mark of the process's own address space
(ru_maxrss would carry the high-water mark of what ran before an exec: the benchmark harness).
The child's figure includes the pages it shares with the master at fork.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from harness import BenchError, log, rotated, summarize

MODES = ("none", "import", "wrap", "fd")
LANES = 16
LINES = 20_000

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    mode, lanes, lines = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    delivered = [0]

    def peak_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    if mode == "import":  # the modules install() loads, nothing installed
        import safe_redirect.session
    if mode in ("wrap", "fd"):
        import safe_redirect
        def on_output(record):
            delivered[0] += record.text.count("\\n")
        session = safe_redirect.install(on_output, mode=mode, lanes=lanes, streams=("stdout",))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for _ in range(lines):
            print("x" * 79)
        sys.stdout.flush()
        if mode == "fd":  # wait until the pump has put every byte in the lane
            lane, want = session._writer.producer.lane, lines * 80
            while session._writer.ring.lane_info(lane).bytes < want:
                time.sleep(0.001)
        os.write(w, str(peak_kib()).encode())
        os._exit(0)
    os.close(w)
    child_kib = int(os.read(r, 100))
    os.waitpid(pid, 0)
    if mode in ("wrap", "fd"):
        deadline = time.monotonic() + 30
        while delivered[0] < lines and time.monotonic() < deadline:
            time.sleep(0.005)
    master_kib = peak_kib()
    if mode in ("wrap", "fd"):
        session.uninstall()
    json.dump({"master_kib": master_kib, "child_kib": child_kib, "delivered": delivered[0]},
              sys.stderr)
""")


def sample(mode: str) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(LANES), str(LINES)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
                          check=False, text=True)
    if proc.returncode:
        raise BenchError(f"{mode}: exit code {proc.returncode}: {proc.stderr[-500:]}")
    got: dict[str, int] = json.loads(proc.stderr.strip().splitlines()[-1])
    if mode in ("wrap", "fd") and got["delivered"] != LINES:
        raise BenchError(f"{mode}: {got['delivered']} of {LINES} lines delivered")
    return got


def measure(reps: int) -> dict[str, Any]:
    """Each repetition samples every mode (rotating order); ratios within the repetition."""
    mib: dict[str, dict[str, list[float]]] = {m: {"master": [], "child": []} for m in MODES}
    ratio: dict[str, dict[str, list[float]]] = {m: {"master": [], "child": []} for m in MODES[1:]}
    try:
        for rep in range(reps + 1):
            got = {mode: sample(mode) for mode in rotated(MODES, rep)}
            if rep == 0:
                continue  # the warm-up
            for mode in MODES:
                for side in ("master", "child"):
                    mib[mode][side].append(got[mode][f"{side}_kib"] / 1024)
                    if mode != "none":
                        ratio[mode][side].append(got[mode][f"{side}_kib"]
                                                 / got["none"][f"{side}_kib"])
    except (BenchError, subprocess.TimeoutExpired) as exc:
        log(f"    FAILED: {exc}")
        return {"error": str(exc)}
    out: dict[str, Any] = {"lanes": LANES, "lines": LINES}
    for mode in MODES:
        out[mode] = {side: {"mib": summarize(mib[mode][side])} for side in ("master", "child")}
        if mode != "none":
            for side in ("master", "child"):
                out[mode][side]["ratio"] = summarize(ratio[mode][side])
                out[mode][side]["delta_mib"] = summarize(
                    [a - b for a, b in zip(mib[mode][side], mib["none"][side], strict=True)])
    return out

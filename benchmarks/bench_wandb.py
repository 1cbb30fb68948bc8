"""wandb before and after `safe_redirect.patch_wandb()`: the cost of a print in the master under a
capturing run, and what a 4-process job leaves in the run's output.log. console="off" shows what a
print costs in a run that captures nothing: wandb's import-time write hook still runs (unpatched).

    python benchmarks/bench_wandb.py [--prints N]

Each configuration runs in a fresh interpreter (wandb.init once per process) with stdout on
/dev/null, WANDB_MODE=offline. The print cost is the median of 5 timed batches, as a ratio to a
plain print measured in the same process before wandb.init. Results also go to
benchmarks/results/bench_wandb.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_wandb.json"

CHILD = textwrap.dedent("""
    import json, multiprocessing, os, statistics, sys, time
    console, patch, report = sys.argv[1], sys.argv[2] == "patched", sys.argv[4]
    prints = int(sys.argv[3])
    LINE = "x" * 79

    def batch(n):
        t = time.perf_counter()
        for _ in range(n):
            print(LINE)
        return (time.perf_counter() - t) / n * 1e9

    def work(rank):
        for i in range(100):
            print(f"rank {rank} line {i}")

    if __name__ == "__main__":
        plain = statistics.median(batch(prints) for _ in range(5))
        if patch:
            import safe_redirect
            safe_redirect.patch_wandb()
        import wandb
        run = wandb.init(mode="offline", project="bench", settings=wandb.Settings(console=console))
        batch(prints)  # warm-up
        hooked = statistics.median(batch(prints) for _ in range(5))
        t0 = time.perf_counter()
        children = [multiprocessing.get_context("fork").Process(target=work, args=(r,))
                    for r in range(4)]
        for c in children:
            c.start()
        for c in children:
            c.join()
        run.finish()
        job = time.perf_counter() - t0
        path = os.path.join(run.settings.files_dir, "output.log")
        log = open(path).read().splitlines() if os.path.exists(path) else []
        child_lines = sum(1 for x in log if "rank " in x and " line " in x)
        json.dump({"plain_ns": plain, "hooked_ns": hooked, "job_s": job,
                   "child_lines": child_lines}, open(report, "w"))
""")


def measure(console: str, patch: str, prints: int, workdir: str) -> dict[str, float]:
    script = Path(workdir) / "child.py"
    script.write_text(CHILD)
    report = Path(workdir) / f"{console}-{patch}.json"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("PYTHONUNBUFFERED", None)
    with open(os.devnull, "w") as devnull:
        subprocess.run([sys.executable, str(script), console, patch, str(prints), str(report)],
                       stdout=devnull, stderr=subprocess.DEVNULL, env=env, cwd=workdir,
                       check=True, timeout=600)
    result: dict[str, float] = json.loads(report.read_text())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prints", type=int, default=20000,
                        help="prints per timed batch (a tenth under wandb's own wrap: 700x slower)")
    prints = parser.parse_args().prints
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for console in ("off", "wrap", "redirect"):
            for patch in ("wandb", "patched"):
                slow = (console, patch) == ("wrap", "wandb")
                r = measure(console, patch, prints // 10 if slow else prints, workdir)
                rows.append({"console": console, "capture": patch, **r,
                             "ratio": r["hooked_ns"] / r["plain_ns"]})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2))
    print(f"{'console':9} {'capture':8} {'plain ns':>9} {'in run ns':>10} {'ratio':>7} "
          f"{'children lines in output.log':>29} {'4-process job s':>16}")
    for r in rows:
        print(f"{r['console']:9} {r['capture']:8} {r['plain_ns']:9.0f} {r['hooked_ns']:10.0f} "
              f"{r['ratio']:7.1f} {int(r['child_lines']):>20} of 400 {r['job_s']:16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

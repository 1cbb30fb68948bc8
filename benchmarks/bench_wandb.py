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
    console, patch, report = sys.argv[1], sys.argv[2].startswith("patched"), sys.argv[4]
    prints, job_lines = int(sys.argv[3]), int(sys.argv[5])
    LINE = "x" * 79

    def batch(n):
        t = time.perf_counter()
        for _ in range(n):
            print(LINE)
        return (time.perf_counter() - t) / n * 1e9

    def work(rank):
        for i in range(job_lines // 4):
            print(f"rank {rank} line {i}")

    if __name__ == "__main__":
        plain = statistics.median(batch(prints) for _ in range(5))
        if patch:
            import safe_redirect
            safe_redirect.patch_wandb()
        import wandb
        run = wandb.init(mode="offline", project="bench", settings=wandb.Settings(console=console))
        if sys.argv[2] == "patched-nocb":  # safe_redirect's own cost: wandb's callbacks detached
            run._out_redir.cbs = run._err_redir.cbs = ()
        batch(prints)  # warm-up
        import psutil  # wandb-core is a child process: its CPU time is part of a print's cost
        helpers = psutil.Process().children(recursive=True)
        def helpers_cpu():
            return sum(sum(p.cpu_times()[:2]) for p in helpers if p.is_running())
        cpu0, helpers0, wall0 = time.process_time(), helpers_cpu(), time.perf_counter()
        hooked = statistics.median(batch(prints) for _ in range(5))
        wall = time.perf_counter() - wall0
        cpu = {"our_cpu": (time.process_time() - cpu0) / wall,
               "wandb_core_cpu": (helpers_cpu() - helpers0) / wall}
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
                   "child_lines": child_lines, **cpu}, open(report, "w"))
""")


def measure(console: str, patch: str, prints: int, workdir: str,
            job_lines: int = 400) -> dict[str, float]:
    script = Path(workdir) / "child.py"
    script.write_text(CHILD)
    report = Path(workdir) / f"{console}-{patch}.json"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("PYTHONUNBUFFERED", None)
    with open(os.devnull, "w") as devnull:
        subprocess.run([sys.executable, str(script), console, patch, str(prints), str(report),
                        str(job_lines)],
                       stdout=devnull, stderr=subprocess.DEVNULL, env=env, cwd=workdir,
                       check=True, timeout=600)
    result: dict[str, float] = json.loads(report.read_text())
    return result


#: "wandb": wandb's own classes; "patched": safe_redirect.patch_wandb(); "patched-nocb": patched,
#: with wandb's callbacks detached after init: safe_redirect's own share of the cost
CAPTURES = ("wandb", "patched", "patched-nocb")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prints", type=int, default=20000,
                        help="prints per timed batch (a tenth under wandb's own wrap and wrap_emu)")
    parser.add_argument("--job-lines", type=int, default=400,
                        help="lines the 4-process job prints in all")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for console in ("off", "wrap", "wrap_emu", "redirect"):
            for patch in CAPTURES[:2] if console == "off" else CAPTURES:
                # wandb's own wrap (~700x) and wrap_emu (worse than linear in the lines its
                # emulator holds: 8,000 prints took 23 s, 20,000 over 10 min) get a tenth
                slow = patch == "wandb" and console in ("wrap", "wrap_emu")
                r = measure(console, patch, args.prints // 10 if slow else args.prints, workdir,
                            args.job_lines)
                rows.append({"console": console, "capture": patch, **r,
                             "ratio": r["hooked_ns"] / r["plain_ns"]})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2))
    print(f"{'console':9} {'capture':12} {'plain ns':>9} {'in run ns':>10} {'ratio':>7} "
          f"{'our CPU':>8} {'wandb-core CPU':>15} {'children lines in output.log':>29} "
          f"{'job s':>7}")
    for r in rows:
        print(f"{r['console']:9} {r['capture']:12} {r['plain_ns']:9.0f} {r['hooked_ns']:10.0f} "
              f"{r['ratio']:7.1f} {r['our_cpu']:8.2f} {r['wandb_core_cpu']:15.2f} "
              f"{int(r['child_lines']):>17} of {args.job_lines:<9} {r['job_s']:7.2f}")
    print("CPU columns: cores kept busy during the timed prints (this process; wandb-core).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

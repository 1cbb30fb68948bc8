"""wandb before and after `safe_redirect.patch_wandb()`: the cost of a print in the master under a
capturing run, and what a 4-process job leaves in the run's output.log. console="off" shows what a
print costs in a run that captures nothing: wandb's import-time write hook still runs (unpatched).

    python benchmarks/bench_wandb.py [--prints N] [--job-lines N] [--reps N] [--unbuffered]

Each configuration runs in a fresh interpreter (wandb.init once per process) with stdout on
/dev/null, WANDB_MODE=offline, once per repetition; stdout block-buffered (PYTHONUNBUFFERED unset,
as for a file or a pipe), or with --unbuffered line by line (PYTHONUNBUFFERED=1). The print cost
is the median of 5 timed batches, as a ratio to a plain print measured in the same process before
wandb.init; the job's wall time runs from starting its 4 children to the end of run.finish(), as
a ratio to the same job without wandb (console "none"). benchmarks/run.py runs this
as its part 4; alone, the results go to benchmarks/results/bench_wandb.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "bench_wandb.json"

CHILD = textwrap.dedent("""
    import json, multiprocessing, os, statistics, sys, time
    console, patch, report = sys.argv[1], sys.argv[2].startswith("patched"), sys.argv[4]
    prints, job_lines = int(sys.argv[3]), int(sys.argv[5])
    LINE = "x" * 79

    CPU = []  # process CPU (every thread: the drain's too) per print of each batch, ns

    def batch(n):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            print(LINE)
        CPU.append((time.process_time() - c) / n * 1e9)
        return (time.perf_counter() - t) / n * 1e9

    def work(rank):
        for i in range(job_lines // 4):
            print(f"rank {rank} line {i}")

    if __name__ == "__main__":
        plain = statistics.median(batch(prints) for _ in range(5))
        plain_cpu = statistics.median(CPU)
        if patch:
            import safe_redirect
            safe_redirect.patch_wandb()
        run = None
        if console != "none":  # "none": no wandb at all, the job's baseline
            import wandb
            run = wandb.init(mode="offline", project="bench",
                             settings=wandb.Settings(console=console))
        if sys.argv[2] == "patched-nocb":  # safe_redirect's own cost: wandb's callbacks detached
            run._out_redir.cbs = run._err_redir.cbs = ()
        batch(prints)  # warm-up
        import psutil  # wandb-core is a child process: its CPU time is part of a print's cost
        helpers = psutil.Process().children(recursive=True)
        def helpers_cpu():
            return sum(sum(p.cpu_times()[:2]) for p in helpers if p.is_running())
        cpu0, helpers0, wall0 = time.process_time(), helpers_cpu(), time.perf_counter()
        del CPU[:]
        hooked = statistics.median(batch(prints) for _ in range(5))
        hooked_cpu = statistics.median(CPU)
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
        if run is not None:
            run.finish()
        job = time.perf_counter() - t0
        path = os.path.join(run.settings.files_dir, "output.log") if run else ""
        log = open(path).read().splitlines() if os.path.exists(path) else []
        child_lines = sum(1 for x in log if "rank " in x and " line " in x)
        json.dump({"plain_ns": plain, "hooked_ns": hooked, "job_s": job,
                   "plain_cpu_ns": plain_cpu, "hooked_cpu_ns": hooked_cpu,
                   "child_lines": child_lines, **cpu}, open(report, "w"))
""")


def measure(console: str, patch: str, prints: int, workdir: str,
            job_lines: int = 400, unbuffered: bool = False) -> dict[str, float]:
    script = Path(workdir) / "child.py"
    script.write_text(CHILD)
    report = Path(workdir) / f"{console}-{patch}.json"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open(os.devnull, "w") as devnull:
        subprocess.run([sys.executable, str(script), console, patch, str(prints), str(report),
                        str(job_lines)],
                       stdout=devnull, stderr=subprocess.DEVNULL, env=env, cwd=workdir,
                       check=True, timeout=600)
    result: dict[str, float] = json.loads(report.read_text())
    return result


#: (console, capture). Capture "wandb": wandb's own classes; "patched": safe_redirect.patch_wandb();
#: "patched-nocb": patched, with wandb's callbacks detached after init: safe_redirect's own share
#: of the cost. console="none" is no wandb at all: the job's baseline; console="off" is a run
#: that captures nothing (wandb's import-time write hook still runs in every process).
CONFIGS = (("none", "wandb"), ("off", "wandb"), ("off", "patched"), ("wrap", "wandb"),
           ("wrap_emu", "wandb"), ("redirect", "wandb"), ("wrap", "patched"),
           ("wrap_emu", "patched"), ("redirect", "patched"), ("wrap", "patched-nocb"),
           ("redirect", "patched-nocb"))


def _prints_for(console: str, patch: str, prints: int) -> int:
    """wandb's own wrap (~700x) gets a tenth; its wrap_emu, worse than linear in the lines its
    emulator holds (8,000 prints took 23 s, 20,000 over 10 min), a fiftieth: the 7 batches of a
    run (warm-up, plain and timed) stay within the 600 s a configuration may take."""
    if patch != "wandb":
        return prints
    if console == "wrap_emu":
        return max(100, prints // 50)
    return max(100, prints // 10) if console == "wrap" else prints


def measure_all(reps: int, prints: int, job_lines: int,
                log: Callable[[str], object] = print, unbuffered: bool = False) -> dict[str, Any]:
    """Every configuration in a fresh interpreter per repetition, in rotating order, after one
    warm-up repetition at a tenth of the sizes. Per repetition: the print ratio (median of 5
    batches in the run / median of 5 plain batches before wandb.init, same process) and the
    job's wall time as a ratio to the same job without wandb in the same repetition."""
    names = ("ratio", "cpu_ratio", "plain_ns", "hooked_ns", "plain_cpu_ns", "hooked_cpu_ns",
             "job_s", "job_ratio", "child_lines", "our_cpu", "wandb_core_cpu")
    samples: dict[str, dict[str, list[float]]] = {
        f"{c} {p}": {name: [] for name in names} for c, p in CONFIGS}
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(reps + 1):
            log(f"  repetition {rep}" + (" (warm-up, a tenth of the sizes)" if rep == 0 else ""))
            k = rep % len(CONFIGS)
            got = {}
            for console, patch in (*CONFIGS[k:], *CONFIGS[:k]):
                n = _prints_for(console, patch, prints)
                if rep == 0:
                    measure(console, patch, max(100, n // 10), workdir, max(400, job_lines // 10),
                            unbuffered)
                else:
                    got[f"{console} {patch}"] = measure(console, patch, n, workdir, job_lines,
                                                        unbuffered)
            for key, r in got.items():
                row = samples[key]
                for name in names[2:]:
                    if name != "job_ratio":
                        row[name].append(r[name])
                row["ratio"].append(r["hooked_ns"] / r["plain_ns"])
                row["cpu_ratio"].append(r["hooked_cpu_ns"] / r["plain_cpu_ns"])
                row["job_ratio"].append(r["job_s"] / got["none wandb"]["job_s"])
    out: dict[str, Any] = {"prints": prints, "job_lines": job_lines, "reps": reps,
                           "stdout": "unbuffered" if unbuffered else "block-buffered"}
    for key, by in samples.items():
        console, patch = key.split()
        out[key] = {"console": console, "capture": patch,
                    "prints": _prints_for(console, patch, prints),
                    **{name: summarize(values) for name, values in by.items()}}
    return out


def summarize(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "samples": values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prints", type=int, default=20000,
                        help="prints per timed batch (a tenth under wandb's own capture)")
    parser.add_argument("--job-lines", type=int, default=400,
                        help="lines the 4-process job prints in all")
    parser.add_argument("--reps", type=int, default=5, help="repetitions after the warm-up")
    parser.add_argument("--unbuffered", action="store_true",
                        help="PYTHONUNBUFFERED=1 in the measured processes (default: unset)")
    args = parser.parse_args()
    results = measure_all(args.reps, args.prints, args.job_lines,
                          lambda m: print(m, file=sys.stderr, flush=True), args.unbuffered)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"{'console':9} {'capture':12} {'plain ns':>9} {'in run ns':>10} {'ratio':>18} "
          f"{'CPU ratio':>18} "
          f"{'our CPU':>8} {'wandb-core CPU':>15} {'children lines in output.log':>29} "
          f"{'job s':>7}")
    for console, patch in CONFIGS:
        r = results[f"{console} {patch}"]
        ratio = r["ratio"]
        print(f"{console:9} {patch:12} {r['plain_ns']['median']:9.0f} "
              f"{r['hooked_ns']['median']:10.0f} "
              f"{ratio['median']:7.1f} ({ratio['min']:.1f}-{ratio['max']:.1f}) "
              f"{r['cpu_ratio']['median']:7.1f} ({r['cpu_ratio']['min']:.1f}-"
              f"{r['cpu_ratio']['max']:.1f}) "
              f"{r['our_cpu']['median']:8.2f} {r['wandb_core_cpu']['median']:15.2f} "
              f"{int(r['child_lines']['min']):>17} of {args.job_lines:<9} "
              f"{r['job_s']['median']:7.2f}")
    print("median of the repetitions, (min-max); children lines: the fewest in any repetition;")
    print("CPU ratio: this process's CPU time (all its threads) per print, run / plain: the cost")
    print("that wall time shows only on an idle machine.")
    print("CPU columns: cores kept busy during the timed prints (this process; wandb-core).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""All of safe_redirect's benchmarks in one command: a table on stdout, JSON, and a plot.

    python benchmarks/run.py                 # everything, about 11 minutes on 2 cores
    python benchmarks/run.py --quick         # small sizes, wandb skipped: under 3 minutes
    python benchmarks/run.py --skip-wandb    # default sizes without part 4
    python benchmarks/run.py --only latency,memory

Parts: 1 print (write cost, bench_print.py), 2 throughput (bench_throughput.py), 3 latency
(bench_latency.py), 4 wandb (bench_wandb.py), 5 memory (bench_memory.py), 6 limits
(bench_limits.py). Every figure is a rate or a ratio against a baseline measured in the same run,
the median of the repetitions that follow a warm-up, with (min-max). Results:
benchmarks/results/<part>.json (every sample) and run.json (the machine, the table),
benchmarks/results/table.md (the table as Markdown) and benchmarks/performance.png (the plot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import bench_latency
import bench_limits
import bench_memory
import bench_print
import bench_throughput
import bench_wandb
import harness
import report
from harness import log

import safe_redirect

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PLOT = HERE / "performance.png"
PARTS = ("print", "throughput", "latency", "wandb", "memory", "limits")


@dataclass(frozen=True)
class Sizes:
    reps: int  # repetitions kept, after one warm-up
    prints: int  # part 1: timed prints per measurement
    throughput_scale: float  # part 2: 1.0 = some 0.1-0.5 s per run
    probes: int  # part 3: probe lines per run (one every 2 ms)
    wandb_prints: int  # part 4: prints per timed batch
    job_lines: int  # part 4: lines of the 4-process job
    limits_scale: float  # part 6
    budget: float  # seconds: no measurement starts or goes on after this


DEFAULT = Sizes(reps=5, prints=200_000, throughput_scale=1.0, probes=500, wandb_prints=20_000,
                job_lines=100_000, limits_scale=1.0, budget=1500)
QUICK = Sizes(reps=5, prints=50_000, throughput_scale=0.15, probes=150, wandb_prints=5_000,
              job_lines=10_000, limits_scale=0.3, budget=300)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_part(name: str, sizes: Sizes) -> dict[str, Any]:
    if name == "print":
        return bench_print.measure(sizes.reps, sizes.prints)
    if name == "throughput":
        return bench_throughput.measure(sizes.reps, sizes.throughput_scale)
    if name == "latency":
        return bench_latency.measure(sizes.reps, sizes.probes)
    if name == "wandb":
        return bench_wandb.measure_all(sizes.reps, sizes.wandb_prints, sizes.job_lines, log)
    if name == "memory":
        return bench_memory.measure(sizes.reps)
    if name == "limits":
        return bench_limits.measure(sizes.reps, sizes.limits_scale)
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and no wandb part: under 3 minutes")
    parser.add_argument("--skip-wandb", action="store_true", help="leave part 4 out")
    parser.add_argument("--only", default="", help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--no-plot", action="store_true", help="leave the PNG as it is")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    parts = [p for p in args.only.split(",") if p] or list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if args.quick or args.skip_wandb:
        parts = [p for p in parts if p != "wandb"]

    began = time.monotonic()
    harness.set_deadline(sizes.budget)
    meta: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "mode": "quick" if args.quick else "default", "sizes": asdict(sizes), "parts": parts,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu": _cpu_model(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "safe_redirect": safe_redirect.__version__,
        "commit": _git_commit(), "faster_fifo": _version("faster-fifo"),
        "torch": _version("torch"), "wandb": _version("wandb"),
        "loadavg_start": _loadavg(),
    }
    results: dict[str, Any] = {"meta": meta}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in parts:
        log(f"part {PARTS.index(name) + 1}: {name}")
        t0 = time.monotonic()
        try:
            results[name] = run_part(name, sizes)
        except (harness.BenchError, subprocess.SubprocessError, OSError) as exc:
            log(f"  {name} FAILED: {exc}")
            results[name] = {"error": str(exc)}
        meta[f"seconds_{name}"] = round(time.monotonic() - t0, 1)
        (RESULTS / f"{name}.json").write_text(json.dumps(results[name], indent=1) + "\n")

    meta["loadavg_end"] = _loadavg()
    meta["seconds"] = round(time.monotonic() - began, 1)
    table = report.render(results)
    results["targets"] = report.targets(results)
    (RESULTS / "table.md").write_text(report.render(results, markdown=True) + "\n")
    (RESULTS / "run.json").write_text(json.dumps(
        {"meta": meta, "targets": results["targets"], "table": table}, indent=1) + "\n")
    if not args.no_plot:
        try:
            report.plot(results, PLOT)
        except ImportError as exc:
            log(f"no plot: {exc} (pip install matplotlib)")
    print(table)
    print(f"\n{meta['seconds']} s; results in {RESULTS}" +
          ("" if args.no_plot else f", plot in {PLOT}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

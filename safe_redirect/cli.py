"""`python -m safe_redirect demo` (also `safe-redirect demo`): see the capture work here."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence

from safe_redirect.record import Record
from safe_redirect.session import install

__all__ = ["main"]


def _worker(rank: int, steps: int) -> None:
    os.environ["RANK"] = str(rank)  # what torchrun and friends set; the tag shows it
    for step in range(1, steps + 1):
        print(f"rank {rank}: step {step}/{steps} loss={1.0 / (step + rank):.4f}")
        bar = "#" * step + "." * (steps - step)
        sys.stdout.write(f"\rrank {rank}: [{bar}]")
        sys.stdout.flush()
        time.sleep(0.01)
    sys.stdout.write("\n")
    print(f"rank {rank}: a warning on stderr", file=sys.stderr)
    print(f"rank {rank}: done")


def demo(workers: int = 8, steps: int = 5) -> int:
    """Fork `workers` processes that print, then show what the master's callback received."""
    records: list[Record] = []
    print(f"safe_redirect demo: {workers} forked workers print progress lines, a \\r progress bar "
          "and a line on stderr. Live output, as the terminal always shows it:\n")
    context = multiprocessing.get_context("fork")
    with install(on_output=records.append) as session:
        processes = [context.Process(target=_worker, args=(rank, steps))
                     for rank in range(workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        print("master: all workers joined")
    stats = session.stats()
    print(f"\nWhat the master's on_output received ({len(records)} records), tagged by origin:")
    for record in records:
        origin = record.tag or "[master] "
        prefix = "(stderr) " if record.stream == "stderr" else ""
        for line in record.text.splitlines():
            if line:
                print(f"  {origin}{prefix}{line}")
    print(f"\nstats: {stats}")
    text = "".join(record.text for record in records)
    missing = [rank for rank in range(workers) if text.count(f"rank {rank}: done\n") != 1]
    if missing or any(p.exitcode != 0 for p in processes):
        print(f"demo FAILED: ranks {missing} not delivered exactly once", file=sys.stderr)
        return 1
    print(f"every line of all {workers} workers arrived once, tagged with its rank")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safe-redirect", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="fork workers that print; show the capture")
    demo_parser.add_argument("--workers", type=int, default=8)
    demo_parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.workers, args.steps)
    parser.error(f"unknown command {args.command}")
    return 2

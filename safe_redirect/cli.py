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
    for step in range(1, steps + 1):  # a progress bar drawn over itself, as tqdm draws one
        bar = "#" * step + "." * (steps - step)
        sys.stdout.write(f"\rrank {rank}: [{bar}] step {step}/{steps}")
        sys.stdout.flush()
        time.sleep(0.01)
    sys.stdout.write("\n")
    print(f"rank {rank}: loss={1.0 / (steps + rank):.4f}")
    print(f"rank {rank}: a warning on stderr", file=sys.stderr)
    print(f"rank {rank}: done")


def as_a_log_shows(records: Sequence[Record]) -> list[str]:
    """The records as a log shows them (wandb's output.log does the same): each process's lines
    under its tag (the master's "[master]", stderr marked), in the order they were finished, a
    line drawn over with `\\r` (a progress bar) in its last state, never two processes on one
    line. A record that goes on with a line an earlier one began (`Record.continued`) finishes
    that line."""
    open_lines: dict[tuple[int, str], tuple[str, str]] = {}  # writer -> (tag, its open line)
    lines: list[str] = []
    for record in records:
        writer = (record.pid, record.stream)
        tag = (record.tag or "[master] ") + ("(stderr) " if record.stream == "stderr" else "")
        open_tag, head = open_lines.pop(writer, (tag, ""))
        if head and not record.continued:  # its line was cut short (a spill): it ends there
            lines.append(open_tag + head.rsplit("\r", 1)[-1])
            head = ""
        *finished, rest = (head + record.text).split("\n")
        lines += [tag + line.rsplit("\r", 1)[-1] for line in finished]
        if rest:
            open_lines[writer] = (tag, rest)
    lines += [tag + rest.rsplit("\r", 1)[-1] for tag, rest in open_lines.values()]
    return lines


def demo(workers: int = 8, steps: int = 5) -> int:
    """Fork `workers` processes that print, then show what the master's callback received."""
    records: list[Record] = []
    print(f"safe_redirect demo: {workers} forked workers each draw a progress bar (\\r), print "
          "a line and one on stderr.\nLive output: the terminal as always, raw (untagged, "
          "straight from each process, interleaved as it comes):\n")
    sys.stdout.flush()
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
    print(f"\nWhat the master's on_output received: {len(records)} records, rendered as a log "
          "(each line under its process's tag, a progress bar in its last state):")
    for line in as_a_log_shows(records):
        print(f"  {line}")
    print(f"\nstats: {stats}\n  (records: writes stored in the lanes; delivered: Records handed "
          "to on_output, which join a process's consecutive writes)")
    text = "".join(record.text for record in records)
    missing = [rank for rank in range(workers) if text.count(f"rank {rank}: done\n") != 1]
    if missing or any(p.exitcode != 0 for p in processes):
        print(f"demo FAILED: ranks {missing} not delivered exactly once", file=sys.stderr)
        return 1
    print(f"every line of all {workers} workers arrived once, tagged with its rank")
    return 0


def _count(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safe-redirect", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="fork workers that print; show the capture")
    demo_parser.add_argument("--workers", type=_count, default=8,
                             help="forked processes that print (default 8)")
    demo_parser.add_argument("--steps", type=_count, default=5,
                             help="steps of each one's progress bar (default 5)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.workers, args.steps)
    parser.error(f"unknown command {args.command}")
    return 2

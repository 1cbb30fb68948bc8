"""`safe-redirect` (also `python -m safe_redirect`): `demo` shows the capture at work; `run`
runs a command with its whole process tree captured (`launch.py`)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from safe_redirect import __version__
from safe_redirect.arguments import check_tag
from safe_redirect.record import LastStates, Record
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
    """The records as a log shows them (`LastStates`; wandb's output.log does the same): each
    line under its process's tag, the master's "[master]", stderr marked."""
    def tagged(record: Record, line: str) -> str:
        stderr = "(stderr) " if record.stream == "stderr" else ""
        return f"{record.tag or '[master] '}{stderr}{line}"

    states = LastStates()
    lines = [tagged(record, line) for r in records for record, line in states.feed(r)]
    return lines + [tagged(record, line) for record, line in states.end()]


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


def _ranks(text: str) -> frozenset[int]:
    """argparse type: global ranks, comma-separated ("0,3")."""
    try:
        ranks = frozenset(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of ranks like 0,3: {text!r}") from None
    if any(rank < 0 for rank in ranks):
        raise argparse.ArgumentTypeError(f"a rank is 0 or more: {text!r}")
    return ranks


def _seconds(text: str) -> float:
    """argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safe-redirect", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo_parser = verbs.add_parser("demo", help="fork workers that print; show the capture")
    demo_parser.add_argument("--workers", type=_count, default=8,
                             help="forked processes that print (default 8)")
    demo_parser.add_argument("--steps", type=_count, default=5,
                             help="steps of each one's progress bar (default 5)")
    run_parser = verbs.add_parser(
        "run", help="run a command, its whole process tree captured, tagged and logged",
        description="Run COMMAND (python train.py, torchrun ..., a shell script) with the "
        "stdout and stderr of every process it starts captured: shown on this terminal, each "
        "line under its process's tag (its rank, else its name, else its pid), and with "
        "--log-dir written to one file per rank and a merged all.log. Exits with COMMAND's "
        "exit code (128+N after signal N). Example: safe-redirect run --log-dir logs -- "
        "torchrun --nproc-per-node 4 train.py")
    run_parser.add_argument("--log-dir", type=Path, metavar="DIR",
                            help="write DIR/rank<N>.log per rank (else <name>.log or "
                            "pid<P>.log; the command's own lines in main.log) and DIR/all.log, "
                            "the tagged merge")
    run_parser.add_argument("--tag", default="[rank{rank}] ", metavar="TEMPLATE",
                            help="the tag of a process with a rank, from {rank} {pid} {name} "
                            "(default %(default)r)")
    run_parser.add_argument("--wandb", action="store_true",
                            help="patch wandb in every process of the job, as "
                            "SAFE_REDIRECT_PATCH=wandb does")
    run_parser.add_argument("--ranks", type=_ranks, metavar="0,3",
                            help="show only these global ranks on the terminal (processes "
                            "without a rank are always shown); every rank is still logged")
    run_parser.add_argument("--dedup", action="store_true",
                            help="on the terminal, lines alike (equal but for numbers and hex "
                            "words) from several processes within a window show once, then "
                            "'[repeated Nx across ranks]'; the logs keep every line")
    run_parser.add_argument("--dedup-window", type=_seconds, default=5.0, metavar="S",
                            help="the --dedup window, seconds (default %(default)s)")
    run_parser.add_argument("--no-color", action="store_true",
                            help="no colours on a terminal (NO_COLOR in the environment too)")
    run_parser.add_argument("command", nargs=argparse.REMAINDER,
                            help="the command and its arguments, after --")
    args = parser.parse_args(argv)
    if args.verb == "demo":
        return demo(args.workers, args.steps)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        run_parser.error("no command given: safe-redirect run [options] -- COMMAND ...")
    try:
        check_tag(args.tag)
    except (TypeError, ValueError) as exc:
        run_parser.error(f"argument --tag: {exc}")
    from safe_redirect.launch import run

    return run(command, log_dir=args.log_dir, tag=args.tag, wandb=args.wandb, ranks=args.ranks,
               dedup_window=args.dedup_window if args.dedup else None,
               color=not args.no_color)

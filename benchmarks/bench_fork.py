"""What a fork costs a master: fork + the child's os._exit + waitpid, with and without install().

    python benchmarks/bench_fork.py [--forks N] [--rounds R]

A single-threaded master forks N children one after the other (as a DataLoader's workers are
forked), in a fresh interpreter per configuration and round; rounds of all configurations are
interleaved, so that machine noise hits them alike. Configurations:

- `plain`: no library;
- `wrap`, `fd`: install(mode=...): our threads are parked for each fork and restarted after it
  (safe_redirect/fork_parking.py);
- `wrap-running`, `fd-running`: the same with parking switched off, our threads left running
  through the fork (what the library did before; Python 3.12+ warns at every such fork).

Prints µs per fork (median over rounds of each round's mean) and the ratio to `plain`, plus
whether the fork warning was seen. Results also go to benchmarks/results/bench_fork.json.
Figures are for whatever stdout buffering the environment sets (this machine: PYTHONUNBUFFERED=1);
the children print nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_fork.json"
CONFIGS = ["plain", "wrap", "wrap-running", "fd", "fd-running"]


def one(config: str, forks: int) -> dict[str, float]:
    """Run in a fresh interpreter: µs per fork of `forks` forks under `config`."""
    warned = 0
    session = None
    if config != "plain":
        import safe_redirect
        from safe_redirect import fork_parking

        session = safe_redirect.install(lambda record: None, mode=config.split("-")[0])
        if config.endswith("-running"):
            fork_parking._registered.clear()  # parking off: the threads stay through forks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # warm-up
            _fork_and_wait()
        t0 = time.perf_counter()
        for _ in range(forks):
            _fork_and_wait()
        elapsed = time.perf_counter() - t0
        warned = sum("multi-threaded" in str(w.message) for w in caught)
    if session is not None:
        session.uninstall()
    return {"us_per_fork": elapsed / forks * 1e6, "warnings": warned}


def _fork_and_wait() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.forks)))
        return 0

    samples: dict[str, list[float]] = {c: [] for c in CONFIGS}
    warned: dict[str, int] = dict.fromkeys(CONFIGS, 0)
    for round_ in range(args.rounds):
        for config in CONFIGS[round_ % len(CONFIGS):] + CONFIGS[:round_ % len(CONFIGS)]:
            out = subprocess.run([sys.executable, __file__, "--one", config, "--forks",
                                  str(args.forks)], check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.splitlines()[-1])
            samples[config].append(result["us_per_fork"])
            warned[config] += result["warnings"]
    base = statistics.median(samples["plain"])
    print(f"Python {sys.version.split()[0]}, {args.forks} forks x {args.rounds} rounds, "
          f"PYTHONUNBUFFERED={os.environ.get('PYTHONUNBUFFERED', '')!r}")
    print(f"{'config':<14}{'us/fork':>10}{'ratio':>8}{'fork warnings':>15}")
    table = {}
    for config in CONFIGS:
        median = statistics.median(samples[config])
        table[config] = {"us_per_fork": median, "ratio": median / base,
                         "warnings": warned[config], "samples": samples[config]}
        print(f"{config:<14}{median:>10.0f}{median / base:>8.2f}{warned[config]:>15}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"python": sys.version, "forks": args.forks,
                                   "rounds": args.rounds, "configs": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

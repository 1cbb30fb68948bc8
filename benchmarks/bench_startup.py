"""What the start-up hook costs: the `.pth` line in every interpreter, and attaching a spawned one.

    python benchmarks/bench_startup.py [--runs N]

1. The `.pth` line with SAFE_REDIRECT_ATTACH unset (every Python process on the machine pays
   it): ns per execution, measured with timeit, and as a share of a bare interpreter start.
2. Interpreter start (`python -c pass`), SAFE_REDIRECT_ATTACH unset vs set to a live master
   (the spawned process imports safe_redirect and attaches): ms, median of N interleaved runs,
   and the ratio. Results also go to benchmarks/results/bench_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import safe_redirect
from safe_redirect.spawn import ENV_VAR, PTH_LINE

RESULTS = Path(__file__).resolve().parent / "results" / "bench_startup.json"


def pth_line_ns() -> float:
    """One execution of the .pth line as site.py runs it, variable unset."""
    code = compile(PTH_LINE, "safe_redirect.pth", "exec")
    env_before = os.environ.pop(ENV_VAR, None)
    try:
        runs = 200_000
        best = min(timeit.repeat(lambda: exec(code, {}), number=runs, repeat=5))
        return best / runs * 1e9
    finally:
        if env_before is not None:
            os.environ[ENV_VAR] = env_before


def start_ms(env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    runs = parser.parse_args().runs

    line_ns = pth_line_ns()
    unset_env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    with safe_redirect.install() as session:
        set_env = dict(os.environ)  # holds the attach variable of this live session
        start_ms(unset_env), start_ms(set_env)  # warm the page cache
        unset, attached = [], []
        for _ in range(runs):  # interleaved, so that machine noise hits both alike
            unset.append(start_ms(unset_env))
            attached.append(start_ms(set_env))
        session.flush(timeout=10)
    results = {
        "python": sys.version.split()[0],
        "runs": runs,
        "pth_line_unset_ns": line_ns,
        "start_unset_ms": {"median": statistics.median(unset), "min": min(unset),
                           "max": max(unset)},
        "start_attached_ms": {"median": statistics.median(attached), "min": min(attached),
                              "max": max(attached)},
    }
    results["pth_share_of_start"] = line_ns / 1e6 / results["start_unset_ms"]["median"]
    results["attached_over_unset"] = (results["start_attached_ms"]["median"]
                                      / results["start_unset_ms"]["median"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    u, a = results["start_unset_ms"], results["start_attached_ms"]
    print(f"the .pth line, variable unset: {line_ns:.0f} ns per interpreter start "
          f"({results['pth_share_of_start']:.2e} of a start)")
    print(f"python -c pass, variable unset: {u['median']:.1f} ms ({u['min']:.1f}-{u['max']:.1f})")
    print(f"python -c pass, attached:       {a['median']:.1f} ms ({a['min']:.1f}-{a['max']:.1f})"
          f"  ratio {results['attached_over_unset']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures of the fault-injection suite (issue 6): faults injected, lines written and delivered,
lost, duplicated, hangs.

    python benchmarks/reliability_figures.py           # the sizes of the README table, ~2 min
    python benchmarks/reliability_figures.py --quick   # the sizes the tests run, ~1 min

Every fault loop is the one tests/reliability/ runs (tests/reliability/faults.py), each in a fresh
interpreter as its master, bounded; a loop that runs over its bound counts as a hang. Prints a
Markdown table and writes it, with every loop's notes and problems, to
benchmarks/results/reliability_figures.json (git-ignored).

Columns: runs (faults injected), written (lines whose write returned: the library owes them),
delivered (of those, delivered whole and once — for "master SIGKILLed", to the child's terminal,
the fallback), spilled (the overflow policy sent them to the terminal only, counted in stats()),
lost, duplicated, hangs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.faults import run_fault  # noqa: E402
from tests.reliability.storms import SCENARIOS  # noqa: E402
from tests.reliability.tally import Tally  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reliability_figures.json"

# (row label, fault, parameters at full size, parameters at --quick size)
PLAN: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("1. child SIGKILLed mid-write (random kill / random stop / stopped inside a record)",
     "kill_mid_write", {"runs": 1500}, {"runs": 500}),
    *[(f"2. full ring: overflow={policy}, {callback} callback", "full_ring",
       {"runs": 10, "policy": policy, "callback": callback},
       {"runs": 2, "policy": policy, "callback": callback})
      for policy, callback in (("block", "slow"), ("block", "stuck"), ("spill", "slow"),
                               ("spill", "stuck"))],
    ("3. master SIGKILLed while 3 children print (block and spill)", "master_death",
     {"runs": 20, "lines": 5_000}, {"runs": 6, "lines": 5_000}),
    *[(f"4. fork storm: {scenario}", "fork_storm", {"runs": 5, "scenarios": [scenario]},
       {"runs": 2, "scenarios": [scenario]}) for scenario in SCENARIOS],
    ("5. PID reuse (lane and segment of a dead owner, pid taken again)", "pid_reuse",
     {"runs": 20}, {"runs": 3}),
    ("6. bad input and odd use (10 cases, see tests/reliability/bad_input.py)", "bad_input",
     {"repeats": 3}, {}),
    ("7. soak: 8 producers x 1,000,000 lines", "soak", {"producers": 8, "lines": 1_000_000},
     {"producers": 8, "lines": 100_000}),
    ("8. ring model: random interleavings (writes up to 3 lanes, reads, flushes, recycling)",
     "ring_model", {"runs": 1000}, {"runs": 100}),
]

COLUMNS = ("runs", "written", "delivered", "spilled", "lost", "duplicated", "hangs")


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "load average": os.getloadavg(),
            "date": datetime.date.today().isoformat()}


def table(rows: list[tuple[str, Tally]]) -> str:
    lines = ["| fault | runs | lines written | delivered | spilled (counted) | lost | duplicated "
             "| hangs |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, tally in rows:
        cells = [f"{getattr(tally, c):,}" for c in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    total = Tally(fault="total")
    for _, tally in rows:
        total.merge(tally)
    lines.append("| **total** | " + " | ".join(f"**{getattr(total, c):,}**" for c in COLUMNS)
                 + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the sizes the tests run")
    args = parser.parse_args()
    rows: list[tuple[str, Tally]] = []
    for label, fault, full, quick in PLAN:
        params = quick if args.quick else full
        tally = run_fault(fault, timeout=900, **params)
        rows.append((label, tally))
        status = "ok" if tally.clean else f"PROBLEMS: {tally.problems[:3]}"
        print(f"{tally.seconds:6.1f} s  {label}: {status}", file=sys.stderr, flush=True)
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": machine(), "size": "quick" if args.quick else "full",
        "command": "python benchmarks/reliability_figures.py" + (" --quick" if args.quick
                                                                  else ""),
        "rows": [{"label": label, **json.loads(tally.to_json())} for label, tally in rows],
    }, indent=2))
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0 if all(tally.clean for _, tally in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

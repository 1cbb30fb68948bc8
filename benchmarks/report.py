"""The table (plain text or Markdown), the verdicts on the targets, and the plot of a run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_latency
import bench_print
import bench_throughput
import bench_wandb

Stat = dict[str, Any] | None

NAMES = {"ring": "ring", "queue": "mp.Queue", "pipe": "os.pipe", "faster-fifo": "faster-fifo",
         "tail_log": "tail_log", "e2e wrap": "e2e wrap", "e2e fd": "e2e fd"}
WANDB_TARGET = 1.5  # print in the master under safe_redirect's patched classes: at most
#: the figure of part 6 a payload's throughput is held against
LIMITS = {"line": "memcpy 100 B", "chunk": "memcpy 1 MiB"}
SHORT = {"wrap, buffered": "wrap", "wrap, write-through": "wrap w-t", "fd, buffered": "fd"}


# -- formatting


def fmt(stat: Stat, f: Callable[[float], str]) -> str:
    if stat is None:
        return "n/a"
    return f"{f(stat['median'])} ({f(stat['min'])}-{f(stat['max'])})"


def count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def mbps(x: float) -> str:
    return f"{x / 1e6:.0f}" if x >= 1e8 else f"{x / 1e6:.3g}"


def ratio(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def ns(x: float) -> str:
    return f"{x:.0f}"


def ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def mib(x: float) -> str:
    return f"{x:.1f}"


def verdict(stat: Stat, ok: Callable[[float], bool]) -> str:
    if stat is None:
        return "n/a"
    return "ok" if ok(stat["median"]) else "MISSED"


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ok(part: Any) -> bool:
    return isinstance(part, dict) and "error" not in part


# -- the sections


def _header(meta: dict[str, Any]) -> list[str]:
    return [f"safe_redirect {meta['safe_redirect']} benchmarks ({meta['mode']}): {meta['cpu']}, "
            f"{meta['cpus']} CPUs, Python {meta['python']}, {meta['platform']}",
            f"started {meta['started']}, commit {meta['commit']}, load average "
            f"{meta['loadavg_start']} -> {meta.get('loadavg_end', '?')}; command: "
            f"{meta['command']}",
            f"every figure: median of {meta['sizes']['reps']} repetitions after 1 warm-up, "
            "(min-max); ratios are taken within each repetition", ""]


def _print_section(r: dict[str, Any], md: bool) -> list[str]:
    out = [f"1. Write cost: print() of an 80-byte line to /dev/null, ns per print "
           f"({r['prints']} prints per measurement)"]
    rows = []
    for case in bench_print.CASES:
        got = r.get(case)
        if not _ok(got):
            rows.append([case, "-", "failed", (got or {}).get("error", "not run"), "", "", ""])
            continue
        for side in ("child", "master"):
            s = got[side]
            target = "info"
            if side == "child" and case in bench_print.TARGET_CASES:
                target = (f"<= {bench_print.TARGET} "
                          f"{verdict(s['ratio'], lambda x: x <= bench_print.TARGET)}")
            rows.append([case, side, fmt(s["unhooked"], ns), fmt(s["hooked"], ns),
                         fmt(s["ratio"], ratio), target, fmt(s["cpu_ratio"], ratio)])
    out.append(table(["case", "process", "unhooked ns", "hooked ns", "hooked/unhooked",
                      "target", "CPU time ratio"], rows, md))
    waits = ", ".join(f"{case}: {r[case]['lane_full_waits']}" for case in bench_print.CASES
                      if _ok(r.get(case)))
    out += [f"lane-full waits of hooked writers, all repetitions: {waits}", ""]
    return out


def _limit(results: dict[str, Any], name: str) -> float | None:
    lim = results.get("limits")
    if not _ok(lim) or lim.get(name, {}).get("bytes_per_s") is None:
        return None
    return float(lim[name]["bytes_per_s"]["median"])


def _throughput_section(results: dict[str, Any], md: bool) -> list[str]:
    r = results["throughput"]
    out = []
    for payload, title, key, f in (
            ("line", "100-byte lines, one call per line: lines/s", "lines_per_s", count),
            ("chunk", "4 KiB chunks, one call per chunk: MB/s (1e6 bytes)", "bytes_per_s",
             mbps)):
        if payload not in r:
            continue
        units = r["units_per_run"][payload]
        per_run = ", ".join(f"{NAMES[t]} {units[t]}" for t in bench_throughput.TRANSPORTS[:-2])
        out.append(f"2{'a' if payload == 'line' else 'b'}. Throughput, N forked producers -> 1 "
                   f"consumer, {title} (units per run, all producers together: {per_run}, "
                   f"e2e {units['e2e wrap']})")
        rows = []
        for n, row in r[payload].items():
            rows.append([n, *(fmt(row[t][key], f) for t in bench_throughput.TRANSPORTS)])
        out += [table(["N", *(NAMES[t] for t in bench_throughput.TRANSPORTS)], rows, md), ""]
        limit = _limit(results, LIMITS[payload])
        rows = []
        for n, row in r[payload].items():
            cells = [n, fmt(row["ring/queue"], ratio), fmt(row["ring/pipe"], ratio),
                     fmt(row["ring/faster-fifo"], ratio), fmt(row["ring/tail_log"], ratio),
                     fmt(row["e2e wrap/queue"], ratio), fmt(row["e2e wrap/pipe"], ratio),
                     fmt(row["e2e fd/pipe"], ratio)]
            ring = row["ring"]["bytes_per_s"]
            cells.append(f"{ring['median'] / limit:.0%}" if ring and limit else "n/a")
            if payload == "line":
                cells.append(" ".join([
                    verdict(row["ring/queue"], lambda x: x >= bench_throughput.QUEUE_TARGET),
                    verdict(row["ring/pipe"], lambda x: x >= bench_throughput.PIPE_TARGET)]))
            else:
                cells.append(verdict(ring, lambda x: x >= bench_throughput.GBPS_TARGET * 1e9))
            rows.append(cells)
        target = (f"ring/Queue >= {bench_throughput.QUEUE_TARGET:g}, ring/pipe >= "
                  f"{bench_throughput.PIPE_TARGET:g}" if payload == "line"
                  else f"ring >= {bench_throughput.GBPS_TARGET:g} GB/s")
        out += [table(["N", "ring/Queue", "ring/pipe", "ring/faster-fifo", "ring/tail_log",
                       "e2e wrap/Queue", "e2e wrap/pipe", "e2e fd/pipe",
                       "ring / limit", target], rows, md), ""]
        errors = [f"{payload} N={n} {t}: {e}" for n, row in r[payload].items()
                  for t, e in row["errors"].items()]
        out += [f"failed: {e}" for e in errors]
    out.append("ring / limit: the ring's bytes/s over one core's memcpy rate from part 6: "
               "a Python loop copying 100 B (lines), memcpy of 1 MiB blocks (chunks)")
    out.append("")
    return out


def _latency_section(r: dict[str, Any], md: bool) -> list[str]:
    out = [f"3. Latency, a child's write -> the master sees it, ms ({r['probes']} probe lines, "
           f"one per {r['interval_ms']:g} ms; load: {r['load_children']} more children writing "
           "flat out through the same transport)"]
    rows = []
    for condition in bench_latency.CONDITIONS:
        base = r.get(f"pipe {condition}")
        for transport in bench_latency.TRANSPORTS:
            s = r.get(f"{transport} {condition}")
            if not s or s["p50"] is None:
                rows.append([transport, condition, "failed", "", "", "", ""])
                continue
            vs = "baseline"
            if transport != "pipe" and base and base["p99"]:
                pairs = zip(s["p99"]["samples"], base["p99"]["samples"], strict=False)
                vs = ratio(sorted(a / b for a, b in pairs)[len(s["p99"]["samples"]) // 2])
            target = "info"
            if condition == "idle" and transport != "pipe":
                target = (f"p99 <= {bench_latency.TARGET_P99_MS:g} "
                          f"{verdict(s['p99'], lambda x: x <= bench_latency.TARGET_P99_MS)}")
            rows.append([transport, condition, fmt(s["p50"], ms), fmt(s["p99"], ms),
                         fmt(s["max"], ms), vs, target])
    out += [table(["transport", "condition", "p50", "p99", "max", "p99 / pipe p99", "target"],
                  rows, md)]
    out += [f"failed: {k}: {e}" for k, e in r["errors"].items()]
    out.append("")
    return out


def _wandb_section(r: dict[str, Any], md: bool) -> list[str]:
    out = [f"4. wandb offline, print() of an 80-byte line in the "
           f"master under a capturing run (ratio to a plain print in the same process), and a "
           f"4-process job printing {r['job_lines']} lines (wall time to the end of run.finish(),"
           " ratio to the job without wandb; the children's lines found in output.log, fewest of "
           "any repetition)"]
    rows = []
    for console, capture in bench_wandb.CONFIGS:
        s = r.get(f"{console} {capture}")
        if not s or s["ratio"] is None:
            rows.append([console, capture, "failed", "", "", "", "", ""])
            continue
        target = "info"
        if capture == "patched" and console != "off":
            target = f"<= {WANDB_TARGET:g} {verdict(s['ratio'], lambda x: x <= WANDB_TARGET)}"
        elif capture == "wandb" and console not in ("off", "none"):
            target = "peer"
        elif console == "none":
            target = "baseline"
        lines = f"{int(s['child_lines']['min'])} of {r['job_lines']}"
        rows.append([console, capture, fmt(s["plain_ns"], ns), fmt(s["ratio"], ratio), target,
                     fmt(s["job_s"], lambda x: f"{x:.2f}"), fmt(s["job_ratio"], ratio), lines])
    out += [table(["console", "capture", "plain ns", "print ratio", "target", "job s",
                   "job / no wandb", "child lines in output.log"], rows, md)]
    out.append("patched-nocb: patched, wandb's callbacks detached after init: safe_redirect's "
               "own share")
    out.append("")
    return out


def _memory_section(r: dict[str, Any], md: bool) -> list[str]:
    out = [f"5. Memory: peak RSS (VmHWM), MiB, master and a forked child printing "
           f"{r['lines']} lines; install(lanes={r['lanes']}) vs no library"]
    rows = []
    for mode in ("none", "import", "wrap", "fd"):
        s = r[mode]
        row = [mode]
        for side in ("master", "child"):
            row.append(fmt(s[side]["mib"], mib))
            row.append("1 (baseline)" if mode == "none" else fmt(s[side]["ratio"], ratio))
            row.append("" if mode == "none" else "+" + fmt(s[side]["delta_mib"], mib))
        rows.append(row)
    out += [table(["mode", "master MiB", "ratio", "delta MiB", "child MiB", "ratio",
                   "delta MiB"], rows, md), ""]
    return out


def _limits_section(r: dict[str, Any], md: bool) -> list[str]:
    out = ["6. Limits of this machine, one core, from a Python loop"]
    rows = [[name, fmt(s["units_per_s"], count), fmt(s["bytes_per_s"], lambda x: f"{x / 1e9:.3g}")]
            for name, s in r.items()]
    out += [table(["test", "calls/s", "GB/s"], rows, md), ""]
    return out


# -- targets


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with the measured median and a verdict."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value,
                    "verdict": "n/a" if ok is None else "met" if ok else "MISSED", "note": note})

    pr = results.get("print")
    if _ok(pr):
        for case in bench_print.TARGET_CASES:
            s = pr[case]["child"]["ratio"] if _ok(pr.get(case)) else None
            add(f"1. child print, {case}, hooked/unhooked <= {bench_print.TARGET}",
                fmt(s, ratio), s and s["median"] <= bench_print.TARGET)
    tp = results.get("throughput")
    if _ok(tp) and "line" in tp:
        for key, goal, name in (("ring/queue", bench_throughput.QUEUE_TARGET, "ring/mp.Queue"),
                                ("ring/pipe", bench_throughput.PIPE_TARGET, "ring/os.pipe")):
            worst = min(((row[key]["median"], n) for n, row in tp["line"].items()
                         if row[key]), default=None)
            add(f"2. {name} >= {goal:g}, 100-byte lines, every N",
                "n/a" if worst is None else f"lowest {ratio(worst[0])} (N={worst[1]})",
                worst and worst[0] >= goal)
    if _ok(tp) and "chunk" in tp:
        rates = [(row["ring"]["bytes_per_s"]["median"], n) for n, row in tp["chunk"].items()
                 if row["ring"]["bytes_per_s"]]
        worst = min(rates, default=None)
        add(f"2. ring >= {bench_throughput.GBPS_TARGET:g} GB/s in 4 KiB chunks, every N",
            "n/a" if worst is None else
            f"lowest {worst[0] / 1e9:.2f} GB/s (N={worst[1]}); "
            + ", ".join(f"N={n}: {x / 1e9:.2f}" for x, n in rates),
            worst and worst[0] >= bench_throughput.GBPS_TARGET * 1e9)
    lat = results.get("latency")
    if _ok(lat):
        for transport in ("wrap", "fd"):
            s = lat.get(f"{transport} idle", {}).get("p99")
            add(f"3. p99 <= {bench_latency.TARGET_P99_MS:g} ms idle, {transport}",
                fmt(s, ms) + " ms", s and s["median"] <= bench_latency.TARGET_P99_MS)
    wb = results.get("wandb")
    if _ok(wb):
        for console in ("wrap", "redirect"):
            s = wb.get(f"{console} patched", {}).get("ratio")
            add(f"4. wandb console={console}, patched, print <= {WANDB_TARGET:g}x",
                fmt(s, ratio), s and s["median"] <= WANDB_TARGET)
            lines = wb.get(f"{console} patched", {}).get("child_lines")
            add(f"4. wandb console={console}, patched, job: every child line in output.log",
                "n/a" if not lines else f"{int(lines['min'])} of {wb['job_lines']}",
                lines and lines["min"] == wb["job_lines"])
    return out


def render(results: dict[str, Any], markdown: bool = False) -> str:
    out = _header(results["meta"])
    sections: dict[str, Callable[..., list[str]]] = {
        "print": lambda r: _print_section(r, markdown),
        "throughput": lambda r: _throughput_section(results, markdown),
        "latency": lambda r: _latency_section(r, markdown),
        "wandb": lambda r: _wandb_section(r, markdown),
        "memory": lambda r: _memory_section(r, markdown),
        "limits": lambda r: _limits_section(r, markdown),
    }
    for name, section in sections.items():
        part = results.get(name)
        if part is None:
            continue
        if not _ok(part):
            out += [f"{name}: FAILED: {part.get('error')}", ""]
            continue
        out += section(part)
    goals = targets(results)
    if goals:
        out.append("Targets")
        out.append(table(["target", "measured", "verdict"],
                         [[g["target"], g["value"], g["verdict"]] for g in goals], markdown))
    return "\n".join(out)


# -- the plot


def plot(results: dict[str, Any], path: Path) -> None:
    """Six panels, one per part; a part that did not run leaves its panel empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4), dpi=80)
    meta = results["meta"]
    fig.suptitle(f"safe_redirect {meta['safe_redirect']}: {meta['cpus']} shared cores, "
                 f"Python {meta['python']}, {meta['started'][:10]}; median of "
                 f"{meta['sizes']['reps']} repetitions, bars/whiskers: min-max", fontsize=11)
    _plot_print(axes[0][0], results.get("print"))
    _plot_throughput(axes[0][1], results, "line")
    _plot_throughput(axes[0][2], results, "chunk")
    _plot_latency(axes[1][0], results.get("latency"))
    _plot_wandb(axes[1][1], results.get("wandb"))
    _plot_memory(axes[1][2], results.get("memory"))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _errorbar(stats: list[Stat]) -> tuple[list[float], list[list[float]]]:
    med = [s["median"] if s else 0.0 for s in stats]
    err = [[s["median"] - s["min"] if s else 0.0 for s in stats],
           [s["max"] - s["median"] if s else 0.0 for s in stats]]
    return med, err


def _plot_print(ax: Any, r: Any) -> None:
    ax.set_title("1. print cost, hooked / unhooked")
    if not _ok(r):
        return
    labels, wall, cpu = [], [], []
    for case in bench_print.CASES:
        if _ok(r.get(case)):
            for side in ("child", "master"):
                labels.append(f"{SHORT[case]}\n{side}")
                wall.append(r[case][side]["ratio"])
                cpu.append(r[case][side]["cpu_ratio"])
    x = list(range(len(labels)))
    for offset, stats, name in ((-0.2, wall, "wall time"), (0.2, cpu, "CPU time")):
        med, err = _errorbar(stats)
        ax.bar([i + offset for i in x], med, width=0.4, yerr=err, capsize=3, label=name)
    ax.axhline(bench_print.TARGET, color="tab:red", linestyle="--",
               label=f"target (child) {bench_print.TARGET}")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("ratio")
    ax.set_ylim(0, 1.3 * max([s["max"] for s in wall + cpu if s] or [2.0]))
    ax.legend(fontsize=7, ncol=3, loc="upper center")


def _plot_throughput(ax: Any, results: dict[str, Any], payload: str) -> None:
    line = payload == "line"
    ax.set_title("2. throughput, 100-byte lines" if line else "2. throughput, 4 KiB chunks")
    r = results.get("throughput")
    if not _ok(r) or payload not in r:
        return
    key, scale = ("lines_per_s", 1e6) if line else ("bytes_per_s", 1e9)
    ns_ = [int(n) for n in r[payload]]
    for t in bench_throughput.TRANSPORTS:
        med, err = _errorbar([r[payload][str(n)][t][key] for n in ns_])
        ax.errorbar(ns_, [m / scale for m in med], yerr=[[e / scale for e in side]
                                                          for side in err],
                    marker="o", capsize=2, label=NAMES[t],
                    linewidth=2.5 if t == "ring" else 1.2)
    limit = _limit(results, LIMITS[payload])
    if limit:
        ax.axhline(limit / (100 if line else 1) / scale, color="gray", linestyle=":",
                   label="limit: " + LIMITS[payload] + ", 1 core")
    if not line:
        ax.axhline(bench_throughput.GBPS_TARGET, color="tab:red", linestyle="--",
                   label="target 1 GB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns_, [str(n) for n in ns_])
    ax.set_xlabel("producer processes")
    ax.set_ylabel("million lines/s" if line else "GB/s")
    ax.legend(fontsize=7, ncol=2)


def _plot_latency(ax: Any, r: Any) -> None:
    ax.set_title("3. latency write -> master, p50 and p99")
    if not _ok(r):
        return
    labels, p50, p99 = [], [], []
    for condition in bench_latency.CONDITIONS:
        for transport in bench_latency.TRANSPORTS:
            s = r.get(f"{transport} {condition}")
            if s and s["p50"]:
                labels.append(f"{transport}\n{condition}")
                p50.append(s["p50"])
                p99.append(s["p99"])
    x = list(range(len(labels)))
    for offset, stats, name in ((-0.2, p50, "p50"), (0.2, p99, "p99")):
        med, err = _errorbar(stats)
        ax.bar([i + offset for i in x], med, width=0.4, yerr=err, capsize=3, label=name)
    ax.axhline(bench_latency.TARGET_P99_MS, color="tab:red", linestyle="--",
               label="target p99 idle")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)


def _plot_wandb(ax: Any, r: Any) -> None:
    ax.set_title("4. wandb: print in the master, ratio to plain")
    if not _ok(r):
        ax.text(0.5, 0.5, "not run (--quick / --skip-wandb)", ha="center",
                transform=ax.transAxes)
        return
    labels, stats = [], []
    for console, capture in bench_wandb.CONFIGS:
        s = r.get(f"{console} {capture}")
        if s and s["ratio"]:
            labels.append(f"{console}\n{capture}")
            stats.append(s["ratio"])
    med, err = _errorbar(stats)
    ax.bar(range(len(med)), med, yerr=err, capsize=3, color="tab:purple")
    ax.axhline(WANDB_TARGET, color="tab:red", linestyle="--", label="target (patched) 1.5")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ratio")
    ax.legend(fontsize=8)


def _plot_memory(ax: Any, r: Any) -> None:
    ax.set_title("5. peak RSS, 16 lanes")
    if not _ok(r):
        return
    modes = ("none", "import", "wrap", "fd")
    x = list(range(len(modes)))
    for offset, side in ((-0.2, "master"), (0.2, "child")):
        med, err = _errorbar([r[m][side]["mib"] for m in modes])
        ax.bar([i + offset for i in x], med, width=0.4, yerr=err, capsize=3, label=side)
    ax.set_xticks(x, modes)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)


def main() -> int:
    """Render the table and the plot again from benchmarks/results/*.json (a finished run)."""
    import json

    here = Path(__file__).resolve().parent
    meta = json.loads((here / "results" / "run.json").read_text())["meta"]
    results: dict[str, Any] = {"meta": meta}
    for name in meta["parts"]:  # those of the last run, not older files
        results[name] = json.loads((here / "results" / f"{name}.json").read_text())
    print(render(results))
    (here / "results" / "table.md").write_text(render(results, markdown=True) + "\n")
    plot(results, here / "performance.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

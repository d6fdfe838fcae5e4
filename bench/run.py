"""Runs the benchmarks and writes bench/results/latest.json, a table and a plot."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    agent_storm,
    boot_storm,
    boot_time,
    control_plane,
    datapath,
    datapath_tuning,
    gateway,
    provision,
    real_os,
    scale_out,
    tgtd_processes,
)
from bench.common import FULL, Results

RESULTS = Path(__file__).parent / "results"
SUITES = {
    "provision": provision,
    "boot_storm": boot_storm,
    "agent_storm": agent_storm,
    "control_plane": control_plane,
    "datapath": datapath,
    "boot_time": boot_time,
    "real_os": real_os,
    "gateway": gateway,
    "scale_out": scale_out,
    "tgtd_processes": tgtd_processes,
    "datapath_tuning": datapath_tuning,  # experiments: only when asked for by name
}
DEFAULT = [name for name in SUITES if name != "datapath_tuning"]


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    mem = next((ln.split()[1] for ln in meminfo if ln.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory_gib": f"{int(mem) / 2**20:.1f}",
            "kernel": platform.release(), "python": platform.python_version()}


def table(results: Results) -> str:
    lines = ["| benchmark | metric | value | baseline | ratio | goal | met |",
             "|---|---|---|---|---|---|---|"]
    for f in results.figures:
        base = f"{f.baseline:.4g} {f.unit} ({f.baseline_name})" if f.baseline else "-"
        ratio = f"{f.ratio:.2f}x" if f.ratio else "-"
        met = "-" if f.ok is None else ("yes" if f.ok else "**no**")
        note = f" — {f.note}" if f.note else ""
        lines.append(f"| {f.benchmark} | {f.metric}{note} | {f.value:.4g} {f.unit} | {base} | "
                     f"{ratio} | {f.goal or '-'} | {met} |")
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = results.series.get("provision")
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        ax.plot([n for n, _ in points], [v * 1000 for _, v in points], marker="o", label=name)
    ax.set_xlabel("nodes already provisioned")
    ax.set_ylabel("ms per provision (median of 10)")
    ax.set_xscale("log")
    ax.set_title("Provisioning cost per node")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    chosen = argv or DEFAULT
    if unknown := [name for name in chosen if name not in SUITES]:
        print(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
        return 2
    results = Results()
    for name in chosen:
        print(f"== {name} ({'full' if FULL else 'quick'})", flush=True)
        SUITES[name].run(results)
    RESULTS.mkdir(exist_ok=True)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": "full" if FULL else "quick",
        "machine": machine(),
        "figures": [f.as_dict() for f in results.figures],
        "series": results.series,
    }
    # A run of some suites only must not overwrite the record of the whole run.
    stem = "latest" if chosen == DEFAULT else "-".join(chosen)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, RESULTS / f"{stem}.png")
    rendered = table(results)
    (RESULTS / f"{stem}.md").write_text(
        f"Run {report['when']} ({report['scale']}) on {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores, {report['machine']['memory_gib']} GiB\n\n"
        + rendered + "\n"
    )
    print()
    print(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

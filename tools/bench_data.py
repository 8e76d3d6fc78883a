"""Data-pipeline benchmark: `mdaf synth` then `mdaf prepare`, each timed as its own process.

    python tools/bench_data.py --rows 20000000 [--modes single,partitioned] [prepare overrides like prepare.memory_gb=3]

Prints one JSON object: rows, CSV bytes, and for synth and each prepare mode the wall and CPU
seconds (its worker processes included: on a busy machine the steadier number) and the peak
memory (GB) of its whole process tree, sampled every 50 ms: resident (RSS, shared pages counted
in every process) and proportional (PSS); then prepare's per-stage wall and CPU seconds and peak
memory of its main process so far (meta["seconds"], meta["cpu_seconds"], meta["peak_rss_gb"]),
its partitions and its final split sizes.
Modes: "single" is one partition in one process (`prepare.partitions=1 prepare.workers=1`: every
click in memory at once), "partitioned" the partitions the memory budget chooses
(`prepare.memory_gb`, `prepare.workers`). Goal (2 cores): 100M rows in at most 90 s with at most
3 GB, and the peak at 20M rows at most 1.3x the peak at 5M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple
from machine import gemm_gflops

MODES = {"single": ["prepare.partitions=1", "prepare.workers=1"], "partitioned": []}


def tree_memory(root: int) -> Tuple[int, int]:
    """(resident, proportional) bytes of `root` and all its descendants now (Linux /proc): the
    resident sum counts pages the processes share (memory-mapped tables, libraries) once per
    process, the proportional sum (PSS) splits them among their sharers."""
    parents: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(frontier)
    totals = {"Rss:": 0, "Pss:": 0}
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    name, value = line.split()[:2]
                    if name in totals:
                        totals[name] += int(value) << 10
        except (OSError, ValueError):
            continue
    return totals["Rss:"], totals["Pss:"]


def run_phase(argv: List[str]) -> Dict[str, float]:
    """Run one child to completion; its wall and CPU seconds and the peak resident and proportional
    memory of its process tree in GB."""
    start = time.perf_counter()
    child = subprocess.Popen(argv)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[:] = map(max, peak, tree_memory(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(argv)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {
        "seconds": round(seconds, 2),
        # the child's CPU seconds and those of the processes it waited for (its workers)
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_gb": round(peak[0] / 2**30, 3),
        "peak_pss_gb": round(peak[1] / 2**30, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--workdir", help="where the CSV and prepared directories go (default: a temporary directory, removed)")
    parser.add_argument("overrides", nargs="*", help="passed to `mdaf prepare`")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes {args.modes}: each must be one of {', '.join(MODES)}")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    workdir.mkdir(parents=True, exist_ok=True)
    csv_path = workdir / "synthetic.csv"
    mdaf = [sys.executable, "-m", "mdaf_dist.cli"]
    try:
        synth = run_phase([*mdaf, "synth", "--out", str(csv_path), "--rows", str(args.rows), "--seed", str(args.seed), "--no-progress"])
        result = {"rows": args.rows, "csv_bytes": csv_path.stat().st_size, "synth": synth, "cpus": os.cpu_count()}
        for mode in modes:
            out = workdir / mode
            phase = run_phase([*mdaf, "prepare", "--input", str(csv_path), "--out", str(out), "--quiet", *args.overrides, *MODES[mode]])
            meta = json.loads((out / "meta.json").read_text())
            result[mode] = {
                **phase,
                "partitions": meta["partitions"],
                "stages": meta["seconds"],
                "stage_cpu_seconds": meta["cpu_seconds"],
                "stage_peak_rss_gb": meta["peak_rss_gb"],
                "samples": {split: meta["splits"][split]["rows"] for split in meta["splits"]},
            }
            shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["gemm_gflops_one_core"] = gemm_gflops()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

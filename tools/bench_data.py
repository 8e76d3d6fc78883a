"""Data-pipeline benchmark: `mdaf synth` then `mdaf prepare`, each timed as its own process.

    python tools/bench_data.py --rows 100000000 [prepare overrides like prepare.user_fraction=0.01]

Prints one JSON object: rows, CSV bytes, wall seconds and peak resident memory (GB) of each
phase, prepare's per-stage wall and CPU seconds and peak memory so far (meta["seconds"],
meta["cpu_seconds"], meta["peak_rss_gb"]; CPU seconds are the steadier number on a busy
machine) and its final split sizes. Peak memory
is each child's own `ru_maxrss` from `os.wait4`, so the phases do not mask each other.
Target (2 cores, 24 GB): 100M rows prepared in under 5 minutes with a peak under 12 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def run_phase(argv: List[str]) -> Dict[str, float]:
    """Run one child to completion; its wall seconds and peak RSS in GB (Linux ru_maxrss is KiB)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {child.returncode}")
    return {"seconds": round(time.perf_counter() - start, 2), "peak_gb": round(usage.ru_maxrss / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", help="where the CSV and prepared directory go (default: a temporary directory, removed)")
    parser.add_argument("overrides", nargs="*", help="passed to `mdaf prepare`")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    workdir.mkdir(parents=True, exist_ok=True)
    csv_path, out = workdir / "synthetic.csv", workdir / "prepared"
    mdaf = [sys.executable, "-m", "mdaf_dist.cli"]
    try:
        synth = run_phase([*mdaf, "synth", "--out", str(csv_path), "--rows", str(args.rows), "--seed", str(args.seed), "--no-progress"])
        prepare = run_phase([*mdaf, "prepare", "--input", str(csv_path), "--out", str(out), "--quiet", *args.overrides])
        meta = json.loads((out / "meta.json").read_text())
        result = {
            "rows": args.rows,
            "csv_bytes": csv_path.stat().st_size,
            "synth": synth,
            "prepare": {**prepare, "stages": meta["seconds"], "stage_cpu_seconds": meta["cpu_seconds"], "stage_peak_rss_gb": meta["peak_rss_gb"]},
            "samples": {split: meta["splits"][split]["rows"] for split in meta["splits"]},
            "cpus": os.cpu_count(),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

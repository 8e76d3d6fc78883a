#!/usr/bin/env bash
# The CUDA paths on one NVIDIA GPU, in under 10 minutes, written to one JSON file:
#   1. the CUDA tests (every selective-scan backend on CUDA against the reference loop, the
#      training loop through TorchRec's TrainPipelineSparseDist against the loop without one),
#   2. tools/bench_mamba.py with the `compiled` backend, and `mamba_ssm` where it is installed,
#   3. tools/bench_train.py on configs/paper.yaml (one rank, synthetic data prepared here), with
#      train.pipeline=sparse_dist (the CUDA default: the next batch's input all-to-all overlaps
#      this one's compute; on one GPU the all-to-all is a local copy) and =none (no read-ahead),
#      and their ratio,
#   4. `mdaf profile` of the paper config on the GPU (Tables 8 and C1).
# Each part runs under its own time limit (570 s in all); one that fails or times out is recorded with its exit
# status and the tail of its output, and the others still run.
#
#   tools/gpu_check.sh [OUT.json]        (default: outputs/gpu_check.json)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=${1:-outputs/gpu_check.json}

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch ($python: torch.cuda.is_available() is false); nothing was run" >&2
  exit 1
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$(dirname "$out")"

# part NAME SECONDS COMMAND...: stdout to $scratch/NAME.out, stderr to NAME.err, status to NAME.rc
part() {
  local name=$1 seconds=$2
  shift 2
  echo "gpu_check: $name (at most ${seconds} s)" >&2
  timeout "$seconds" "$@" > "$scratch/$name.out" 2> "$scratch/$name.err"
  echo $? > "$scratch/$name.rc"
}

part tests 90 "$python" -m pytest -q -rs tests/test_selective_scan.py tests/test_pipeline.py -k cuda

backends=compiled
if "$python" -c "import mamba_ssm" 2> /dev/null; then backends=compiled,mamba_ssm; fi
part bench_mamba 120 "$python" tools/bench_mamba.py --device cuda --batch 2048 --iters 10 --backends "$backends"

# the paper's filters at user_fraction 1: 600,000 synthetic rows give some 390,000 training samples
part data 60 bash -c "'$python' -m mdaf_dist.cli synth --out '$scratch/raw.csv' --rows 600000 --no-progress &&
  '$python' -m mdaf_dist.cli prepare --input '$scratch/raw.csv' --out '$scratch/data' --config configs/paper.yaml --quiet prepare.user_fraction=1"
part bench_train 210 "$python" tools/bench_train.py --config configs/paper.yaml --data-dir "$scratch/data" --ranks 1 --steps 60 --log-every 10 --pipelines sparse_dist none
part profile 90 "$python" -m mdaf_dist.cli profile --config configs/paper.yaml --out "$scratch/profile" data_dir="$scratch/data" train.device=cuda

"$python" - "$scratch" "$out" "$backends" << 'EOF'
"""Collect the parts into one JSON file: each part's exit status, its JSON result or its output's tail."""
import json
import sys
from pathlib import Path

import torch

scratch, out, backends = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def part(name, result=None):
    rc = int((scratch / f"{name}.rc").read_text())
    entry = {"exit_status": rc, "timed_out": rc == 124}
    if rc == 0 and result is not None:
        entry["result"] = result()
    else:
        text = (scratch / f"{name}.out").read_text() + (scratch / f"{name}.err").read_text()
        entry["output_tail"] = text[-3000:]
    return entry


report = {
    "device": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "bench_mamba_backends": backends.split(","),
    "tests": part("tests"),
    "bench_mamba": part("bench_mamba", lambda: json.loads((scratch / "bench_mamba.out").read_text())),
    "data": part("data"),
    "bench_train": part("bench_train", lambda: json.loads((scratch / "bench_train.out").read_text())),
    "profile": part("profile", lambda: json.loads((scratch / "profile" / "profile.json").read_text())),
}
report["tests"]["summary"] = ((scratch / "tests.out").read_text().strip().splitlines() or [""])[-1]
out.write_text(json.dumps(report, indent=2) + "\n")
failed = [name for name in ("tests", "bench_mamba", "data", "bench_train", "profile") if report[name]["exit_status"]]
print(f"gpu_check: {out}" + (f" (failed: {', '.join(failed)})" if failed else " (all parts passed)"))
sys.exit(1 if failed else 0)
EOF

#!/usr/bin/env bash
# Regenerates tools/figures/scaling_data_tiny.png, the example plot of README's "Scaling studies": the tiny
# data-scaling study (20,000 synthetic rows, 10 % to 100 % of the users, two seeds, a tiny model
# on CPU; a few minutes on 2 cores), its report, and the report's plot copied next to the README.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/studies/scaling_data_tiny}
mdaf study run configs/studies/tiny/scaling_data.yaml --out "$out"
mdaf study report "$out" > /dev/null
mkdir -p tools/figures
cp "$out/report/scaling_data.png" tools/figures/scaling_data_tiny.png
echo "tools/figures/scaling_data_tiny.png from the report in $out/report"

"""`mdaf demo`: the README's main job, end to end on synthetic data.

synthetic CSV -> `mdaf prepare` -> 2-process CPU training through TorchX -> final validation AUC.
Each step runs the same command a user would type, so the demo doubles as a smoke test of them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mdaf_dist.errors import UserError


def _step(title: str, cmd: list[str]) -> None:
    print(f"\n== {title}\n$ {shlex.join(cmd)}", flush=True)
    start = time.time()
    # TorchX's local scheduler starts `torchrun` from PATH: put this environment's first
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if subprocess.run(cmd, env=env).returncode != 0:
        raise UserError(f"step failed: {title} (command above)")
    print(f"-- {title}: {time.time() - start:.0f} s", flush=True)


def run(args) -> int:
    out = Path(args.out)
    raw, data, train_dir = out / "userbehavior.csv", out / "data", out / "train"
    py = sys.executable
    if not raw.exists():
        _step("synthesise UserBehavior-format data",
              [py, "-m", "mdaf_dist.cli", "synth", "--out", str(raw), "--rows", str(args.rows), "--seed", str(args.seed)])
    if not (data / "meta.json").exists():
        _step("prepare CTR samples",
              [py, "-m", "mdaf_dist.cli", "prepare", "--config", args.config, "--input", str(raw), "--out", str(data)])
    _step(
        f"train MDAF on {args.nproc} CPU processes (TorchX)",
        [py, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "dist.ddp", "-j", f"1x{args.nproc}",
         "-m", "mdaf_dist.train", "--", "--config", args.config, f"data_dir={data}", f"output_dir={train_dir}"],
    )
    results = json.loads((train_dir / "results.json").read_text())
    valid = results["valid"]
    print(f"\nfinal validation AUC {valid['auc']:.4f}  logloss {valid['logloss']:.4f}  ({valid['num_samples']} samples);"
          f" best AUC {results['best_auc']:.4f} after epoch {results['best_epoch']}; mean gate {valid.get('gate_mean', float('nan')):.3f}")
    return 0

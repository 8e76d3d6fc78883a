"""`mdaf demo`, the README's main job, end to end at a tiny size: synth, prepare, TorchX with two
gloo ranks, the final AUC read back from the run's results."""

import re
from pathlib import Path

import pytest

from mdaf_dist import cli

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--rows", "4000", "--config", str(SMOKE)]
    assert cli.main(argv) == 0
    auc = float(re.search(r"final validation AUC (\S+)", capsys.readouterr().out).group(1))
    assert 0.5 < auc <= 1.0
    assert (tmp_path / "data" / "meta.json").is_file() and (tmp_path / "train" / "results.json").is_file()

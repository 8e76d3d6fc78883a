"""`mdaf demo`, the README's main job, end to end at a tiny size: synth, prepare, TorchX with two
gloo ranks, the final AUC read back from the run's results; its stderr free of the stack's known
warnings, its progress bar ending at 100 %."""

import re
from pathlib import Path

import pytest

from mdaf_dist import cli

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


# what torch and torchrec print in every run unless muted (mdaf_dist/pinned.py) or avoided
KNOWN_WARNINGS = ("The topology was constructed directly", "deprecating ShardedTensor", "is_fx_tracing will return true", "FutureWarning")


@pytest.mark.slow
def test_demo_runs_the_whole_chain_without_the_stacks_known_warnings(tmp_path, capfd):
    argv = ["demo", "--out", str(tmp_path), "--rows", "4000", "--config", str(SMOKE)]
    assert cli.main(argv) == 0
    out, err = capfd.readouterr()
    auc = float(re.search(r"final validation AUC (\S+)", out).group(1))
    assert 0.5 < auc <= 1.0
    assert [warning for warning in KNOWN_WARNINGS if warning in err] == []
    # the training bar (rank 0's, through TorchX) ends at 100 %
    bars = re.findall(r"(\d+)%\|[^|]*\| (\d+)/(\d+) \[[^\]]*samples/s", err)
    assert bars and bars[-1][0] == "100" and bars[-1][1] == bars[-1][2]
    assert (tmp_path / "data" / "meta.json").is_file() and (tmp_path / "train" / "results.json").is_file()

"""Typed configs: every shipped YAML loads, overrides apply in order, mistakes name the key."""

from pathlib import Path

import pytest

from mdaf_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
# configs/studies/ holds study files (tested in test_study_spec.py), and one training config
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.relative_to(ROOT).parts[0] != "studies" or p.name == "base_config.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_loads(path):
    load_config(str(path))


def test_overrides_win_over_the_file_and_are_typed():
    paper = next(p for p in CONFIGS if p.name == "paper.yaml")
    cfg = load_config(str(paper), ["model.fusion=concat", "train.lr=0.001", "loader.batch_size=16"])
    assert (cfg.model.fusion, cfg.train.lr, cfg.loader.batch_size) == ("concat", 0.001, 16)
    assert load_config(str(paper)).model.fusion == "gate"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.fusionx=gate"], "model.fusionx: Key 'fusionx' not in 'ModelConfig'. Did you mean: 'fusion'?"),
        (["train.lr=fast"], "train.lr: Value 'fast' of type 'str' could not be converted to Float"),
        (["train.max_steps="], "train.max_steps: Value '' of type 'str' could not be converted to Integer"),
        (["model.fusion"], "overrides must look like key.sub=value, got: model.fusion"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value) == message


def test_an_empty_override_sets_the_empty_string():
    assert load_config(None, ["data_dir=", "train.resume="]).data_dir == ""


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_later_config_files_overlay_earlier_ones():
    paper = next(p for p in CONFIGS if p.name == "paper.yaml")
    concat = next(p for p in CONFIGS if p.parent.name == "ablations" and p.name == "concat.yaml")
    cfg = load_config([str(paper), str(concat)], ["train.max_epochs=1"])
    assert (cfg.model.fusion, cfg.model.embedding_dim, cfg.train.max_epochs) == ("concat", 64, 1)

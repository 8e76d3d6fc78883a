"""Typed configs: every shipped YAML loads, overrides apply in order, mistakes name the key."""

import dataclasses
import typing
from pathlib import Path
from typing import Literal

import pytest

from mdaf_dist.config import Config, ConfigError, EmbeddingOptimizer, ModelName, ShardingType, load_config

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
        # a choice: the key, the value and the choices
        (["model.fusion=concatt"], "model.fusion='concatt' is not one of: gate, concat, fixed, attention, cross_attention, dlf_naf, optfusion"),
        (["sharding.tables.item=rows"], "sharding.tables.item='rows' is not one of: table_wise, row_wise, column_wise, data_parallel"),
        (["train.device=gpu"], "train.device='gpu' is not one of: auto, cpu, cuda"),
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


def _literal_keys(cls=Config, prefix=""):
    """(dotted key, choices) of every setting typed as a Literal, a map's entries included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _literal_keys(hint, f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            yield f"{prefix}{f.name}.some_table", typing.get_args(f.metadata["choices"])
        elif typing.get_origin(hint) is Literal:
            yield f"{prefix}{f.name}", typing.get_args(hint)


LITERAL_KEYS = list(_literal_keys())


def test_the_choice_settings_are_typed():
    assert {key for key, _ in LITERAL_KEYS} == {
        "prepare.neg_sampling", "prepare.neg_category", "prepare.dedup_clicks", "prepare.history_cutoff",
        "prepare.category_filter", "prepare.split", "model.name", "model.static_branch", "model.sequence_branch",
        "model.scan_backend", "model.fusion", "model.cross_attention_direction", "model.optfusion_stage", "train.embedding_optimizer", "train.device", "train.pipeline", "sharding.default",
        "sharding.tables.some_table",
    }  # fmt: skip


@pytest.mark.parametrize("key, choices", LITERAL_KEYS, ids=[key for key, _ in LITERAL_KEYS])
def test_every_choice_is_checked_where_the_config_is_loaded(key, choices):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{key}=bogus"])
    assert str(error.value) == f"{key}='bogus' is not one of: {', '.join(choices)}"
    for choice in choices:
        load_config(None, [f"{key}={choice}"])


def test_a_bad_choice_in_a_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prepare:\n  split: weeks\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == "prepare.split='weeks' is not one of: days, fraction"


def test_the_modules_implement_exactly_the_choices():
    from mdaf_dist.distributed.sharding import SHARDING_TYPES
    from mdaf_dist.models.registry import MODELS
    from mdaf_dist.train.optim import EMBEDDING_OPTIMIZERS

    assert list(MODELS) == list(typing.get_args(ModelName))
    assert ["auto", *EMBEDDING_OPTIMIZERS] == list(typing.get_args(EmbeddingOptimizer))
    assert list(SHARDING_TYPES) == list(typing.get_args(ShardingType))


@pytest.mark.parametrize("old", ["prepare.history_length", "loader.history_length"])
def test_history_length_is_one_setting_and_the_old_keys_say_where_it_went(tmp_path, old):
    assert load_config(None, ["model.history_length=7"]).model.history_length == 7
    message = f"{old} is now model.history_length (one setting for the prepared data, the loader and the model)"
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{old}=7"])
    assert str(error.value) == message
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: 7\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == message

"""Typed configuration: dataclasses, merged from YAML files and dotted command-line overrides.

OmegaConf does the merging and type checking, so a typo in a key or a wrong type is an error
that names the key, not a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mdaf_dist.errors import UserError

# 2017-11-25 00:00:00 in Beijing time (UTC+8), the start of the Taobao UserBehavior window.
TAOBAO_START_TS = 1511539200
SECONDS_PER_DAY = 86400


@dataclass
class PrepareConfig:
    """`mdaf prepare`: raw UserBehavior CSV -> events + CTR samples (MDAF_paper.md 5.1.1)."""

    input: str = ""
    out: str = ""
    # window of valid timestamps: [window_start, window_start + window_days * 86400)
    window_start: int = TAOBAO_START_TS
    window_days: int = 9
    check_window: bool = True
    # negatives per positive; 1.5 gives about 40 % positives, as in the paper
    neg_ratio: float = 1.5
    # negatives: items clicked by someone in the same window of this many seconds (one day),
    # never by this user in that window; "uniform" over those items or by "popularity"
    neg_window_seconds: int = SECONDS_PER_DAY
    neg_sampling: str = "uniform"
    history_length: int = 50
    drop_empty_history: bool = True
    # "last_l": target category appears in the history the model sees (last history_length
    # clicks; the paper's filter); "any": anywhere in the user's earlier clicks (relaxed);
    # "last_k": in the last category_last_k clicks; "none": keep all
    category_filter: str = "last_l"
    category_last_k: int = 10
    valid_days: int = 1
    # seeded user subsampling: keep this fraction of users (paper scale is about 0.0105)
    user_fraction: float = 1.0
    seed: int = 42
    # fail once more than this fraction of rows is malformed
    max_bad_fraction: float = 0.001
    block_size_bytes: int = 64 << 20
    samples_row_group: int = 1 << 17


@dataclass
class LoaderConfig:
    """The streaming loader over a prepared directory."""

    batch_size: int = 2048
    eval_batch_size: int = 4096
    shuffle_buffer: int = 1 << 16
    num_workers: int = 1
    seed: int = 42
    history_categories: bool = False


@dataclass
class ModelConfig:
    """Model family and sizes (MDAF_paper.md 4, 5.1.4)."""

    name: str = "mdaf"
    embedding_dim: int = 64
    history_length: int = 50
    dropout: float = 0.15
    label_smoothing: float = 0.01
    # static branch: "dcnv3" (the paper's LCN+ECN), "dcnv3_official" (Li et al. 2024), "mlp", "none"
    static_branch: str = "dcnv3"
    lcn_layers: int = 2
    ecn_layers: int = 2
    # sequential branch: "mamba" or "none"
    sequence_branch: str = "mamba"
    d_state: int = 32
    expand: int = 2
    d_conv: int = 4
    scan_backend: str = "auto"
    # fusion: "gate" (paper), "concat", "fixed", "attention"
    fusion: str = "gate"
    fixed_gate: float = 0.5
    # baselines
    num_heads: int = 2
    num_attention_layers: int = 2
    num_cross_layers: int = 3
    mlp_hidden: List[int] = field(default_factory=lambda: [256, 128])


@dataclass
class Config:
    data_dir: str = ""
    output_dir: str = "outputs/run"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


class ConfigError(UserError):
    """A configuration file or override that cannot be applied."""


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key.sub=value` overrides, in that order."""
    merged = OmegaConf.structured(Config)
    try:
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key.sub=value, got: {' '.join(bad)}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return OmegaConf.to_object(merged)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain dict of a config dataclass, for saving next to results."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

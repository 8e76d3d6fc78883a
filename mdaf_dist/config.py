"""Typed configuration: dataclasses, merged from YAML files and dotted command-line overrides.

OmegaConf does the merging and type checking, so a typo in a key, a wrong type or a value
outside a setting's `Literal` choices is an error that names the key, once, where the config is
loaded, not a silently ignored setting. Each fact has one key (the history length is
model.history_length, which prepare, loader and model all read).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mdaf_dist.errors import UserError

# 2017-11-25 00:00:00 in Beijing time (UTC+8), the start of the Taobao UserBehavior window.
TAOBAO_START_TS = 1511539200
SECONDS_PER_DAY = 86400

# The choices of settings that name one of a few; the modules that implement them take their
# lists from here (typing.get_args), so a new choice is added in one place.
NegSampling = Literal["uniform", "popularity"]
NegCategory = Literal["filter", "any"]
DedupClicks = Literal["none", "consecutive", "user_item"]
HistoryCutoff = Literal["click", "window", "session"]
CategoryFilter = Literal["last_l", "any", "last_k", "none"]
SplitMode = Literal["days", "fraction"]
ModelName = Literal["mdaf", "autoint", "dcnv2", "bst", "mamba4rec", "dlf"]
StaticBranch = Literal["dcnv3", "dcnv3_official", "mlp", "dlf", "optfusion", "none"]
SequenceBranch = Literal["mamba", "none"]
ScanBackend = Literal["auto", "reference", "fused_cpu", "cpu", "compiled", "mamba_ssm"]
Fusion = Literal["gate", "concat", "fixed", "attention", "cross_attention", "dlf_naf", "optfusion"]
CrossAttentionDirection = Literal["seq_to_static", "static_to_seq", "both"]
OptFusionStage = Literal["search", "retrain", "search_retrain"]
EmbeddingOptimizer = Literal["auto", "adam", "rowwise_adagrad", "adagrad", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
TrainPipeline = Literal["auto", "base", "sparse_dist", "none"]
ShardingType = Literal["table_wise", "row_wise", "column_wise", "data_parallel"]
# keys that moved: an old config naming one gets one line naming the new key
MOVED_KEYS = {"prepare.history_length": "model.history_length", "loader.history_length": "model.history_length"}


@dataclass
class PrepareConfig:
    """`mdaf prepare`: raw UserBehavior CSV -> events + CTR samples (MDAF_paper.md 5.1.1)."""

    # raw UserBehavior CSV (plain, gzip, bzip2, xz, zstd or zip; local path or fsspec URI)
    input: str = ""
    # the prepared directory written (events, samples, meta.json)
    out: str = ""
    # window of valid timestamps: [window_start, window_start + window_days * 86400)
    window_start: int = TAOBAO_START_TS
    # days of the window (see window_start)
    window_days: int = 9
    # reject rows whose timestamp lies outside the window
    check_window: bool = True
    # negatives per positive; 1.5 gives about 40 % positives, as in the paper
    neg_ratio: float = 1.5
    # negatives: items clicked by someone in the same window of this many seconds (one day),
    # never by this user in that window; "uniform" over those items or by "popularity"
    neg_window_seconds: int = SECONDS_PER_DAY
    # negatives drawn "uniform" over the window's clicked items or by "popularity"
    neg_sampling: NegSampling = "uniform"
    # a negative the user clicked in its window is redrawn; after this many draws it is dropped
    neg_max_draws: int = 10
    # "any": any item of the window (the paper's 5.1.1, and configs/paper.yaml): drawn once,
    # before and whatever the filters, so data that differ by a filter share their negatives
    # (most of which the category filter drops); "filter": a negative's category is drawn from
    # the history clicks the category filter looks at, so negatives pass it like positives must
    # and the kept samples stay about 40 % positive (the paper's Table 1), but the negatives then
    # change with the filter setting
    neg_category: NegCategory = "filter"
    # repeated clicks: "none" keeps them; "consecutive" drops a click of the item its user clicked
    # just before; "user_item" keeps a user's first click of each item only
    dedup_clicks: DedupClicks = "none"
    # where a sample's history ends: "click" (every earlier click: about 1 % empty histories),
    # "window" (clicks of earlier neg_window_seconds windows, i.e. days), "session" (clicks
    # before the sample's session; a pause of more than session_gap_seconds starts one). The
    # last two are the readings that come near the paper's -13.0 % (README "The real data")
    history_cutoff: HistoryCutoff = "click"
    # a pause longer than this starts a session (history_cutoff=session)
    session_gap_seconds: int = 1800
    # drop samples with no history (the paper's empty-sequence removal)
    drop_empty_history: bool = True
    # "last_l": target category appears in the history the model sees (last model.history_length
    # clicks; the paper's filter); "any": anywhere in the user's earlier clicks (relaxed);
    # "last_k": in the last category_last_k clicks; "none": keep all
    category_filter: CategoryFilter = "last_l"
    # clicks the last_k category filter looks at
    category_last_k: int = 10
    # temporal split (samples.split_bounds). "days": training, then the last-but-test_days
    # valid_days days as validation, then the last test_days days as test (the paper: one
    # validation day, no test). "fraction": the same order over the clicks' time range cut by
    # valid_fraction and test_fraction, for inputs that span less than a few days
    split: SplitMode = "days"
    # split=days: days of validation (see split)
    valid_days: int = 1
    # split=days: last days held out as test (see split)
    test_days: int = 0
    # split=fraction: share of the time range for validation (see split)
    valid_fraction: float = 0.1
    # split=fraction: share of the time range for test (see split)
    test_fraction: float = 0.1
    # seeded user subsampling: keep this fraction of users (about 0.0053 gives the paper's
    # 1.05M training samples before filtering from the full data)
    user_fraction: float = 1.0
    # seed of the user subsampling and the negatives
    seed: int = 42
    # fail once more than this fraction of rows is malformed (in [0, 1]; checked while reading,
    # against the file's estimated row count, so a file of garbage fails within a few blocks)
    max_bad_fraction: float = 0.001
    # bytes of CSV parsed per block (bounds the ingest's memory)
    block_size_bytes: int = 64 << 20
    # samples are written in (user, time) order; small row groups let the loader's shuffle mix
    # many users and days (it permutes row groups, then shuffles windows of loader.shuffle_buffer)
    samples_row_group: int = 1 << 14
    # row groups per samples/<split>/part-*.parquet file
    samples_part_row_groups: int = 128
    # users are prepared in partitions by a hash of their id (data.partitions): as many as let
    # `workers` processes (0: one per CPU core) at a time stay within memory_gb, or exactly
    # `partitions` when it is set; the output is the same whatever the partitioning
    memory_gb: float = 3.0
    # partitions prepared at once, each in its own process (0: one per CPU core)
    workers: int = 0
    # partitions of the users (0: as many as memory_gb allows)
    partitions: int = 0


@dataclass
class LoaderConfig:
    """The streaming loader over a prepared directory."""

    # training samples per batch and rank
    batch_size: int = 2048
    # evaluation samples per batch and rank
    eval_batch_size: int = 4096
    # rows shuffled together; many Parquet row groups of `mdaf prepare` (prepare.samples_row_group)
    shuffle_buffer: int = 1 << 18
    # DataLoader worker processes per rank (0: in the training process)
    num_workers: int = 1
    # seed of the shuffle (with the epoch and rank)
    seed: int = 42
    # also gather the history's categories (feature hist_category)
    history_categories: bool = False
    # training drops the last partial batch of each rank instead of yielding it (evaluation
    # always covers every sample)
    drop_last: bool = False


@dataclass
class ModelConfig:
    """Model family and sizes (MDAF_paper.md 4, 5.1.4)."""

    # model family: mdaf or a baseline (autoint, dcnv2, bst, mamba4rec)
    name: ModelName = "mdaf"
    # D, the width of every embedding table
    embedding_dim: int = 64
    # L, the clicks of history the model sees (the last L before the sample): the loader gathers
    # that many, and prepare's category_filter=last_l looks at them (meta.json records it)
    history_length: int = 50
    # dropout rate of the embeddings, branches and fusion
    dropout: float = 0.15
    # label smoothing of the BCE loss (the paper: 0.01)
    label_smoothing: float = 0.01
    # static branch: "dcnv3" (the paper's LCN+ECN), "dcnv3_official" (Li et al. 2024), "mlp", "none"
    static_branch: StaticBranch = "dcnv3"
    # layers of the linear cross network (LCN)
    lcn_layers: int = 2
    # layers of the exponential cross network (ECN)
    ecn_layers: int = 2
    # dcnv3_official: BatchNorm on each layer's W x_l (the published layer's batch_norm switch;
    # off by its default, on in most of its tuned configs)
    dcnv3_batch_norm: bool = False
    # DLF (DLF_paper.md), MDAF's static branch (static_branch: dlf) or the baseline (name: dlf):
    # stacked layers L and rounds of NAF attention (5.5: best at 8 and 2), and a LayerNorm on each
    # layer's output (models/dlf.py says why; false: the paper's equations exactly)
    dlf_layers: int = 8
    # DLF: rounds of NAF attention in each layer (5.5: 2)
    dlf_attention_layers: int = 2
    # DLF: a LayerNorm on each layer's output (false: the paper's equations exactly)
    dlf_layer_norm: bool = True
    # sequential branch: "mamba" or "none"
    sequence_branch: SequenceBranch = "mamba"
    # Mamba4Rec layers (Mamba block + FFN) stacked in the sequential branch (the paper: 1)
    mamba_layers: int = 1
    # residual around a single Mamba block: the paper's reading (true); Mamba4Rec drops it for
    # one layer (false). Stacked layers always have it, as in Mamba4Rec
    single_layer_residual: bool = True
    # Mamba's SSM state size N
    d_state: int = 32
    # Mamba's inner width factor (inner width = expand * D)
    expand: int = 2
    # Mamba's causal convolution width
    d_conv: int = 4
    # selective-scan implementation; "auto" picks the fastest available on the device
    scan_backend: ScanBackend = "auto"
    # fusion: "gate" (paper), "concat", "fixed", "attention" (self-attention over the two branch
    # vectors), "cross_attention", "dlf_naf" (models/fusion.py), "optfusion" (models/optfusion.py)
    fusion: Fusion = "gate"
    # cross_attention: "seq_to_static" (every step of the sequence attends to the static tokens,
    # the MDAF paper's variant), "static_to_seq" (h_static attends to the steps) or "both"
    cross_attention_direction: CrossAttentionDirection = "seq_to_static"
    # fusion=fixed: the constant weight of the sequential branch
    fixed_gate: float = 0.5
    # hidden width of the adaptive gate 2D -> gate_hidden -> 1; 0 means D (the paper's 2D -> D -> 1)
    gate_hidden: int = 0
    # the attention and cross_attention fusions' heads
    num_heads: int = 2
    # baselines: AutoInt's interacting layers and heads, BST's transformer blocks and heads
    # (the original BST: 1 block, 8 heads)
    autoint_layers: int = 2
    # AutoInt's attention heads (see autoint_layers)
    autoint_heads: int = 2
    # BST's transformer blocks (see autoint_layers)
    bst_blocks: int = 2
    # BST's attention heads (see autoint_layers)
    bst_heads: int = 2
    # DCNv2's cross layers
    num_cross_layers: int = 3
    # DCNv2's mixture of low-rank cross experts (5.1.2: "mixture-of-experts cross layers")
    cross_experts: int = 4
    # DCNv2: rank of each low-rank cross expert
    cross_low_rank: int = 32
    # hidden widths of the baselines' deep MLP and of the mlp static branch
    mlp_hidden: List[int] = field(default_factory=lambda: [256, 128])
    # OptFusion (models/optfusion.py), with fusion "optfusion" and/or static_branch "optfusion":
    # "search" learns the connections (alpha) and operations (beta) and writes the selection to
    # <output_dir>/optfusion_architecture.json; "retrain" trains the model of the selection in
    # optfusion_architecture with it fixed; "search_retrain" runs both, the search in
    # <output_dir>/search
    optfusion_stage: OptFusionStage = "search"
    # OptFusion's retrain stage: the selection file its search wrote (optfusion_architecture.json)
    optfusion_architecture: Optional[str] = None
    # the learning rate of alpha and beta's own Adam in the search stage
    optfusion_search_lr: float = 1e-3
    # static_branch "optfusion": n cross and n deep components (the paper's n = 3)
    optfusion_layers: int = 3


@dataclass
class LoggingConfig:
    """What rank 0 reports while training: TensorBoard events, a progress bar, log lines."""

    # write TensorBoard events under <output_dir>/tensorboard
    tensorboard: bool = True
    # the events' directory instead of <output_dir>/tensorboard (a study puts each cell's under
    # <study>/tensorboard/<cell>, so that one TensorBoard shows every cell)
    tensorboard_dir: str = ""
    # training scalars (loss, lr, samples/s) every this many steps
    log_every: int = 50
    # a progress bar on rank 0 with samples/s and ETA
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """The training recipe (MDAF_paper.md 5.1.4) and the run's length."""

    # seed of the model's initial weights and dropout
    seed: int = 42
    # epochs at most (early stopping may end sooner)
    max_epochs: int = 10
    # stop after this many optimizer steps in all (0: no limit); a resumed run counts on
    max_steps: int = 0
    # AdamW's learning rate of the dense parameters (and the tables', see embedding_lr)
    lr: float = 5e-4
    # AdamW's decoupled weight decay and the gradient clipping norm apply to the dense
    # parameters only (train/optim.py says why the fused tables have neither)
    weight_decay: float = 1e-5
    # linear warmup of every learning rate (the tables' too); warmup_steps wins when > 0, else
    # warmup_epochs
    warmup_epochs: float = 2.0
    # warmup in optimizer steps (see warmup_epochs)
    warmup_steps: int = 0
    # gradient clipping norm of the dense parameters
    grad_clip_norm: float = 1.0
    # early stopping: epochs without a better validation AUC before stopping (0: never stop early)
    patience: int = 5
    # the tables' optimizer, fused into the backward: "auto" = adam on CUDA, rowwise_adagrad on
    # CPU (the fbgemm CPU kernels have no Adam); also "adagrad", "sgd"
    embedding_optimizer: EmbeddingOptimizer = "auto"
    # the tables' learning rate; null (default): train.lr, as in the paper's single AdamW
    embedding_lr: Optional[float] = None
    # epsilon of the tables' optimizer
    embedding_eps: float = 1e-8
    # "auto" (latest checkpoint in output_dir/checkpoints if there is one), "" (never), or a path
    resume: str = ""
    # "auto": CUDA when available, else CPU; or "cpu" / "cuda"
    device: Device = "auto"
    # the loop's TorchRec train pipeline: auto (sparse_dist on CUDA, base on CPU), base, sparse_dist,
    # none; sparse_dist overlaps the next batch's input all-to-all with this one's compute (it needs
    # the sharded tables: auto is base with `--embedding-backend plain`), base reads one batch
    # ahead, none draws each batch right before its step; the losses are the same (train/pipeline.py)
    pipeline: TrainPipeline = "auto"
    # exact AUC over each epoch's training samples (results.json "evaluations", TensorBoard
    # train/auc). Memory grows with the epoch's samples: every rank keeps 5 bytes (logit, label)
    # per sample it trains on, in its checkpoint files too, and rank 0 gathers and sorts all of
    # them at the epoch's end, at about 25 bytes a sample (the full data's 187M training samples:
    # some 4.5 GB). Turn it off if that is too much: train_auc is then None (null) in results,
    # "n/a" in reports
    train_auc: bool = True


@dataclass
class ShardingConfig:
    """How DistributedModelParallel places each table: table_wise, row_wise, column_wise or
    data_parallel (see mdaf_dist/distributed/sharding.py for what runs on CPU/gloo)."""

    # sharding type for every table not named in `tables`
    default: ShardingType = "table_wise"
    # per-table override, e.g. {item: row_wise}
    # (omegaconf 2.4 refuses every value of a Dict[str, Literal]: the values' choices are checked
    # by load_config from this field's metadata)
    tables: Dict[str, str] = field(default_factory=dict, metadata={"choices": ShardingType})


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint snapshots under <output_dir>/checkpoints."""

    # also save every this many steps (0: only after each epoch's evaluation)
    every_steps: int = 0
    # most recent checkpoints kept; the best one (by validation AUC) is always kept as well
    keep_last: int = 2


@dataclass
class Config:
    # the prepared data directory (`mdaf prepare`'s output) trained on
    data_dir: str = ""
    # the run's directory: checkpoints, TensorBoard events, results.json
    output_dir: str = "outputs/run"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(UserError):
    """A configuration file or override that cannot be applied."""


def load_config(paths: Union[str, Sequence[str], None] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then each YAML file in `paths` in turn (a later file overlays an earlier one, e.g.
    configs/paper.yaml then configs/ablations/concat.yaml), then `key.sub=value` overrides."""
    merged = OmegaConf.structured(Config)
    try:
        for path in [paths] if isinstance(paths, str) else list(paths or ()):
            merged = OmegaConf.merge(merged, _load_yaml(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key.sub=value, got: {' '.join(bad)}")
        # `key=` sets the empty string (omegaconf would read None, which no field accepts)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([o + "''" if o.endswith("=") else o for o in overrides]))
    except OmegaConfBaseException as e:
        # omegaconf's message names the value and the expected type, its full_key the setting
        if getattr(e, "full_key", None) in MOVED_KEYS:
            raise ConfigError(f"{e.full_key} is now {MOVED_KEYS[e.full_key]} (one setting for the prepared data, the loader and the model)") from None
        allowed = _choices(e.full_key) if getattr(e, "full_key", None) else None
        if allowed is not None:
            raise choice_error(e.full_key, e.value, allowed) from None
        message = str(e).splitlines()[0]
        raise ConfigError(f"{e.full_key}: {message}" if getattr(e, "full_key", None) else message) from None
    cfg = OmegaConf.to_object(merged)
    _check_map_choices(cfg)
    return cfg


def choice_error(key: str, value: Any, choices: Sequence[str]) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def _choices(key: str) -> Optional[Sequence[str]]:
    """The Literal choices of the setting at dotted `key`, or None when it has none: omegaconf
    checks them, this phrases its message as one line."""
    hint: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _check_map_choices(cfg: Any, prefix: str = "") -> None:
    """The entries of maps whose field names its Literal choices in metadata["choices"]."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_map_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            choices = typing.get_args(f.metadata["choices"])
            for key, entry in value.items():
                if entry not in choices:
                    raise choice_error(f"{prefix}{f.name}.{key}", entry, choices)


def _load_yaml(path: str) -> DictConfig:
    """One YAML config file as a mapping, or one line saying why it is not one."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path} is not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must be a mapping of sections (prepare:, loader:, model:, ...), not a {type(loaded).__name__.replace('Config', '').lower()}")
    return loaded


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain dict of a config dataclass, for saving next to results."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

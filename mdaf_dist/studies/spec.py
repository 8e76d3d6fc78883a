"""Study files: what a study trains and what its report shows (configs/studies/*.yaml).

    name: table3_ablations
    title: "Table 3: ablation study on MDAF components"
    configs: [configs/paper.yaml]          # base config files, later ones overlay earlier ones
    overrides: [train.max_epochs=10]       # dotted overrides for every cell
    synth: {rows: 4000, categories: 40}    # optional: synthetic input instead of prepare.input
    grid: product                          # or one_at_a_time (each axis alone around the base)
    axes:
      - key: model.fusion                  # one dotted key (or world_size / nproc_per_node / nnodes)
        values: [gate, concat]             # ... and its values
      - name: variant                      # or values that each carry their own settings
        values:
          - {label: "MDAF (Full)"}
          - {label: "w/o Gate (concat)", config: configs/ablations/concat.yaml, set: {train.lr: 0.001}}
    seeds: [42, 43, 44]                    # each cell is trained once per seed (train.seed, loader.seed)
    world_size: 1                          # ranks per node unless an axis (or world_size=N on the command line) sets it
    resources: {cpu_per_rank: 8, gpu_per_rank: 1, memMB_per_rank: 32768}
    env: {NCCL_DEBUG: WARN}                # environment of every rank
    report: {kind: models, paper: table3, reference: "MDAF (Full)", dynamics: "MDAF (Full)"}
    # a study of configs/authors_readme.yaml: the authors' README numbers beside the paper's
    # report: {kind: models, paper: table2, paper2: table2_authors_readme, reference: BST}
    evaluate_on: [prepare.category_filter=none]  # the common evaluation set (studies.common)

OmegaConf checks the file's shape and types (an unknown field is an error naming it); this
module checks what OmegaConf cannot: every axis has values, every key exists in the training
config (by applying it), every overlay file exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mdaf_dist.config import ConfigError, load_config
from mdaf_dist.errors import UserError, one_line
from mdaf_dist.studies.paper import TABLES

# axis keys that set the TorchX component's world shape rather than a config key
LAUNCH_KEYS = {"world_size": "nproc_per_node", "nproc_per_node": "nproc_per_node", "nnodes": "nnodes"}
GRIDS = ("product", "one_at_a_time")
REPORT_KINDS = ("models", "filtering", "sensitivity", "scaling_data", "scaling_world")
PAPER_TABLES = ("", *TABLES, "tableA1")


@dataclass
class AxisSpec:
    # one dotted key whose values are the axis' values, or "" when each value carries `set`
    key: str = ""
    name: str = ""
    values: List[Any] = field(default_factory=list)


@dataclass
class SynthSpec:
    """`mdaf synth` arguments: the study's input is generated once into the study directory."""

    rows: int = 4000
    seed: int = 42
    users: Optional[int] = None
    items: Optional[int] = None
    categories: Optional[int] = None


@dataclass
class ResourcesSpec:
    """What each rank needs; a node asks the scheduler for nproc_per_node times this (local_cwd
    ignores it). 0 asks for nothing: the scheduler's default. `mdaf study run --resources
    cpu_per_rank=4,memMB_per_rank=8192` overrides the study file's."""

    cpu_per_rank: int = 2
    gpu_per_rank: int = 0
    memMB_per_rank: int = 4096


@dataclass
class ReportSpec:
    # models (Tables 2, 3), filtering (Table 6, filter scaling), sensitivity (A1),
    # scaling_data, scaling_world
    kind: str = "models"
    # mdaf_dist.studies.paper table whose numbers are shown beside ours ("" for none)
    paper: str = ""
    # a second table shown beside it, under its own title (models), e.g. table2_authors_readme
    paper2: str = ""
    # row label that deltas are measured against (models); the first row when empty
    reference: str = ""
    # row label whose per-epoch train/val AUC is shown beside the paper's Table 7 ("" for none)
    dynamics: str = ""


@dataclass
class StudyFile:
    name: str = MISSING
    title: str = ""
    configs: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    synth: Optional[SynthSpec] = None
    grid: str = "product"
    axes: List[AxisSpec] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [42])
    world_size: int = 1
    nnodes: int = 1
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    # environment variables of every rank, e.g. {OMP_NUM_THREADS: "1"} or {NCCL_DEBUG: WARN}
    env: Dict[str, str] = field(default_factory=dict)
    report: ReportSpec = field(default_factory=ReportSpec)
    # dotted prepare.* overrides of the base config naming the common evaluation set every
    # cell's best checkpoint is also scored on (studies.common); [] is the base config's data
    evaluate_on: List[str] = field(default_factory=list)


@dataclass
class AxisValue:
    """One value of an axis: its label in tables, overlay config files, and dotted settings."""

    label: str
    configs: List[str]
    settings: Dict[str, Any]

    def overrides(self) -> List[str]:
        return [f"{key}={override_text(value)}" for key, value in self.settings.items() if key not in LAUNCH_KEYS]

    def launch(self) -> Dict[str, int]:
        return {LAUNCH_KEYS[key]: int(value) for key, value in self.settings.items() if key in LAUNCH_KEYS}


@dataclass
class Axis:
    name: str
    # the dotted key every value sets ("" when values carry their own settings)
    key: str
    values: List[AxisValue]


@dataclass
class Study:
    """A validated study file."""

    path: str
    file: StudyFile
    axes: List[Axis]

    @property
    def name(self) -> str:
        return self.file.name


def parse_resources(base: ResourcesSpec, text: str) -> ResourcesSpec:
    """`base` with the comma-separated `key=value` settings of `text` (--resources) over it."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(items))
    except (OmegaConfBaseException, ValueError) as e:
        raise UserError(f"--resources {text!r}: {one_line(e)} (keys: {', '.join(f.name for f in fields(ResourcesSpec))})") from None
    resources = OmegaConf.to_object(merged)
    negative = [f"{f.name}={getattr(resources, f.name)}" for f in fields(ResourcesSpec) if getattr(resources, f.name) < 0]
    if negative:
        raise UserError(f"--resources {text!r}: {', '.join(negative)} must not be negative")
    return resources


def override_text(value: Any) -> str:
    """A value as the right-hand side of a dotted override (strings as they are, else JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def _label(value: Any) -> str:
    return value if isinstance(value, str) else override_text(value)


def _axis_value(path: str, axis: AxisSpec, raw: Any) -> AxisValue:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"label", "config", "set"})
        if unknown:
            raise UserError(f"{path}: axis {axis.name or axis.key!r}: a value has unknown field(s) {unknown} (label, config, set)")
        configs = raw.get("config") or []
        configs = [configs] if isinstance(configs, str) else list(configs)
        settings = dict(raw.get("set") or {})
        if axis.key and "label" not in raw:
            raise UserError(f"{path}: axis {axis.key!r}: a value given as a mapping needs a label")
        label = str(raw.get("label") or ", ".join(f"{k}={_label(v)}" for k, v in settings.items()) or "base")
        return AxisValue(label, configs, settings)
    if not axis.key:
        raise UserError(f"{path}: axis {axis.name!r} has no key: its values must be mappings with label/config/set")
    return AxisValue(_label(raw), [], {axis.key: raw})


def check_launch(where: str, key: str, setting: Any) -> int:
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise UserError(f"{where}: {key} must be a positive integer, got {setting!r}")
    return setting


def _check_value(path: str, axis_name: str, value: AxisValue) -> None:
    """Apply the value's settings to the default config: an unknown key or a wrong type fails here."""
    for config in value.configs:
        if not Path(config).is_file():
            raise UserError(f"{path}: axis {axis_name!r}: config file not found: {config}")
    for key, setting in value.settings.items():
        if key in LAUNCH_KEYS:
            check_launch(f"{path}: axis {axis_name!r}", key, setting)
    try:
        load_config(None, value.overrides())
    except ConfigError as e:
        # the config's message names the key; an axis named after its key needs no second name
        where = "axis" if str(e).startswith(f"{axis_name}:") else f"axis {axis_name!r}:"
        raise UserError(f"{path}: {where} {e}") from None


def _check_evaluate_on(path: str, overrides: List[str]) -> None:
    for override in overrides:
        if not override.startswith("prepare."):
            raise UserError(f"{path}: evaluate_on names the common evaluation set's data: only prepare.* settings, got {override!r}")
    try:
        load_config(None, overrides)
    except ConfigError as e:
        raise UserError(f"{path}: evaluate_on: {e}") from None


def load_study(path: str) -> Study:
    """Read and validate a study file; every problem is one UserError line naming the file."""
    if not Path(path).is_file():
        raise UserError(f"study file not found: {path}")
    try:
        shape = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(shape, dict):
        raise UserError(f"{path}: not a study file: expected a YAML mapping with name, axes, seeds, got {type(shape).__name__}")
    # OmegaConf's YAML loader reads 1e-5 as a number, as config files are read
    raw = OmegaConf.to_container(OmegaConf.load(path))
    try:
        file: StudyFile = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyFile), raw))
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from None
    if file.grid not in GRIDS:
        raise UserError(f"{path}: grid must be one of {GRIDS}, got {file.grid!r}")
    if file.report.kind not in REPORT_KINDS:
        raise UserError(f"{path}: report.kind must be one of {REPORT_KINDS}, got {file.report.kind!r}")
    for key in ("paper", "paper2"):
        if getattr(file.report, key) not in PAPER_TABLES:
            raise UserError(f"{path}: report.{key} must be one of {PAPER_TABLES}, got {getattr(file.report, key)!r}")
    if file.report.paper2 and file.report.kind != "models":
        raise UserError(f"{path}: report.paper2 is shown by models reports only, not {file.report.kind!r}")
    if not file.seeds:
        raise UserError(f"{path}: seeds is empty: give at least one seed")
    for config in file.configs:
        if not Path(config).is_file():
            raise UserError(f"{path}: config file not found: {config}")
    _check_evaluate_on(path, file.evaluate_on)
    axes = []
    for spec in file.axes:
        name = spec.name or spec.key
        if not name:
            raise UserError(f"{path}: an axis needs a key or a name")
        if not spec.values:
            raise UserError(f"{path}: axis {name!r} has no values")
        values = [_axis_value(path, spec, value) for value in spec.values]
        for value in values:
            _check_value(path, name, value)
        labels = [value.label for value in values]
        if len(set(labels)) != len(labels):
            raise UserError(f"{path}: axis {name!r} has repeated labels: {labels}")
        axes.append(Axis(name, spec.key, values))
    if len({axis.name for axis in axes}) != len(axes):
        raise UserError(f"{path}: two axes have the same name")
    return Study(path, file, axes)

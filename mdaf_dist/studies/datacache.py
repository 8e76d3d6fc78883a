"""Prepared data shared by a study's cells: each distinct prepare config is prepared once.

The key of a prepared directory is a hash of the resolved `prepare` config (everything but its
output path and how it runs: workers, memory budget, partitions) and model.history_length (the
clicks the category filter looks at), so cells that differ only in model, training settings, seed or world size share
one directory, and a change to any prepare setting (filter, fraction, history length, input)
gets its own. A directory counts as prepared once its meta.json exists (`mdaf prepare` writes
it last); an interrupted prepare is redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from mdaf_dist.config import Config, to_dict
from mdaf_dist.data.layout import META_FILE
from mdaf_dist.data.prepare import RUN_SETTINGS, prepare
from mdaf_dist.data.synth import generate
from mdaf_dist.errors import UserError
from mdaf_dist.studies.common import common_config
from mdaf_dist.studies.grid import Plan
from mdaf_dist.studies.spec import SynthSpec
from mdaf_dist.studies.workdir import LOG_FILE, StudyDir


def prepare_key(cfg: Config) -> str:
    settings = {k: v for k, v in to_dict(cfg.prepare).items() if k not in RUN_SETTINGS}
    settings["history_length"] = cfg.model.history_length
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def synth_path(study_dir: StudyDir, synth: SynthSpec) -> Path:
    return study_dir.input / f"synth-{synth.rows}-seed{synth.seed}.csv"


def synth_input(study_dir: StudyDir, synth: SynthSpec) -> Path:
    """The study's synthetic input CSV, generated on first use."""
    path = synth_path(study_dir, synth)
    if not path.is_file():
        partial = path.with_suffix(".partial.csv")
        generate(str(partial), synth.rows, seed=synth.seed, users=synth.users, items=synth.items, categories=synth.categories, progress=False)
        partial.replace(path)
        study_dir.log(f"synth {path.name}: {synth.rows} rows")
    return path


def with_input(cfg: Config, input_path: Optional[Path]) -> Config:
    """`cfg` reading the study's synthetic input, if it has one; an input is required."""
    if input_path is not None:
        cfg = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, input=str(input_path)))
    if not cfg.prepare.input:
        raise UserError("the study has no input data: pass prepare.input=PATH (raw UserBehavior CSV or zip), or give the study file a synth section")
    return cfg


def check_input(plan: Plan) -> None:
    """Fail before anything is written when the study has neither an input nor `synth`."""
    if plan.study.file.synth is None:
        for cell in plan.cells:
            with_input(cell.config, None)


def ensure_prepared(study_dir: StudyDir, cfg: Config) -> Path:
    """The prepared directory for `cfg`, running `mdaf prepare` into it unless it exists; the
    stage table goes to the study log."""
    key = prepare_key(cfg)
    out = study_dir.data(key)
    if (out / META_FILE).is_file():
        study_dir.log(f"reuse prepared data {key}")
        return out
    data = cfg.prepare
    study_dir.log(f"prepare data {key}: input={data.input} category_filter={data.category_filter} "
                  f"drop_empty_history={data.drop_empty_history} user_fraction={data.user_fraction:g}")
    with open(study_dir.root / LOG_FILE, "a") as log, contextlib.redirect_stdout(log):
        prepare(dataclasses.replace(data, out=str(out)), cfg.model.history_length, progress=False)
    return out


def prepare_cells(plan: Plan, study_dir: StudyDir, create: bool = True) -> Tuple[Dict[str, Union[Path, str]], Union[Path, str]]:
    """Per cell, its prepared directory, and the common evaluation set's (studies.common):
    prepared now unless it exists (only its path with create=False), or, as a string, the error
    that kept it from being prepared."""
    synth = plan.study.file.synth
    input_path = None
    if synth is not None:
        input_path = synth_input(study_dir, synth) if create else synth_path(study_dir, synth)
    prepared: Dict[str, Union[Path, str]] = {}

    def directory(cfg: Config) -> Union[Path, str]:
        cfg = with_input(cfg, input_path)
        key = prepare_key(cfg)
        if key not in prepared:
            try:
                prepared[key] = ensure_prepared(study_dir, cfg) if create else study_dir.data(key)
            except Exception as e:  # noqa: BLE001 - recorded for the cells that needed it
                prepared[key] = f"prepare failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                study_dir.log(f"{prepared[key]} (data {key})")
        return prepared[key]

    return {cell.id: directory(cell.config) for cell in plan.cells}, directory(common_config(plan))

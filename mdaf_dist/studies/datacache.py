"""Prepared data shared by a study's cells: each distinct prepare config is prepared once.

The key of a prepared directory is a hash of the resolved `prepare` config (everything but its
output path and how it runs: workers, memory budget, partitions), so cells that differ only in model, training settings, seed or world size share
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

from mdaf_dist.config import PrepareConfig, to_dict
from mdaf_dist.data.layout import META_FILE
from mdaf_dist.data.prepare import RUN_SETTINGS, prepare
from mdaf_dist.data.synth import generate
from mdaf_dist.errors import UserError
from mdaf_dist.studies.common import common_prepare
from mdaf_dist.studies.grid import Plan
from mdaf_dist.studies.spec import SynthSpec
from mdaf_dist.studies.workdir import LOG_FILE, StudyDir


def prepare_key(cfg: PrepareConfig) -> str:
    settings = {k: v for k, v in to_dict(cfg).items() if k not in RUN_SETTINGS}
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


def with_input(cfg: PrepareConfig, input_path: Optional[Path]) -> PrepareConfig:
    """`cfg` reading the study's synthetic input, if it has one; an input is required."""
    if input_path is not None:
        cfg = dataclasses.replace(cfg, input=str(input_path))
    if not cfg.input:
        raise UserError("the study has no input data: pass prepare.input=PATH (raw UserBehavior CSV or zip), or give the study file a synth section")
    return cfg


def check_input(plan: Plan) -> None:
    """Fail before anything is written when the study has neither an input nor `synth`."""
    if plan.study.file.synth is None:
        for cell in plan.cells:
            with_input(cell.config.prepare, None)


def ensure_prepared(study_dir: StudyDir, cfg: PrepareConfig) -> Path:
    """The prepared directory for `cfg`, running `mdaf prepare` into it unless it exists; the
    stage table goes to the study log."""
    key = prepare_key(cfg)
    out = study_dir.data(key)
    if (out / META_FILE).is_file():
        study_dir.log(f"reuse prepared data {key}")
        return out
    study_dir.log(f"prepare data {key}: input={cfg.input} category_filter={cfg.category_filter} "
                  f"drop_empty_history={cfg.drop_empty_history} user_fraction={cfg.user_fraction:g}")
    with open(study_dir.root / LOG_FILE, "a") as log, contextlib.redirect_stdout(log):
        prepare(dataclasses.replace(cfg, out=str(out)), progress=False)
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

    def directory(cfg: PrepareConfig) -> Union[Path, str]:
        cfg = with_input(cfg, input_path)
        key = prepare_key(cfg)
        if key not in prepared:
            try:
                prepared[key] = ensure_prepared(study_dir, cfg) if create else study_dir.data(key)
            except Exception as e:  # noqa: BLE001 - recorded for the cells that needed it
                prepared[key] = f"prepare failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                study_dir.log(f"{prepared[key]} (data {key})")
        return prepared[key]

    return {cell.id: directory(cell.config.prepare) for cell in plan.cells}, directory(common_prepare(plan))

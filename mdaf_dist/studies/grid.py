"""A study's cells: one training run per point of the grid and seed, each with its resolved config.

`product` trains every combination of the axes' values; `one_at_a_time` (Table A1) moves one axis
at a time away from the base config, so a value equal to the base (the paper's setting) is the
shared `base` cell rather than a run per axis. Every cell's config is resolved here, before
anything runs, so a bad setting fails the study at once.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

from mdaf_dist.config import Config, load_config, to_dict
from mdaf_dist.errors import UserError
from mdaf_dist.studies.spec import LAUNCH_KEYS, AxisValue, Study, check_launch

BASE = "base"


@dataclass
class Cell:
    """One training run: a TorchX job of nnodes x nproc_per_node ranks on `config`."""

    id: str
    # axis name -> value label (the cell's place in the report's tables); {} for the base cell
    coords: Dict[str, str]
    seed: int
    config: Config
    nnodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass
class Point:
    """A place in the report: axis coordinates and seed -> the cell that measures it."""

    coords: Dict[str, str]
    seed: int
    cell_id: str


@dataclass
class Plan:
    study: Study
    overrides: List[str]
    cells: List[Cell] = field(default_factory=list)
    points: List[Point] = field(default_factory=list)


def slug(text: str) -> str:
    """Lower-case letters, digits and '-': safe in paths and in every scheduler's job names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _cell_id(coords: Dict[str, str], seed: int) -> str:
    parts = [f"{slug(axis)}-{slug(label)}" for axis, label in coords.items()] or [BASE]
    return "_".join([*parts, f"seed-{seed}"])


def _signature(config: Config, launch: Dict[str, int]) -> str:
    return json.dumps({"config": to_dict(config), "launch": launch}, sort_keys=True, default=str)


def shared_overrides(study: Study, overrides: Sequence[str]) -> List[str]:
    """The settings of every cell: the study file's overrides, then the command line's."""
    return [*study.file.overrides, *(o for o in overrides if o.split("=", 1)[0] not in LAUNCH_KEYS)]


def expand(study: Study, overrides: Sequence[str] = ()) -> Plan:
    """Every cell of the study with its config (base files, the study's and the command line's
    overrides, the values' files and settings, the seed), and every report point."""
    spec = study.file
    plan = Plan(study, list(overrides))
    shared = shared_overrides(study, overrides)
    command_line_launch = {}
    for override in overrides:
        key, _, text = override.partition("=")
        if key in LAUNCH_KEYS:
            value = int(text) if text.isdigit() else text
            command_line_launch[LAUNCH_KEYS[key]] = check_launch("command line", key, value)

    def resolve(values: Sequence[AxisValue], seed: int) -> tuple[Config, Dict[str, int]]:
        configs = [*spec.configs, *(c for v in values for c in v.configs)]
        settings = [o for v in values for o in v.overrides()]
        launch: Dict[str, int] = {"nnodes": spec.nnodes, "nproc_per_node": spec.world_size, **command_line_launch}
        for value in values:
            launch.update(value.launch())
        return load_config(configs, [*shared, *settings, f"train.seed={seed}", f"loader.seed={seed}"]), launch

    by_signature: Dict[str, Cell] = {}

    def add(coords: Dict[str, str], values: Sequence[AxisValue], seed: int, base_signature: str = "") -> None:
        config, launch = resolve(values, seed)
        signature = _signature(config, launch)
        if signature not in by_signature:
            cell_coords = {} if signature == base_signature else coords
            cell = Cell(_cell_id(cell_coords, seed), cell_coords, seed, config, launch["nnodes"], launch["nproc_per_node"])
            if any(other.id == cell.id for other in plan.cells):
                raise UserError(f"{study.path}: two cells would be named {cell.id!r}: give their values labels that differ in letters or digits")
            by_signature[signature] = cell
            plan.cells.append(cell)
        plan.points.append(Point(coords, seed, by_signature[signature].id))

    for seed in spec.seeds:
        if spec.grid == "product":
            for combo in itertools.product(*(axis.values for axis in study.axes)):
                add({axis.name: value.label for axis, value in zip(study.axes, combo)}, combo, seed)
        else:
            base_signature = _signature(*resolve([], seed))
            add({}, [], seed, base_signature)
            for axis in study.axes:
                for value in axis.values:
                    add({axis.name: value.label}, [value], seed, base_signature)
    return plan


def plan_record(plan: Plan) -> Dict[str, Any]:
    """What the report needs of the plan, kept in the study directory (JSON)."""
    spec = plan.study.file
    return {
        "name": spec.name,
        "title": spec.title,
        "study_file": plan.study.path,
        "overrides": plan.overrides,
        "grid": spec.grid,
        "axes": [{"name": axis.name, "key": axis.key, "labels": [v.label for v in axis.values]} for axis in plan.study.axes],
        "seeds": list(spec.seeds),
        "report": to_dict(spec.report),
        "cells": [
            {"id": c.id, "coords": c.coords, "seed": c.seed, "nnodes": c.nnodes, "nproc_per_node": c.nproc_per_node}
            for c in plan.cells
        ],
        "points": [{"coords": p.coords, "seed": p.seed, "cell": p.cell_id} for p in plan.points],
    }

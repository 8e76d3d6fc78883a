"""OptFusion (OptFusion_paper.md 3): which component feeds which (connections, alpha) and how a
component's inputs are combined (operations, beta), learned in one shot, then fixed for a re-train
(Algorithm 1).

The search space is a DAG of nodes in levels: the inputs (level 0), components (levels 1..), and
the output. Every component and the output is a fusion point whose candidate inputs are all nodes
of lower levels (eq. 5); its input is (eq. 13)

    e_hat_j = sum_o p_j^o o({S(alpha_ij) e_i}),  p_j = softmax(beta_j) (eq. 12),

with S the unit step forward and the identity backward (straight-through, 3.2), alpha initialised
at 0.5 (4.1.4: every connection on) and beta at 0 (every operation equal). The operations
(Table 1), on inputs x_i in R^d:

    add     sum_i x_i
    prod    prod_i x_i (Hadamard)
    concat  W [x_1; ...; x_k] + b, W in R^{d x kd}
    att     sum_i a_i x_i, a = softmax_i(w_2 . ReLU(W_1 x_i + b_1))

One departure: eq. 13 multiplies a disconnected input by 0, which for prod zeroes the whole
product; here a disconnected input enters prod as the factor 1 (left out), which is what
DISCONNECTED means in every other operation.

Two uses: MDAF's fusion (`model.fusion=optfusion`), whose inputs are the two branch
outputs and whose only fusion point is the output (the branches' layers are not vectors of one
width: LCN's are 3D wide, Mamba's are sequences); and the static branch
(`model.static_branch=optfusion`), the paper's own model on x_0: an auxiliary cross component S0
(4.1.4; one input, so no operation to choose), then n levels of one cross component (DCNv3's LCN layer x_0 * (W x + b) + x, full rank
as the paper's CrossNetV2 variant, Table 6) and one deep component (ReLU layer of width 3D,
4.1.4), all fused into the output, projected to D and layer-normed like the other static
branches.

Stages (`model.optfusion_stage`): in "search", alpha and beta are parameters trained by their
own Adam (`model.optfusion_search_lr`, train/optim.py) on the same batches as the model (the authors'
code steps both optimizers on each batch); the trainer writes the selection (`architecture`) to
ARCHITECTURE_FILE. In "retrain" the selection is read back (OptFusion-Hard, 3.4.2: alpha* =
1[alpha > 0], one operation per point, the largest beta): the connections are a constant buffer,
each point builds only its operation, and only Theta is trained, from scratch. "search_retrain"
runs both (`stages`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mdaf_dist.config import Config, ConfigError, ModelConfig
from mdaf_dist.files import read_json

OPERATIONS = ("add", "prod", "concat", "att")
ARCHITECTURE_FILE = "optfusion_architecture.json"
# where `search_retrain` runs its search stage, under the run's output_dir
SEARCH_DIR = "search"
OUTPUT = "output"
# an architecture parameter carries its Adam's learning rate (train/optim.py gives it its own)
ARCHITECTURE_LR = "_architecture_lr"
ALPHA_INIT = 0.5

Architecture = Dict[str, Dict[str, Any]]


class StraightThrough(torch.autograd.Function):
    """S(alpha) (3.2): 1 where alpha > 0, else 0; the gradient passes unchanged."""

    @staticmethod
    def forward(ctx: Any, alpha: torch.Tensor) -> torch.Tensor:
        return (alpha > 0).to(alpha.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class AttentionPooling(nn.Module):
    """ATT (Table 1): a_i = softmax_i(w_2 . ReLU(W_1 x_i + b_1)), out = sum_i a_i x_i."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, k, d]
        return (torch.softmax(self.score(x), dim=1) * x).sum(dim=1)


class FusionPoint(nn.Module):
    """The input of one component: the operations of `operations` on its candidate inputs
    (each multiplied by its connection, 0 or 1), weighted by `weights` (eq. 13)."""

    def __init__(self, num_inputs: int, dim: int, operations: Sequence[str]):
        super().__init__()
        self.operations = tuple(operations)
        self.concat = nn.Linear(num_inputs * dim, dim) if "concat" in operations else None
        self.att = AttentionPooling(dim) if "att" in operations else None

    def forward(self, inputs: List[torch.Tensor], connected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = torch.stack(inputs, dim=1) * connected[:, None]  # [B, k, d]
        fused = 0
        for weight, operation in zip(weights, self.operations):
            if operation == "add":
                out = x.sum(dim=1)
            elif operation == "prod":
                out = (x + (1 - connected)[:, None]).prod(dim=1)
            elif operation == "concat":
                out = self.concat(x.flatten(1))
            else:
                out = self.att(x)
            fused = fused + weight * out
        return fused


class CrossComponent(nn.Module):
    """An explicit component: DCNv3's LCN layer, x_0 * (W x + b) + x."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DeepComponent(nn.Module):
    """An implicit component: one ReLU layer of the input's width; takes x_0 only to share the
    cross component's signature."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class FusionSearchSpace(nn.Module):
    """The DAG: `inputs` name the level-0 nodes (the first is x_0 of the cross components),
    `levels` the components of each further level, then the output. `architecture` is the
    selection to re-train (this space's entry of ARCHITECTURE_FILE); None searches."""

    def __init__(self, name: str, inputs: Sequence[str], levels: Sequence[Sequence[Tuple[str, nn.Module]]], dim: int, lr: float,
                 architecture: Optional[Architecture] = None):
        super().__init__()
        self.name, self.inputs = name, list(inputs)
        self.levels = nn.ModuleList(nn.ModuleDict(level) for level in levels)
        self.candidates: Dict[str, List[str]] = {}
        below = list(inputs)
        for level in levels:
            for point, _ in level:
                self.candidates[point] = list(below)
            below += [point for point, _ in level]
        self.candidates[OUTPUT] = below
        self.searching = architecture is None
        if self.searching:
            # a point of one candidate (S0) has nothing to fuse: it is connected or not, with no
            # operation to choose (nor has the authors' S0); its input is that candidate (add)
            operations = {p: OPERATIONS if len(c) > 1 else ("add",) for p, c in self.candidates.items()}
            self.alpha = nn.ParameterDict({p: nn.Parameter(torch.full((len(c),), ALPHA_INIT)) for p, c in self.candidates.items()})
            self.beta = nn.ParameterDict({p: nn.Parameter(torch.zeros(len(OPERATIONS))) for p, ops in operations.items() if len(ops) > 1})
            for parameter in [*self.alpha.values(), *self.beta.values()]:
                setattr(parameter, ARCHITECTURE_LR, lr)
        else:
            selected = self._check(architecture)
            operations = {p: (selected[p]["operation"],) for p in self.candidates}
            for p, c in self.candidates.items():
                mask = torch.tensor([float(i in selected[p]["inputs"]) for i in c])
                self.register_buffer(f"connected_{p}", mask, persistent=False)
        self.points = nn.ModuleDict({p: FusionPoint(len(c), dim, operations[p]) for p, c in self.candidates.items()})

    def _check(self, architecture: Architecture) -> Architecture:
        """The selection, if it fits this space; else one line saying what differs."""
        where = f"model.optfusion_architecture: the {self.name!r} search space"
        if set(architecture) != set(self.candidates):
            raise ConfigError(f"{where} has fusion points {sorted(self.candidates)}, the file {sorted(architecture)}")
        for point, chosen in architecture.items():
            if chosen.get("operation") not in OPERATIONS or not set(chosen.get("inputs", [None])) <= set(self.candidates[point]):
                raise ConfigError(f"{where}: point {point!r} must name one operation of {OPERATIONS} and inputs among {self.candidates[point]}, got {chosen}")
        return architecture

    def _connections(self, point: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.searching:
            connected = StraightThrough.apply(self.alpha[point])
            return connected, torch.softmax(self.beta[point], dim=0) if point in self.beta else connected.new_ones(1)
        connected = getattr(self, f"connected_{point}")
        return connected, connected.new_ones(1)

    def _fuse(self, point: str, nodes: Dict[str, torch.Tensor]) -> torch.Tensor:
        connected, weights = self._connections(point)
        return self.points[point]([nodes[c] for c in self.candidates[point]], connected, weights)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        nodes = dict(zip(self.inputs, inputs))
        for level in self.levels:
            # a level's components read only lower levels: fuse them all before adding their outputs
            outputs = {point: component(self._fuse(point, nodes), inputs[0]) for point, component in level.items()}
            nodes.update(outputs)
        return self._fuse(OUTPUT, nodes)

    @torch.no_grad()
    def architecture(self) -> Architecture:
        """The selection of the search (3.4.2, Hard): per fusion point the inputs with alpha > 0
        and the operation of the largest beta; for the record, alpha of each candidate and
        softmax(beta)."""
        selected = {}
        for point, candidates in self.candidates.items():
            alpha = self.alpha[point].tolist()
            operations = self.points[point].operations
            weights = torch.softmax(self.beta[point], dim=0).tolist() if point in self.beta else [1.0]
            selected[point] = {
                "inputs": [c for c, a in zip(candidates, alpha) if a > 0],
                "operation": operations[max(range(len(operations)), key=weights.__getitem__)],
                "candidates": candidates,
                "alpha": alpha,
                "operation_weights": dict(zip(operations, weights)),
            }
        return selected


class OptFusionFusion(nn.Module):
    """`model.fusion=optfusion`: h = the output fusion point over h_static and h_seq (the fusion
    interface of fusion.py; no gate)."""

    def __init__(self, dim: int, lr: float, architecture: Optional[Architecture] = None):
        super().__init__()
        self.out_dim = dim
        self.space = FusionSearchSpace("fusion", ["h_static", "h_seq"], [], dim, lr, architecture)

    def forward(self, h_static: torch.Tensor, h_seq: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return self.space([h_static, h_seq]), None


class OptFusionStatic(nn.Module):
    """`model.static_branch=optfusion`: the cross and deep components on x_0 (3D) with searched
    fusion (the module docstring), then h_static = LayerNorm(Linear(output)) in R^D."""

    def __init__(self, in_dim: int, out_dim: int, num_layers: int, dropout: float, lr: float, architecture: Optional[Architecture] = None):
        super().__init__()
        levels = [[("S0", CrossComponent(in_dim))]] + [
            [(f"C{i}", CrossComponent(in_dim)), (f"D{i}", DeepComponent(in_dim, dropout))] for i in range(1, num_layers + 1)
        ]
        self.space = FusionSearchSpace("static_branch", ["x0"], levels, in_dim, lr, architecture)
        self.project = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.norm(self.project(self.space([x0])))


def selected_architecture(cfg: ModelConfig) -> Optional[Dict[str, Architecture]]:
    """The selection a re-train reads (every search space's, by name); None when searching."""
    if cfg.optfusion_stage != "retrain":
        return None
    path = cfg.optfusion_architecture
    if not path:
        raise ConfigError("model.optfusion_stage=retrain needs model.optfusion_architecture: the search run's " + ARCHITECTURE_FILE)
    selection = read_json(path, f"OptFusion's selected architecture ({ARCHITECTURE_FILE} of a search run)")
    if not isinstance(selection, dict) or not all(isinstance(space, dict) for space in selection.values()):
        raise ConfigError(f"{path}: not an OptFusion architecture (a mapping of search spaces to fusion points)")
    return selection


def space_architecture(selection: Optional[Dict[str, Architecture]], name: str) -> Optional[Architecture]:
    """One search space's entry of a selection; a selection without it is one line."""
    if selection is None:
        return None
    if name not in selection:
        raise ConfigError(f"model.optfusion_architecture has no {name!r} search space (it has {sorted(selection)}): it was searched with another model")
    return selection[name]


def searched_architecture(model: nn.Module) -> Optional[Dict[str, Architecture]]:
    """The current selection of every search space in `model` (sharded or not); None when it
    has none that searches."""
    spaces = {m.name: m.architecture() for m in model.modules() if isinstance(m, FusionSearchSpace) and m.searching}
    return spaces or None


def describe_architecture(selection: Dict[str, Architecture]) -> List[str]:
    """One line per fusion point: `space.point = operation(inputs)`."""
    return [f"{space}.{point} = {chosen['operation']}({', '.join(chosen['inputs'])})" for space, points in selection.items() for point, chosen in points.items()]


def run_architecture(model: ModelConfig, run_dir: Path) -> Optional[Path]:
    """Where the selection of a run of `model` in `run_dir` is: written by its search, or read by
    its re-train; None for a model without OptFusion."""
    if "optfusion" not in (model.fusion, model.static_branch):
        return None
    if model.optfusion_stage == "retrain":
        return Path(model.optfusion_architecture) if model.optfusion_architecture else None
    return run_dir / (SEARCH_DIR if model.optfusion_stage == "search_retrain" else "") / ARCHITECTURE_FILE


def stages(cfg: Config) -> List[Config]:
    """The training runs `cfg` asks for: itself, or for search_retrain the search (in
    <output_dir>/search) and then the re-train of its selection (in output_dir)."""
    if cfg.model.optfusion_stage != "search_retrain":
        return [cfg]
    search_dir = Path(cfg.output_dir) / SEARCH_DIR
    search = dataclasses.replace(cfg, output_dir=str(search_dir), model=dataclasses.replace(cfg.model, optfusion_stage="search"))
    retrain_model = dataclasses.replace(cfg.model, optfusion_stage="retrain", optfusion_architecture=str(search_dir / ARCHITECTURE_FILE))
    return [search, dataclasses.replace(cfg, model=retrain_model)]

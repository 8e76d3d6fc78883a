"""OptFusion (models/optfusion.py): the operations against written-out formulas, the
straight-through step, shapes and gradients, a selection that is a valid architecture, a planted
product selected as PROD, and the two stages through the trainer: the search writes its
selection, the re-train reads it and trains only Theta."""

import dataclasses
import json

import pytest
import torch

from mdaf_dist import cli
from mdaf_dist.config import ConfigError, ModelConfig
from mdaf_dist.distributed.env import distributed
from mdaf_dist.models.optfusion import (
    ARCHITECTURE_FILE,
    OPERATIONS,
    SEARCH_DIR,
    FusionPoint,
    OptFusionFusion,
    OptFusionStatic,
    StraightThrough,
    searched_architecture,
)
from mdaf_dist.models.registry import build_model
from mdaf_dist.train.optim import architecture_parameters
from mdaf_dist.train.trainer import Trainer
from tests.distributed import prepare_tiny_data, tiny_config

VOCAB = {"user": 40, "item": 200, "category": 11}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny"))


def _inputs(batch=5, dim=4, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_each_operation_equals_its_formula_on_the_connected_inputs(operation):
    x1, x2, x3 = _inputs()
    torch.manual_seed(0)
    point = FusionPoint(3, 4, [operation])
    out = point([x1, x2, x3], torch.tensor([1.0, 0.0, 1.0]), torch.ones(1))
    if operation == "add":
        expected = x1 + x3
    elif operation == "prod":
        expected = x1 * x3
    elif operation == "concat":
        expected = torch.cat([x1, torch.zeros_like(x2), x3], dim=-1) @ point.concat.weight.T + point.concat.bias
    else:
        linear1, linear2 = point.att.score[0], point.att.score[2]
        scores = torch.stack([torch.relu(x @ linear1.weight.T + linear1.bias) @ linear2.weight[0] for x in (x1, torch.zeros_like(x2), x3)], dim=1)
        a = torch.exp(scores) / torch.exp(scores).sum(dim=1, keepdim=True)
        expected = a[:, :1] * x1 + a[:, 2:] * x3
    torch.testing.assert_close(out, expected)


def test_search_point_weights_the_operations_by_its_softmax():
    x1, x2 = _inputs(count=2)
    torch.manual_seed(0)
    point = FusionPoint(2, 4, OPERATIONS)
    connected, weights = torch.ones(2), torch.softmax(torch.tensor([0.1, -0.3, 0.7, 0.2]), dim=0)
    singles = [point([x1, x2], connected, torch.eye(4)[i]) for i in range(4)]
    torch.testing.assert_close(point([x1, x2], connected, weights), sum(w * s for w, s in zip(weights, singles)))


def test_straight_through_is_a_step_forward_and_the_identity_backward():
    alpha = torch.tensor([-0.2, 0.0, 0.3], requires_grad=True)
    mask = StraightThrough.apply(alpha)
    assert mask.tolist() == [0.0, 0.0, 1.0]
    (mask * torch.tensor([2.0, 3.0, 4.0])).sum().backward()
    assert alpha.grad.tolist() == [2.0, 3.0, 4.0]


def test_shapes_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    fusion, static = OptFusionFusion(8, 1e-3), OptFusionStatic(12, 8, num_layers=2, dropout=0.0, lr=1e-3)
    h, gate = fusion(*_inputs(dim=8, count=2))
    assert h.shape == (5, 8) and gate is None
    h_static = static(_inputs(dim=12, count=1)[0])
    assert h_static.shape == (5, 8)
    (h.sum() + h_static.pow(2).sum()).backward()
    for module in (fusion, static):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_static_space_candidates_are_the_lower_levels():
    space = OptFusionStatic(12, 8, num_layers=2, dropout=0.0, lr=1e-3).space
    assert space.candidates == {
        "S0": ["x0"],
        "C1": ["x0", "S0"], "D1": ["x0", "S0"],
        "C2": ["x0", "S0", "C1", "D1"], "D2": ["x0", "S0", "C1", "D1"],
        "output": ["x0", "S0", "C1", "D1", "C2", "D2"],
    }  # fmt: skip


def test_a_planted_product_is_selected_as_prod():
    """The target is h_static * h_seq: no mixture of add, concat (linear) or attention (a convex
    combination of the inputs) fits it, so beta must move to PROD."""
    torch.manual_seed(0)
    fusion = OptFusionFusion(8, lr=0.05)
    architecture = list(architecture_parameters(fusion).values())
    theta = [p for p in fusion.parameters() if all(p is not a for a in architecture)]
    optimizers = [torch.optim.Adam(theta, lr=0.01), torch.optim.Adam(architecture, lr=0.05)]
    for step in range(150):
        h_static, h_seq = _inputs(batch=64, dim=8, count=2, seed=step)
        loss = (fusion(h_static, h_seq)[0] - h_static * h_seq).pow(2).mean()
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    selection = searched_architecture(fusion)["fusion"]["output"]
    assert selection["operation"] == "prod", selection
    assert selection["operation_weights"]["prod"] > 0.9
    assert selection["inputs"] == ["h_static", "h_seq"]


def test_a_retrained_point_computes_only_its_selection():
    h_static, h_seq = _inputs(count=2)
    fusion = OptFusionFusion(4, 1e-3, {"output": {"inputs": ["h_static", "h_seq"], "operation": "prod"}})
    assert list(fusion.parameters()) == []
    torch.testing.assert_close(fusion(h_static, h_seq)[0], h_static * h_seq)
    only_seq = OptFusionFusion(4, 1e-3, {"output": {"inputs": ["h_seq"], "operation": "prod"}})
    torch.testing.assert_close(only_seq(h_static, h_seq)[0], h_seq)


def test_retrain_settings_that_cannot_work_are_one_line(tmp_path):
    cfg = ModelConfig(embedding_dim=8, d_state=4, fusion="optfusion", optfusion_stage="retrain")
    with pytest.raises(ConfigError, match=r"^model.optfusion_stage=retrain needs model.optfusion_architecture: the search run's optfusion_architecture.json$"):
        build_model(cfg, VOCAB, embedding_backend="plain")
    path = tmp_path / ARCHITECTURE_FILE
    path.write_text(json.dumps({"fusion": {"output": {"inputs": ["h_static"], "operation": "add"}}}))
    other = ModelConfig(embedding_dim=8, d_state=4, static_branch="optfusion", optfusion_stage="retrain", optfusion_architecture=str(path))
    with pytest.raises(ConfigError, match=r"^model.optfusion_architecture has no 'static_branch' search space \(it has \['fusion'\]\): it was searched with another model$"):
        build_model(other, VOCAB, embedding_backend="plain")
    path.write_text(json.dumps({"fusion": {"output": {"inputs": ["h_item"], "operation": "add"}}}))
    with pytest.raises(ConfigError, match=r"^model.optfusion_architecture: the 'fusion' search space: point 'output' must name one operation"):
        build_model(dataclasses.replace(cfg, optfusion_architecture=str(path)), VOCAB, embedding_backend="plain")


def _architecture_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "alpha" in name or "beta" in name}


def test_search_then_retrain_through_the_trainer(data_dir, tmp_path):
    """Search: alpha and beta have their own optimizer and move; the selection is written beside
    the checkpoints. Re-train: the model of that selection, no alpha or beta to train, its
    connections unchanged by training."""
    # alpha starts at 0.5: a learning rate of 0.2 lets a few steps cross 0 somewhere
    search_overrides = ["model.fusion=optfusion", "model.static_branch=optfusion", "model.optfusion_layers=1", "model.optfusion_search_lr=0.2", "train.max_steps=6"]
    with distributed("cpu") as env:
        search = Trainer(tiny_config(data_dir, tmp_path / "search", *search_overrides), env, embedding_backend="plain")
        optimizers = dict(search.optimizer.optimizers)
        architecture_ids = {id(p) for p in architecture_parameters(search.model).values()}
        # alpha of: fusion output; S0, C1, D1, static output; beta of all of them but S0 (one input)
        assert len(architecture_ids) == 5 + 4
        assert {id(p) for group in optimizers["architecture"].param_groups for p in group["params"]} == architecture_ids
        assert not architecture_ids & {id(p) for group in optimizers["dense"].param_groups for p in group["params"]}
        before = _architecture_state(search.model)
        search.fit()
    after = _architecture_state(search.model)
    assert all(not torch.equal(before[name], after[name]) for name in before)
    selection = json.loads((tmp_path / "search" / ARCHITECTURE_FILE).read_text())
    assert selection == json.loads(json.dumps(searched_architecture(search.model)))
    checkpoint = sorted((tmp_path / "search" / "checkpoints").glob("step_*"))[-1]
    assert json.loads((checkpoint / ARCHITECTURE_FILE).read_text()) == selection
    for space in selection.values():
        for point in space.values():
            assert point["operation"] in OPERATIONS
            assert point["inputs"] == [name for name, alpha in zip(point["candidates"], point["alpha"]) if alpha > 0]

    retrain_overrides = [*search_overrides, "model.optfusion_stage=retrain", f"model.optfusion_architecture={tmp_path / 'search' / ARCHITECTURE_FILE}"]
    with distributed("cpu") as env:
        retrain = Trainer(tiny_config(data_dir, tmp_path / "retrain", *retrain_overrides), env, embedding_backend="plain")
        assert not architecture_parameters(retrain.model) and "architecture" not in dict(retrain.optimizer.optimizers)
        assert not [name for name, _ in retrain.model.named_parameters() if "alpha" in name or "beta" in name]
        trained = {id(p) for _, optimizer in retrain.optimizer.optimizers for group in optimizer.param_groups for p in group["params"]}
        assert trained == {id(p) for p in retrain.model.parameters()}
        connections = {name: b.clone() for name, b in retrain.model.named_buffers() if "connected_" in name}
        for space_name, space in (("fusion", retrain.model.fusion.space), ("static_branch", retrain.model.static.space)):
            for point, chosen in selection[space_name].items():
                assert space.points[point].operations == (chosen["operation"],)
                assert getattr(space, f"connected_{point}").tolist() == [float(c in chosen["inputs"]) for c in space.candidates[point]]
        retrain.fit()
    assert all(torch.equal(b, connections[name]) for name, b in retrain.model.named_buffers() if name in connections)
    assert not (tmp_path / "retrain" / ARCHITECTURE_FILE).exists()


def test_search_retrain_stage_runs_both_into_one_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train",
        f"data_dir={data_dir}", f"output_dir={out}", "train.device=cpu", "model.embedding_dim=8", "model.history_length=8",
        "model.d_state=4", "loader.batch_size=256", "loader.num_workers=0", "train.max_steps=2",
        "logging.tensorboard=false", "logging.progress_bar=false", "model.fusion=optfusion", "model.optfusion_stage=search_retrain",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "OptFusion architecture:\n  fusion.output = " in printed
    assert (out / SEARCH_DIR / "results.json").is_file() and (out / "results.json").is_file()
    retrain_config = sorted((out / "checkpoints").glob("step_*"))[-1] / "config.yaml"
    assert "optfusion_stage: retrain" in retrain_config.read_text()
    assert f"optfusion_architecture: {out / SEARCH_DIR / ARCHITECTURE_FILE}" in retrain_config.read_text()

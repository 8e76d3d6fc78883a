"""Scoring a checkpoint builds the model and nothing of training: `mdaf evaluate` and `mdaf
predict` construct no optimizer and allocate no table optimizer state, and they reproduce the
metrics the trainer recorded with the checkpoint."""

from __future__ import annotations

import pytest
import torch

from mdaf_dist.analysis.predict import predict
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import distributed
from mdaf_dist.train import evaluate as evaluate_module
from mdaf_dist.train.evaluate import checkpoint_config, evaluate_checkpoint, resolve_checkpoint
from mdaf_dist.train.trainer import Trainer
from tests.distributed import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    with distributed("cpu") as env:
        Trainer(tiny_config(tiny_data_dir, root / "run", "train.max_steps=4"), env).fit()
    return resolve_checkpoint(str(root / "run" / "checkpoints"))


@pytest.fixture
def optimizers_built(monkeypatch):
    """The class of every torch optimizer constructed meanwhile (torchrec's keyed ones included)."""
    built = []
    init = torch.optim.Optimizer.__init__

    def recording(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", recording)
    return built


def _table_optimizer_state(model):
    return {key: value for key, value in model.fused_optimizer.state_dict()["state"].items() if value}


def test_a_scored_model_holds_no_optimizer_state_and_training_one_does(checkpoint, optimizers_built):
    cfg = checkpoint_config(checkpoint)
    with distributed("cpu") as env:
        scored = evaluate_module.load_model(checkpoint, cfg, env)
        assert optimizers_built == [] and _table_optimizer_state(scored) == {}
        trainer = Trainer(cfg, env, save_plan=False)
    # the same check on a training model: AdamW and the tables' row-wise Adagrad state
    assert "AdamW" in optimizers_built
    assert set(_table_optimizer_state(trainer.model)) == {f"embeddings.embeddings.{t}.weight" for t in ("user", "item", "category")}


def test_evaluate_and_predict_build_no_optimizer_and_reproduce_the_recorded_metrics(checkpoint, tmp_path, optimizers_built):
    recorded = ckpt.read_trainer_state(checkpoint)["metrics"]
    evaluated = evaluate_checkpoint(str(checkpoint))
    with distributed("cpu") as env:
        meta = predict(env, checkpoint, str(tmp_path / "p.parquet"))
    assert optimizers_built == []
    for metrics in (evaluated["metrics"], meta["metrics"]):
        assert metrics["num_samples"] == recorded["num_samples"]
        assert metrics["auc"] == pytest.approx(recorded["auc"], abs=1e-12)
        assert metrics["logloss"] == pytest.approx(recorded["logloss"], abs=1e-9)

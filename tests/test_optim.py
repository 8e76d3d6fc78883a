"""The tables' training protocol: their learning rate is train.lr unless train.embedding_lr is set,
the warmup schedules it (in the fused kernel, not only in a param group), and Table A1's lr axis
moves it. Asserted on the fbgemm kernels of a sharded model, which is what the update uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer

from mdaf_dist.config import load_config, to_yaml
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import distributed
from mdaf_dist.errors import UserError
from mdaf_dist.studies.grid import expand
from mdaf_dist.studies.spec import load_study
from mdaf_dist.train.optim import build_optimizer, embedding_lr, linear_warmup
from mdaf_dist.train.build import build_distributed_model
from mdaf_dist.train.trainer import Trainer
from tests.distributed import tiny_config

ROOT = Path(__file__).resolve().parents[1]
VOCAB = {"user": 10, "item": 20, "category": 5}


def kernel_lrs(optimizer: torch.optim.Optimizer) -> list:
    """The learning rate each fused fbgemm kernel will use in its next in-backward update."""
    if isinstance(optimizer, CombinedOptimizer):
        return [lr for _, sub in optimizer.optimizers for lr in kernel_lrs(sub)]
    module = getattr(optimizer, "_emb_module", None)
    return [] if module is None else [module.get_learning_rate()]


def test_embedding_lr_follows_lr_unless_set():
    paper = load_config(str(ROOT / "configs" / "paper.yaml"), ["train.lr=0.003"])
    assert paper.train.embedding_lr is None and embedding_lr(paper.train) == 0.003
    assert embedding_lr(load_config(None, ["train.lr=0.003", "train.embedding_lr=0.05"]).train) == 0.05


def test_tableA1_lr_axis_moves_the_tables_learning_rate():
    plan = expand(load_study(str(ROOT / "configs" / "studies" / "tiny" / "tableA1_sensitivity.yaml")))
    cells = [cell for cell in plan.cells if not cell.coords or "train.lr" in cell.coords]
    seen = {}
    with distributed("cpu") as env:
        for cell in cells:
            model = build_distributed_model(cell.config, VOCAB, env, "torchrec", "rowwise_adagrad", None)
            lrs = kernel_lrs(build_optimizer(model, cell.config.train, "rowwise_adagrad"))
            assert lrs and lrs == pytest.approx([cell.config.train.lr] * len(lrs))
            seen[cell.config.train.lr] = lrs[0]
    assert sorted(seen) == [0.0001, 0.0005, 0.001]


def test_warmup_schedules_the_fused_tables_lr():
    cfg = load_config([str(ROOT / "configs" / "paper.yaml"), str(ROOT / "configs" / "studies" / "tiny" / "base_config.yaml")], ["train.embedding_lr=0.04"])
    with distributed("cpu") as env:
        model = build_distributed_model(cfg, VOCAB, env, "torchrec", "rowwise_adagrad", None)
        optimizer = build_optimizer(model, cfg.train, "rowwise_adagrad")
        scheduler = linear_warmup(optimizer, 4)
        for step in range(6):
            optimizer.zero_grad()
            assert kernel_lrs(optimizer) == pytest.approx([0.04 * min(1.0, (step + 1) / 4)] * 2)
            optimizer.step()
            scheduler.step()


def _table_update(cfg) -> dict:
    """Each table's change in one training step on the first batch."""
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env, save_plan=False)
        batch = next(iter(trainer.train_loader))

        def tables():
            return {k: v.local_shards()[0].tensor.clone() for k, v in trainer.model.state_dict().items() if k.startswith("embeddings.")}

        before = tables()
        trainer.train_step(batch)
        return {k: v - before[k] for k, v in tables().items()}


def test_first_step_of_a_warmup_moves_the_tables_by_its_fraction_of_the_lr(tiny_data_dir, tmp_path):
    # row-wise Adagrad's first update is lr * g / sqrt(mean g^2): linear in the lr
    full = _table_update(tiny_config(tiny_data_dir, tmp_path / "a", "train.warmup_steps=1"))
    quarter = _table_update(tiny_config(tiny_data_dir, tmp_path / "b", "train.warmup_steps=4"))
    for name, delta in full.items():
        assert delta.abs().sum() > 0
        torch.testing.assert_close(quarter[name], delta / 4, rtol=1e-4, atol=1e-7)


def test_checkpoint_with_the_tables_lr_spelled_out_resumes_under_the_default(tmp_path):
    """A checkpoint that wrote embedding_lr equal to lr is the run an unset embedding_lr makes."""
    (tmp_path / ckpt.CONFIG_FILE).write_text(to_yaml(load_config(None, ["train.lr=0.0005", "train.embedding_lr=0.0005"])))
    (tmp_path / ckpt.TRAINER_FILE).write_text("{}")
    ckpt.check_compatible(tmp_path, load_config(None, ["train.lr=0.0005"]), VOCAB)
    with pytest.raises(UserError, match=r"other settings: train.lr=0.001 \(checkpoint: 0.0005\); train.embedding_lr=0.001 \(checkpoint: 0.0005\)$"):
        ckpt.check_compatible(tmp_path, load_config(None, ["train.lr=0.001"]), VOCAB)

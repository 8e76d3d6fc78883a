"""Checkpoints: stop + resume equals an uninterrupted run bit for bit (mid-epoch, dropout on, the
epochs' train AUC included); a save killed before its rename leaves the previous checkpoint
loadable; rank files are loaded without unpickling objects; a checkpoint of other settings is
refused naming them; a 2-rank checkpoint evaluates on 2 ranks (printed once) and on 1 (the run's
files untouched) and resumes on 1 rank, restarting its epoch with a warning."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import distributed
from mdaf_dist.errors import UserError
from mdaf_dist.distributed.sharding import PLAN_JSON
from mdaf_dist.data.loader import num_samples
from mdaf_dist.train import evaluate
from mdaf_dist.train import trainer as trainer_module
from mdaf_dist.train.logging import RunLogger
from mdaf_dist.train.main import main
from mdaf_dist.train.evaluate import evaluate_checkpoint
from mdaf_dist.train.trainer import Trainer
from tests.distributed import run_ranks, tiny_config

STOP, TOTAL = 3, 6
SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def _local_tensors(model):
    """Parameters and buffers as plain tensors (a ShardedTensor's local shard)."""
    state = {}
    for name, value in model.state_dict().items():
        if hasattr(value, "local_shards"):
            value = value.local_shards()[0].tensor
        if isinstance(value, torch.Tensor):
            state[name] = value.detach().clone()
    return state


def _fit(cfg):
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        trainer.fit()
        params = _local_tensors(trainer.model)
        return trainer.step_losses, params, trainer.state.step


def test_stop_and_resume_equals_uninterrupted(tiny_data_dir, tmp_path):
    losses, params, _ = _fit(tiny_config(tiny_data_dir, tmp_path / "whole", f"train.max_steps={TOTAL}"))
    first, _, _ = _fit(tiny_config(tiny_data_dir, tmp_path / "split", f"train.max_steps={STOP}"))
    rest, resumed_params, step = _fit(tiny_config(tiny_data_dir, tmp_path / "split", f"train.max_steps={TOTAL}", "train.resume=auto"))
    assert step == TOTAL
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(losses), rtol=0, atol=1e-6)
    assert resumed_params.keys() == params.keys()
    for name in params:
        torch.testing.assert_close(resumed_params[name], params[name], rtol=0, atol=1e-6, msg=name)


def _fit_results(cfg):
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        return trainer.step_losses, trainer.fit()


def test_resume_mid_epoch_with_dropout_equals_uninterrupted_bit_for_bit(tiny_data_dir, tmp_path):
    """A run killed after step 5 resumes from its step-4 checkpoint (mid-epoch, dropout on): losses,
    final metrics and every evaluation, the epochs' train AUC included, equal the uninterrupted
    run's (the first epoch's train AUC covers steps 1-4 from the checkpoint's rows)."""
    common = ["model.dropout=0.3", "loader.batch_size=256", "train.max_epochs=2", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    losses, whole = _fit_results(tiny_config(tiny_data_dir, tmp_path / "whole", *common))
    first, _ = _fit_results(tiny_config(tiny_data_dir, tmp_path / "split", *common, "train.max_steps=5"))
    step_4 = tmp_path / "split" / "checkpoints" / "step_00000004"
    rows = torch.load(step_4 / ckpt.rank_file(0), weights_only=True)[trainer_module.TRAIN_AUC_ROWS]
    assert {name: (column.dtype, column.numel()) for name, column in rows.items()} == {"logits": (torch.float32, 4 * 256), "labels": (torch.uint8, 4 * 256)}
    rest, resumed = _fit_results(tiny_config(tiny_data_dir, tmp_path / "split", *common, f"train.resume={step_4}"))
    assert len(losses) == whole["steps"] > 5
    assert first[:4] + rest == losses
    assert (resumed["valid"]["auc"], resumed["valid"]["logloss"]) == (whole["valid"]["auc"], whole["valid"]["logloss"])
    assert [e["epoch"] for e in whole["evaluations"]] == [1, 2] and whole["evaluations"][0]["step"] > 5
    assert all(0.0 < e["train_auc"] < 1.0 for e in whole["evaluations"])
    assert resumed["evaluations"] == whole["evaluations"]


def test_save_killed_before_rename_leaves_previous_checkpoint_loadable(tiny_data_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", "train.max_steps=2")
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        trainer.fit()
        saved = _local_tensors(trainer.model)
        real_save = dcp.save

        def killed_after_writing_shards(state, checkpoint_id):
            real_save(state, checkpoint_id=checkpoint_id)
            raise KeyboardInterrupt("killed mid-save")

        monkeypatch.setattr(ckpt.dcp, "save", killed_after_writing_shards)
        trainer.train_step(next(iter(trainer.train_loader)))
        with pytest.raises(KeyboardInterrupt):
            trainer.save_checkpoint(None)
        monkeypatch.undo()
        root = trainer.checkpointer.root
        assert [p.name for p in ckpt.checkpoints(root)] == ["step_00000002"]
        assert [p.name for p in root.glob(".tmp-*")] == [".tmp-step_00000002"]

        fresh = Trainer(tiny_config(tiny_data_dir, tmp_path / "run", "train.resume=auto"), env)
        fresh.restore(ckpt.resolve("auto", root))
        assert fresh.state.step == 2
        for name, value in _local_tensors(fresh.model).items():
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


def test_rng_state_round_trips_every_stream():
    ckpt.seed_everything(7)
    saved = ckpt.rng_state()
    drawn = (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), [random.random() for _ in range(3)], random.gauss(0, 1))
    ckpt.seed_everything(8)
    ckpt.set_rng_state(saved)
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), [random.random() for _ in range(3)], random.gauss(0, 1)) == drawn


class _Planted:
    """Unpickling this creates a file: what an arbitrary object in a checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_rank_file_with_arbitrary_objects_is_refused_without_unpickling_them(tiny_data_dir, tmp_path):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", "train.max_steps=1")
    with distributed("cpu") as env:
        Trainer(cfg, env).fit()
        path = ckpt.resolve("auto", tmp_path / "run" / "checkpoints")
        local = torch.load(path / ckpt.rank_file(0), weights_only=True)
        marker = tmp_path / "unpickled"
        torch.save({**local, "rng": _Planted(marker)}, path / ckpt.rank_file(0))
        resumed = Trainer(tiny_config(tiny_data_dir, tmp_path / "run", "train.resume=auto"), env)
        with pytest.raises(UserError, match=r"rank_00000.pt holds objects other than tensors and plain values: not loaded"):
            resumed.restore(path)
    assert not marker.exists()


def test_checkpoint_of_other_settings_is_refused_naming_them(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--config", str(SMOKE_CONFIG), f"data_dir={tiny_data_dir}", f"output_dir={out}", "model.history_length=8", "loader.history_length=8", "train.max_steps=1", "logging.tensorboard=false", "logging.progress_bar=false"]
    assert main(base) == 0
    path = ckpt.resolve("auto", out / "checkpoints")
    capsys.readouterr()
    # a longer run, elsewhere, on other cores: all of that may change
    assert main([*base[:-3], "train.max_steps=2", f"output_dir={tmp_path / 'other'}", f"train.resume={path}", "train.device=cpu", "loader.num_workers=0"]) == 0
    capsys.readouterr()

    assert main([*base, "train.resume=auto", "model.embedding_dim=32", "train.lr=0.1"]) == 2
    assert capsys.readouterr().err == (
        f"mdaf train: error: {path} was written with other settings: model.embedding_dim=32 (checkpoint: 16); "
        "train.lr=0.1 (checkpoint: 0.002)\n"
    )
    with pytest.raises(UserError, match=r"was written with other settings: model.dropout=0.5 \(checkpoint: 0.15\)$"):
        evaluate_checkpoint(str(path), ["model.dropout=0.5"])

    trainer_json = path / ckpt.TRAINER_FILE
    trainer_json.write_text(trainer_json.read_text().replace('"item": ', '"item": 1'))
    with pytest.raises(UserError, match=r"was written with other settings: table rows \{.*\} \(checkpoint: \{.*'item': 1"):
        evaluate_checkpoint(str(path))


def _evaluate_command_output(checkpoint):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluate.run(argparse.Namespace(checkpoint=checkpoint, overrides=[], best=False))
    return out.getvalue()


def _two_rank_run(cfg):
    """Train, then `mdaf evaluate` the latest checkpoint on the same 2 ranks: what each printed."""
    with distributed("cpu") as env:
        results = Trainer(cfg, env).fit()
    return results, _evaluate_command_output(str(ckpt.resolve("auto", Path(cfg.output_dir) / "checkpoints")))


def test_two_rank_checkpoint_evaluates_on_two_and_one_rank_and_resumes_on_one(tiny_data_dir, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", f"train.max_steps={STOP}")
    (two_rank, printed), (_, printed_by_rank_1) = run_ranks(2, _two_rank_run, cfg)
    root = tmp_path / "run" / "checkpoints"
    latest = ckpt.resolve("auto", root)
    assert ckpt.read_trainer_state(latest)["world_size"] == 2
    # `mdaf evaluate` on 2 ranks prints its result once
    assert printed_by_rank_1 == ""
    assert json.loads(printed[printed.index("{\n") :])["metrics"]["num_samples"] == two_rank["valid"]["num_samples"]
    run_files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert PLAN_JSON in run_files

    evaluated = evaluate_checkpoint(str(latest))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == run_files
    assert evaluated["metrics"]["num_samples"] == two_rank["valid"]["num_samples"]
    assert abs(evaluated["metrics"]["auc"] - two_rank["valid"]["auc"]) <= 1e-6
    assert abs(evaluated["metrics"]["logloss"] - evaluated["recorded"]["logloss"]) <= 1e-5

    # at another world size the checkpoint's epoch restarts: a warning says what is seen again,
    # and the progress total counts the steps really left (the whole epoch again)
    planned = []
    monkeypatch.setattr(trainer_module, "RunLogger", lambda *args, **kwargs: planned.append(args[2]) or RunLogger(*args, **kwargs))
    losses, _, step = _fit(tiny_config(tiny_data_dir, tmp_path / "run", "train.max_epochs=1", "train.resume=auto"))
    one_rank_epoch = math.ceil(num_samples(tiny_data_dir, "train") / cfg.loader.batch_size)
    assert step == STOP + one_rank_epoch == planned[0] and len(losses) == one_rank_epoch
    seen = STOP * 2 * cfg.loader.batch_size
    assert (
        f"was written by 2 ranks and this run has 1: epoch 0 restarts from its beginning, and the {seen} samples "
        "it trained on before the checkpoint are seen again"
    ) in capsys.readouterr().err

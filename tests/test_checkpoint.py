"""Checkpoints: stop + resume equals an uninterrupted run bit for bit (mid-epoch, dropout on, the
epochs' train AUC included); a save killed before its rename leaves the previous checkpoint
loadable; a damaged latest checkpoint (a truncated rank file, 4 KiB overwritten in a shard) is
skipped by resume=auto, which ends where an uninterrupted run ends, and pruning never deletes
the good one for it; rank files and .metadata are loaded without unpickling objects; a
checkpoint of other settings is refused naming them; a resumed run with nothing left to train
keeps its results.json; a 2-rank checkpoint evaluates on 2 ranks (printed once) and on 1 (the
run's files untouched) and resumes on 1 rank, restarting its epoch with a warning."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

from mdaf_dist import cli
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import distributed
from mdaf_dist.errors import UserError
from mdaf_dist.files import write_manifest
from mdaf_dist.distributed.sharding import PLAN_JSON
from mdaf_dist.data.loader import num_samples
from mdaf_dist.train import evaluate
from mdaf_dist.train import trainer as trainer_module
from mdaf_dist.train.logging import RunLogger
from mdaf_dist import cli
from mdaf_dist.train.evaluate import evaluate_checkpoint
from mdaf_dist.train.trainer import Trainer
from tests.distributed import run_ranks, tiny_config


def main(argv):
    """`mdaf train ARGV` (python -m mdaf_dist.train runs the same)."""
    return cli.main(["train", *argv])


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
    base = ["--config", str(SMOKE_CONFIG), f"data_dir={tiny_data_dir}", f"output_dir={out}", "model.history_length=8", "train.max_steps=1", "logging.tensorboard=false", "logging.progress_bar=false"]
    assert main(base) == 0
    path = ckpt.resolve("auto", out / "checkpoints")
    capsys.readouterr()
    # a longer run, elsewhere, on other cores: all of that may change
    assert main([*base[:-3], "train.max_steps=2", f"output_dir={tmp_path / 'other'}", f"train.resume={path}", "train.device=cpu", "loader.num_workers=0", "train.pipeline=none"]) == 0
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
    write_manifest(path)  # as if written so: other table sizes, not a damaged file
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


def _truncated_rank_file(path):
    file = path / ckpt.rank_file(1)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _shard_overwritten(path):
    """4 KiB in the middle of a shard overwritten, its size unchanged: only the checksum tells."""
    shard = sorted(path.glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(range(256)) * 16
    shard.write_bytes(bytes(data))


def _resumed_over_damaged_checkpoints(data_dir, root):
    """On each rank: an uninterrupted 6-step run; a run of 8 steps (checkpoints at 2, 4, 6, 8,
    the same as the first run's up to step 6) whose step-8 shard and step-6 rank file are then
    damaged, resumed with resume=auto and keep_last=1 to step 6. Rank 0 returns what the
    uninterrupted and the resumed run trained and reported, and the resumed run's warnings."""

    def fit(name, *overrides):
        with distributed("cpu") as env:
            trainer = Trainer(tiny_config(data_dir, root / name, "checkpoint.every_steps=2", *overrides), env)
            results = trainer.fit()
            return trainer.step_losses, results

    whole = fit("whole", "train.max_steps=6")
    fit("run", "train.max_steps=8", "checkpoint.keep_last=10")
    if dist.get_rank() == 0:
        _shard_overwritten(root / "run" / "checkpoints" / "step_00000008")
        _truncated_rank_file(root / "run" / "checkpoints" / "step_00000006")
    dist.barrier()
    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):
        resumed = fit("run", "train.max_steps=6", "checkpoint.keep_last=1", "train.resume=auto")
    return whole, resumed, [line for line in warnings.getvalue().splitlines() if line.startswith("warning:")]


def test_resume_auto_skips_damaged_checkpoints_ends_as_an_uninterrupted_run_and_keeps_the_good_one(tiny_data_dir, tmp_path):
    (whole_losses, whole), (losses, resumed), warnings = run_ranks(2, _resumed_over_damaged_checkpoints, tiny_data_dir, tmp_path)[0]
    root = tmp_path / "run" / "checkpoints"
    assert warnings == [
        f"warning: not resuming from step_00000008: {root / 'step_00000008'} is a damaged checkpoint: "
        "__1_0.distcp does not match its SHA-256 in its manifest",
        f"warning: not resuming from step_00000006: {root / 'step_00000006'} is a damaged checkpoint: "
        f"{ckpt.rank_file(1)} has {(tmp_path / 'whole' / 'checkpoints' / 'step_00000006' / ckpt.rank_file(1)).stat().st_size // 2} bytes, "
        f"its manifest says {(tmp_path / 'whole' / 'checkpoints' / 'step_00000006' / ckpt.rank_file(1)).stat().st_size}",
    ]
    # resumed from step 4: steps 5 and 6 trained as the uninterrupted run trained them
    assert losses == pytest.approx(whole_losses[4:], rel=0, abs=1e-6) and len(losses) == 2
    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["valid"]["num_samples"] == whole["valid"]["num_samples"]
    for key in ("auc", "logloss"):
        assert resumed["valid"][key] == pytest.approx(whole["valid"][key], rel=0, abs=1e-6)
    # keep_last=1 kept the step-6 checkpoint written again, the only good one (the damaged
    # step 8 is newer, but was never trusted: pruning leaves it), and the next resume takes it
    assert [p.name for p in ckpt.checkpoints(root)] == ["step_00000006", "step_00000008"]
    assert ckpt.newest_intact(root) == root / "step_00000006"


def _plant_in_a_shard(path, marker):
    """Make `.metadata` say that a dense parameter is stored as a pickled value, in a new shard
    file holding `_Planted`: DCP's own planner unpickles such values with weights_only=False."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    key = next(k for k in metadata.state_dict_metadata if k.startswith("model.") and "embeddings" not in k)
    planted = io.BytesIO()
    torch.save(_Planted(marker), planted)
    (path / "planted.distcp").write_bytes(planted.getvalue())
    metadata.state_dict_metadata[key] = dcp.metadata.BytesStorageMetadata()
    metadata.storage_data[dcp.metadata.MetadataIndex(key)] = _StorageInfo("planted.distcp", 0, len(planted.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return key


def _error_line(capsys):
    """What a command printed to stderr besides torch's FutureWarnings: one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_crafted_metadata_or_shard_runs_no_code_and_a_missing_shard_is_one_line(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with distributed("cpu") as env:
        Trainer(tiny_config(tiny_data_dir, out, "train.max_steps=1"), env).fit()
        path = ckpt.resolve("auto", out / "checkpoints")
        marker = tmp_path / "unpickled"
        key = _plant_in_a_shard(path, marker)
        write_manifest(path)  # whoever crafts a checkpoint can write its manifest too
        capsys.readouterr()
        assert cli.main(["evaluate", "--checkpoint", str(path)]) == 2
        assert _error_line(capsys) == f"mdaf evaluate: error: a value of {key} holds objects other than tensors and plain values: not loaded"
        assert not marker.exists()

        (path / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
        write_manifest(path)
        assert cli.main(["evaluate", "--checkpoint", str(path)]) == 2
        refusal = f"{path / '.metadata'} was refused: io.open is not part of a checkpoint's metadata"
        assert _error_line(capsys) == f"mdaf evaluate: error: {refusal}"
        with pytest.raises(UserError, match=re.escape(refusal)):
            Trainer(tiny_config(tiny_data_dir, out, "train.max_steps=2", "train.resume=auto"), env).fit()
    assert not marker.exists()

    (path / "__0_0.distcp").unlink()
    assert cli.main(["evaluate", "--checkpoint", str(path)]) == 2
    assert _error_line(capsys) == f"mdaf evaluate: error: {path} is not a complete checkpoint: __0_0.distcp is missing"


def test_a_resumed_run_with_nothing_left_to_train_keeps_its_results(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--config", str(SMOKE_CONFIG), f"data_dir={tiny_data_dir}", f"output_dir={out}", "model.history_length=8", "train.max_steps=1", "logging.tensorboard=false", "logging.progress_bar=false"]
    assert main(base) == 0
    written = (out / trainer_module.RESULTS_FILE).read_bytes()
    assert json.loads(written)["samples_per_sec"] > 0
    capsys.readouterr()
    assert main([*base, "train.resume=auto"]) == 0
    assert f"nothing left to train: {out / trainer_module.RESULTS_FILE} is kept as it is" in capsys.readouterr().out
    assert (out / trainer_module.RESULTS_FILE).read_bytes() == written

"""The loop through TorchRec's train pipelines (train.pipeline): base and sparse_dist read ahead of
the step they train, and their per-step losses, train AUC and final weights equal the loop
without read-ahead (none) exactly, at 1 rank and at 2 ranks with uneven data (the padding step
included). A checkpoint taken mid-epoch by a pipelined loop records the loader's position after
the last trained batch, not after those read ahead, and resumes bit for bit; a max_steps stop
puts the loader back there too. auto is sparse_dist on CUDA with sharded tables, base otherwise;
sparse_dist on the plain embedding backend is refused in one line. On CUDA (skipped without one),
with its streams, sparse_dist's losses match none's up to the order of CUDA's reductions."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mdaf_dist import cli
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import distributed
from mdaf_dist.train.pipeline import resolve_pipeline
from mdaf_dist.train.trainer import Trainer
from tests.distributed import run_ranks, tiny_config
from tests.test_trainer import BATCHES, FewerBatches

PIPELINES = ("none", "base", "sparse_dist")


def _local_tensors(model):
    """Parameters and buffers as plain tensors, a sharded table as this rank's shards (none
    where a table lives on another rank)."""
    state = {}
    for name, value in model.state_dict().items():
        shards = value.local_shards() if hasattr(value, "local_shards") else [value]
        state.update({f"{name}/{i}": shard.tensor if hasattr(shard, "tensor") else shard for i, shard in enumerate(shards)})
    return {name: value.detach().clone() for name, value in state.items() if isinstance(value, torch.Tensor)}


def test_auto_is_sparse_dist_on_cuda_with_sharded_tables_and_base_otherwise():
    assert resolve_pipeline("auto", torch.device("cuda"), sharded=True) == "sparse_dist"
    assert resolve_pipeline("auto", torch.device("cuda"), sharded=False) == "base"
    assert resolve_pipeline("auto", torch.device("cpu"), sharded=True) == "base"
    assert resolve_pipeline("none", torch.device("cuda"), sharded=True) == "none"


def test_sparse_dist_on_the_plain_embedding_backend_is_refused_in_one_line(tiny_data_dir, tmp_path, capsys):
    argv = ["train", "--embedding-backend", "plain", f"data_dir={tiny_data_dir}", f"output_dir={tmp_path}", "model.history_length=8", "train.pipeline=sparse_dist"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "mdaf train: error: train.pipeline=sparse_dist pipelines the sharded tables, and the plain embedding backend has none: "
        "use train.pipeline=base or none\n"
    )


def _fit_each_pipeline(data_dir, out_dir, device, *overrides):
    """Per pipeline: step losses, results and final weights of one fit."""
    runs = {}
    with distributed(device) as env:
        for name in PIPELINES:
            trainer = Trainer(tiny_config(data_dir, out_dir / name, f"train.device={device}", f"train.pipeline={name}", *overrides), env)
            results = trainer.fit()
            runs[name] = (trainer.step_losses, results["evaluations"], _local_tensors(trainer.model))
    return runs


def _assert_equal_runs(runs):
    losses, evaluations, params = runs["none"]
    assert len(losses) > 2
    for name in PIPELINES[1:]:
        assert runs[name][0] == losses, name
        assert runs[name][1] == evaluations, name
        for key, value in params.items():
            torch.testing.assert_close(runs[name][2][key], value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_pipelines_equal_the_loop_without_read_ahead_on_one_rank(tiny_data_dir, tmp_path):
    """An epoch and a half with dropout on (masks drawn in the same order), train AUC on."""
    runs = _fit_each_pipeline(tiny_data_dir, tmp_path, "cpu", "model.dropout=0.3", "loader.batch_size=256", "train.max_steps=16")
    # the first epoch's evaluation, and the one after the max_steps stop in the second
    assert [(e["epoch"], e["step"]) for e in runs["none"][1]] == [(1, 11), (1, 16)]
    _assert_equal_runs(runs)


def _uneven_epoch_each_pipeline(data_dir, out_dir):
    """Per pipeline: one epoch with BATCHES[rank] batches on each rank."""
    runs = {}
    with distributed("cpu") as env:
        for name in PIPELINES:
            trainer = Trainer(tiny_config(data_dir, out_dir / name, f"train.pipeline={name}", "logging.log_every=1000"), env)
            trainer.train_loader = FewerBatches(trainer.train_loader, BATCHES[env.rank])
            trainer._train_epoch(logger=None)
            runs[name] = (trainer.step_losses, trainer.state.samples_trained, _local_tensors(trainer.model))
    return runs


def test_pipelines_equal_the_loop_without_read_ahead_on_two_uneven_ranks(tiny_data_dir, tmp_path):
    """Rank 1 runs out a batch early and pads the last step on every pipeline."""
    for runs in run_ranks(2, _uneven_epoch_each_pipeline, tiny_data_dir, tmp_path):
        assert len(runs["none"][0]) == max(BATCHES.values())
        assert runs["none"][1] == sum(BATCHES.values()) * 32
        _assert_equal_runs(runs)


def _fit(cfg):
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        results = trainer.fit()
        return trainer.step_losses, results, _local_tensors(trainer.model)


def _loader_batches(run_dir, step, rank):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / ckpt.rank_file(rank), weights_only=True)["loader"]["batches"]


def _whole_stopped_and_resumed(data_dir, out_dir, common):
    whole = _fit(tiny_config(data_dir, out_dir / "whole", *common))
    split = out_dir / "split"
    first = _fit(tiny_config(data_dir, split, *common, "train.max_steps=5"))
    rank = dist.get_rank()
    loader_batches = (_loader_batches(split, 4, rank), _loader_batches(split, 5, rank))
    rest = _fit(tiny_config(data_dir, split, *common, f"train.resume={split / 'checkpoints' / 'step_00000004'}"))
    return whole, first, loader_batches, rest


def test_sparse_dist_checkpoint_mid_epoch_resumes_bit_for_bit_on_two_ranks(tiny_data_dir, tmp_path):
    """sparse_dist reads two batches ahead: the step-4 checkpoint still records 4 batches, and a
    run stopped by max_steps after step 5 (two batches read and not trained) records 5; resumed
    from step 4, the run ends as the uninterrupted one does (losses, evaluations, weights)."""
    common = ["train.pipeline=sparse_dist", "model.dropout=0.3", "loader.batch_size=128", "train.max_epochs=2", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    for whole, first, loader_batches, rest in run_ranks(2, _whole_stopped_and_resumed, tiny_data_dir, tmp_path, common):
        losses, results, params = whole
        assert loader_batches == (4, 5)
        assert len(losses) == results["steps"] > 5
        assert first[0][:4] + rest[0] == losses
        assert rest[1]["evaluations"] == results["evaluations"]
        for key, value in params.items():
            torch.testing.assert_close(rest[2][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh runs it)")
def test_sparse_dist_on_cuda_equals_the_loop_without_read_ahead(tiny_data_dir, tmp_path):
    """The streams' overlap changes no step: losses as close as CUDA's unordered reductions allow."""
    runs = _fit_each_pipeline(tiny_data_dir, tmp_path, "cuda", "loader.batch_size=256", "train.max_steps=16")
    losses = torch.tensor(runs["none"][0])
    for name in PIPELINES[1:]:
        torch.testing.assert_close(torch.tensor(runs[name][0]), losses, rtol=1e-5, atol=1e-6, msg=name)

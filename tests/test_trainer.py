"""The training loop and its entry point. Uneven data: a rank that runs out first joins the
others' steps with a weight-0 padding batch, so nothing hangs (collectives time out after 60 s in
the harness) and every sample of the longer rank is still trained on. The entry point with the
shipped smoke config trains, evaluates after every epoch and writes <output_dir>/results.json with
the numbers `mdaf demo` and the reproduction tools read. train.train_auc=false records no train AUC
and changes nothing else."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchx.tracker.api import AppRun
from torchx.tracker.backend.fsspec import create as fsspec_tracker

from mdaf_dist import cli, heap
from mdaf_dist.analysis.dynamics import table7
from mdaf_dist.data.layout import sample_files
from mdaf_dist.data.loader import num_samples
from mdaf_dist.distributed.env import distributed
from mdaf_dist.errors import UserError
from mdaf_dist.train.score import padding_batch
from mdaf_dist.train.trainer import RESULTS_FILE, Trainer
from tests.distributed import prepare_tiny_data, run_ranks, tiny_config
from tests.test_heap import MB, kept_after_freeing_an_array


def main(argv):
    """`mdaf train ARGV` (python -m mdaf_dist.train runs the same)."""
    return cli.main(["train", *argv])


BATCHES = {0: 3, 1: 2}
SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
# the smoke config's model on the tiny data's histories
TINY_HISTORY = ["model.history_length=8"]


class FewerBatches:
    """The rank's real loader, cut to `limit` batches per epoch."""

    def __init__(self, loader, limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.limit)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _uneven_epoch(cfg):
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        trainer.train_loader = FewerBatches(trainer.train_loader, BATCHES[env.rank])
        trainer._train_epoch(logger=None)
        return trainer.state.step, trainer.state.samples_trained, trainer.step_losses


def test_rank_with_fewer_batches_does_not_hang_and_drops_nothing(tiny_data_dir, tmp_path):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", "logging.log_every=1000")
    results = run_ranks(2, _uneven_epoch, cfg)
    batch = cfg.loader.batch_size
    for steps, samples, losses in results:
        assert steps == max(BATCHES.values())
        assert samples == sum(BATCHES.values()) * batch
        assert len(losses) == steps


def test_padding_batch_uses_the_padding_id_of_every_feature():
    batch = padding_batch(history_categories=True)
    assert batch.features.keys() == ["user", "item", "category", "hist_item", "hist_category"]
    assert batch.features.values().tolist() == [0, 0, 0, 0, 0]
    assert batch.batch_size == 1


def test_smoke_config_run_writes_results_json_and_records_with_a_torchx_tracker(tiny_data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    (tmp_path / "tracker").mkdir()
    (tmp_path / "tracker.cfg").write_text(f"protocol=file\nroot_path={tmp_path / 'tracker'}\n")
    for name, value in [("TORCHX_TRACKERS", "fsspec"), ("TORCHX_TRACKER_FSSPEC_CONFIG", str(tmp_path / "tracker.cfg")), ("TORCHX_JOB_ID", "local_cwd://torchx/run-1")]:
        monkeypatch.setenv(name, value)
    AppRun.run_from_env.cache_clear()  # one AppRun per process: this test's environment
    quiet = ["logging.tensorboard=false", "logging.progress_bar=false", "train.patience=0", *TINY_HISTORY]
    try:
        assert main(["--config", str(SMOKE_CONFIG), f"data_dir={tiny_data_dir}", f"output_dir={out}", *quiet]) == 0
    finally:
        AppRun.run_from_env.cache_clear()

    results = json.loads((out / RESULTS_FILE).read_text())
    valid = results["valid"]
    assert valid["num_samples"] == sum(pq.read_metadata(part).num_rows for part in sample_files(tiny_data_dir, "valid"))
    assert 0.0 <= valid["auc"] <= 1.0 and valid["logloss"] > 0.0
    assert 0.0 <= valid["gate_mean"] <= 1.0 and valid["gate_by_hist_len"]

    assert results["epochs"] == 2 and [e["epoch"] for e in results["evaluations"]] == [1, 2]
    assert results["evaluations"][-1]["auc"] == valid["auc"]
    best = max(results["evaluations"], key=lambda e: e["auc"])
    assert (results["best_epoch"], results["best_step"], results["best_auc"]) == (best["epoch"], best["step"], best["auc"])
    assert results["steps"] == results["evaluations"][-1]["step"] and results["samples_trained"] > 0

    printed = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert printed["auc"] == valid["auc"] and printed["num_samples"] == valid["num_samples"]
    tracked = fsspec_tracker(str(tmp_path / "tracker.cfg")).metadata("local_cwd://torchx/run-1")
    assert tracked == {**printed, "wall_seconds": results["wall_seconds"]}


def test_resumed_finished_run_without_results_reports_the_final_model(tiny_data_dir, tmp_path):
    """A run killed after its last checkpoint, before results.json: the resume writes the final
    model's results, with no throughput (it trained nothing)."""
    out = tmp_path / "run"
    base = [f"data_dir={tiny_data_dir}", f"output_dir={out}", "logging.tensorboard=false", "logging.progress_bar=false", *TINY_HISTORY]
    assert main(["--config", str(SMOKE_CONFIG), *base, "train.max_epochs=1"]) == 0
    first = json.loads((out / RESULTS_FILE).read_text())
    (out / RESULTS_FILE).unlink()

    assert main(["--config", str(SMOKE_CONFIG), *base, "train.max_epochs=1", "train.resume=auto"]) == 0
    again = json.loads((out / RESULTS_FILE).read_text())
    assert again["steps"] == first["steps"] and again["evaluations"] == first["evaluations"]
    assert again["valid"]["auc"] == pytest.approx(first["valid"]["auc"], abs=1e-9)
    assert first["samples_per_sec"] > 0 and again["samples_per_sec"] is None


def test_drop_last_drops_training_samples_only(tiny_data_dir, tmp_path):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", "loader.drop_last=true", "loader.eval_batch_size=256")
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        assert trainer.steps_per_epoch == num_samples(tiny_data_dir, "train") // cfg.loader.batch_size
        assert trainer.evaluate()["num_samples"] == num_samples(tiny_data_dir, "valid") > 256


def _fit(cfg):
    with distributed("cpu") as env:
        return Trainer(cfg, env).fit()


def _scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_after_a_resume_has_each_step_once(tiny_data_dir, tmp_path):
    """A run killed after step 5 resumes from its step-4 checkpoint: steps 5 and 6 are logged twice
    but the reader keeps the resumed run's, so the curves equal an uninterrupted run's."""
    common = ["loader.batch_size=256", "train.max_epochs=1", "logging.tensorboard=true", "logging.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    _fit(tiny_config(tiny_data_dir, tmp_path / "whole", *common))
    _fit(tiny_config(tiny_data_dir, tmp_path / "split", *common, "train.max_steps=6"))
    _fit(tiny_config(tiny_data_dir, tmp_path / "split", *common, f"train.resume={tmp_path / 'split' / 'checkpoints' / 'step_00000004'}"))
    for tag in ("train/loss", "valid/auc"):
        assert _scalars(tmp_path / "split" / "tensorboard", tag) == _scalars(tmp_path / "whole" / "tensorboard", tag), tag
    assert [step for step, _ in _scalars(tmp_path / "whole" / "tensorboard", "train/loss")] == list(range(1, 12))


def _fit_recording_train_rows(cfg):
    """fit() on one rank, with the (logits, labels) each training step passes to the train
    evaluator, and whether an evaluator existed at all."""
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        seen = []
        if trainer.train_evaluator is not None:
            update = trainer.train_evaluator.update
            trainer.train_evaluator.update = lambda logits, labels: seen.append((logits.detach().clone(), labels.clone())) or update(logits, labels)
        return trainer.fit(), seen, trainer.steps_per_epoch, trainer.train_evaluator is not None


def test_train_auc_switch_off_keeps_nothing_and_reports_none(tiny_data_dir, tmp_path, capsys):
    """On: each epoch's train_auc is the exact AUC of that epoch's training logits, also in
    TensorBoard. Off: no evaluator, train_auc None in results ("n/a" in the log line and Table 7),
    no TensorBoard scalar; everything else as with it on. A resume may switch it on."""
    common = ["loader.batch_size=256", "train.max_epochs=2", "logging.tensorboard=true"]
    on, seen, steps_per_epoch, _ = _fit_recording_train_rows(tiny_config(tiny_data_dir, tmp_path / "on", *common))
    capsys.readouterr()
    checkpoints = ["checkpoint.every_steps=7", "checkpoint.keep_last=10"]
    off, nothing, _, evaluator_built = _fit_recording_train_rows(tiny_config(tiny_data_dir, tmp_path / "off", *common, *checkpoints, "train.train_auc=false"))
    assert f"step={off['steps']} auc={off['valid']['auc']:.6f} logloss={off['valid']['logloss']:.6f} train_auc=n/a" in capsys.readouterr().err

    assert len(seen) == 2 * steps_per_epoch
    for epoch, evaluation in enumerate(on["evaluations"]):
        logits, labels = (torch.cat(column).numpy() for column in zip(*seen[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]))
        assert evaluation["train_auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-9)
    on_tb, off_tb = tmp_path / "on" / "tensorboard", tmp_path / "off" / "tensorboard"
    assert [value for _, value in _scalars(on_tb, "train/auc")] == pytest.approx([e["train_auc"] for e in on["evaluations"]])

    assert not evaluator_built and nothing == []
    assert [e["train_auc"] for e in off["evaluations"]] == [None, None]
    assert [{**e, "train_auc": None} for e in on["evaluations"]] == off["evaluations"]
    assert off["valid"] == on["valid"]
    assert "train/auc" not in EventAccumulator(str(off_tb)).Reload().Tags()["scalars"]
    assert _scalars(off_tb, "valid/auc") == _scalars(on_tb, "valid/auc")
    assert [row[1:4] for row in table7(off["evaluations"]).rows[:2]] == [["n/a", e["auc"], "n/a"] for e in off["evaluations"]]

    # switched on when resuming mid-epoch from a checkpoint saved with it off: that epoch's rows
    # before the checkpoint are missing, so its train_auc is None, not a partial one; the next is exact
    assert on["evaluations"][0]["step"] == steps_per_epoch > 7
    step_7 = tmp_path / "off" / "checkpoints" / "step_00000007"
    resumed, *_ = _fit_recording_train_rows(tiny_config(tiny_data_dir, tmp_path / "off", *common, f"train.resume={step_7}"))
    assert f"{step_7} holds no train-AUC rows of epoch 0: its train_auc is recorded as None" in capsys.readouterr().err
    assert resumed["evaluations"] == [off["evaluations"][0], on["evaluations"][1]]


ALLOWED_SHARDING = "table_wise, row_wise, column_wise, data_parallel"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.fusion=concatt"], "model.fusion='concatt' is not one of: gate, concat, fixed, attention, cross_attention, dlf_naf, optfusion"),
        (["model.static_branch=dcn"], "model.static_branch='dcn' is not one of: dcnv3, dcnv3_official, mlp, dlf, optfusion, none"),
        (["train.lr=abc"], "train.lr: Value 'abc' of type 'str' could not be converted to Float"),
        (["data_dir="], "data_dir is empty: give a prepared data directory (`mdaf prepare`'s output) in the config or as data_dir=PATH"),
        (["train.embedding_optimizer=adamw"], "train.embedding_optimizer='adamw' is not one of: auto, adam, rowwise_adagrad, adagrad, sgd"),
        (["train.device=gpu"], "train.device='gpu' is not one of: auto, cpu, cuda"),
        (["sharding.tables.item=rows"], f"sharding.tables.item='rows' is not one of: {ALLOWED_SHARDING}"),
        (
            ["model.history_length=10"],
            "model.history_length=10 but {data} was prepared with history_length=8 (its meta.json; the category filter "
            "looked at that many clicks): train with model.history_length=8, or prepare the data "
            "again with model.history_length=10",
        ),
    ],
)
def test_bad_settings_are_one_line_naming_key_value_and_choices(tiny_data_dir, tmp_path, capsys, overrides, message):
    argv = [f"data_dir={tiny_data_dir}", f"output_dir={tmp_path}", "train.device=cpu", "model.history_length=8"]
    assert main([*argv, *overrides]) == 2
    assert capsys.readouterr().err == f"mdaf train: error: {message.format(data=tiny_data_dir)}\n"


def _fit_refused(cfg):
    with distributed("cpu") as env:
        trainer = Trainer(cfg, env)
        with pytest.raises(UserError) as error:
            trainer.fit()
        return str(error.value)


def test_no_training_step_is_refused_on_every_rank(tiny_data_dir, tmp_path):
    # drop_last on two ranks that each hold fewer samples than one batch leaves no step
    n = num_samples(tiny_data_dir, "train")
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", f"loader.batch_size={n}", "loader.drop_last=true")
    messages = run_ranks(2, _fit_refused, cfg)
    assert messages == [
        f"no training step: the train split of {tiny_data_dir} has {n} samples, too few for 2 rank(s) of loader.batch_size={n} "
        "with loader.drop_last=True; lower loader.batch_size, set loader.drop_last=false or use fewer ranks"
    ] * 2
    assert not (tmp_path / "run" / RESULTS_FILE).exists()


def _refuse_constant(name):
    raise ValueError(f"not JSON: {name}")


def test_single_class_run_writes_strict_json_warns_once_and_does_not_stop_early(tmp_path, capsys):
    data = prepare_tiny_data(tmp_path / "data", neg_ratio=0)  # every sample positive
    out = tmp_path / "run"
    results = _fit(tiny_config(data, out, "train.max_epochs=2", "train.patience=1"))
    written = json.loads((out / RESULTS_FILE).read_text(), parse_constant=_refuse_constant)
    assert written["valid"]["auc"] is None and written["best_auc"] is None and written["best_epoch"] == -1
    assert [e["auc"] for e in written["evaluations"]] == [None, None]
    assert results["epochs"] == written["epochs"] == 2  # patience 1 did not act on undefined AUCs
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: AUC is undefined" in line]
    assert len(warnings) == 1 and "positive rate 1, one class or none" in warnings[0]


@pytest.mark.skipif(heap._libc() is None, reason="glibc's mallopt")
def test_epochs_keep_freed_memory_for_the_next_step_and_hand_it_back_after(tiny_data_dir, tmp_path, monkeypatch):
    kept = []
    train_epoch = Trainer._train_epoch

    def recording(self, logger):
        kept.append(kept_after_freeing_an_array())
        return train_epoch(self, logger)

    monkeypatch.setattr(Trainer, "_train_epoch", recording)
    _fit(tiny_config(tiny_data_dir, tmp_path / "run", "train.max_epochs=1", "logging.progress_bar=false"))
    assert len(kept) == 1 and kept[0] > 48 * MB  # a freed 64 MB array stays resident during the epoch
    assert kept_after_freeing_an_array() < 16 * MB

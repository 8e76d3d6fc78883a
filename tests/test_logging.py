"""RunLogger: TensorBoard events readable by TensorBoard itself, log lines, silence off rank 0."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mdaf_dist import log
from mdaf_dist.train.logging import RunLogger


def _events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def _scalar(accumulator: EventAccumulator, tag: str):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_rank0_writes_scalars_and_histograms_tensorboard_can_read(tmp_path):
    logger = RunLogger(str(tmp_path), rank=0, total_steps=3, samples_per_step=32, enabled_progress=True)
    for step, loss in [(1, 0.69), (2, 0.61), (3, 0.55)]:
        logger.step(step, {"loss": loss, "lr": 5e-4})
    eval_metrics = {"auc": 0.71, "logloss": 0.6, "gate_by_hist_len": {"1-5": 0.3, "21-50": 0.6}}
    logger.scalars(3, eval_metrics, prefix="eval")
    gates = np.linspace(0.0, 1.0, 101)
    logger.histogram(3, "eval/gate", gates)
    logger.close()

    events = _events(tmp_path)
    assert _scalar(events, "train/loss") == [(1, pytest.approx(0.69)), (2, pytest.approx(0.61)), (3, pytest.approx(0.55))]
    assert [step for step, _ in _scalar(events, "train/lr")] == [1, 2, 3]
    # samples/s needs a previous report to measure against
    rates = _scalar(events, "train/samples_per_sec")
    assert [step for step, _ in rates] == [2, 3] and all(rate > 0 for _, rate in rates)
    assert _scalar(events, "eval/auc") == [(3, pytest.approx(0.71))]
    assert _scalar(events, "eval/gate_by_hist_len/21-50") == [(3, pytest.approx(0.6))]
    (histogram,) = events.Histograms("eval/gate")
    assert histogram.step == 3
    assert histogram.histogram_value.num == 101
    assert histogram.histogram_value.sum == pytest.approx(gates.sum())
    assert (histogram.histogram_value.min, histogram.histogram_value.max) == (0.0, 1.0)


def test_without_progress_bar_each_step_is_a_key_value_line(capsys):
    log.configure(rank=0, world_size=1)
    logger = RunLogger(None, rank=0, total_steps=10, samples_per_step=8, enabled_progress=False)
    logger.step(4, {"loss": 0.5})
    logger.step(6, {"loss": 0.25})
    logger.info("eval auc=0.7")
    logger.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d I step=4/10 loss=0.5", lines[0])
    assert re.search(r" step=6/10 loss=0\.25 samples_per_sec=[0-9.e+]+ eta=\d+:\d\d:\d\d$", lines[1])
    assert lines[2].endswith(" eval auc=0.7")


def test_other_ranks_write_nothing(tmp_path, capsys):
    log_dir = tmp_path / "tb"
    logger = RunLogger(str(log_dir), rank=1, total_steps=2, samples_per_step=8)
    logger.step(1, {"loss": 0.5})
    logger.scalars(1, {"auc": 0.5}, prefix="eval")
    logger.histogram(1, "eval/gate", [0.1, 0.2])
    logger.info("hello")
    logger.close()
    assert not log_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_the_progress_bar_of_a_finished_run_ends_at_100_percent(capsys):
    # 10 planned steps reported every 4: the loop's last report is step 8
    logger = RunLogger(None, rank=0, total_steps=10, samples_per_step=1, enabled_progress=True)
    for step in (4, 8):
        logger.step(step, {"loss": 0.5})
    logger.close(10)
    assert re.search(r"100%\|[^\r]*\| 10.0/10.0 ", capsys.readouterr().err.split("\r")[-1])
    # stopped early at step 6 of 10: the run is done, its bar says so
    logger = RunLogger(None, rank=0, total_steps=10, samples_per_step=1, enabled_progress=True)
    logger.step(4, {"loss": 0.5})
    logger.close(6)
    assert re.search(r"100%\|[^\r]*\| 6.00/6.00 ", capsys.readouterr().err.split("\r")[-1])


def test_one_log_format_prefixed_with_the_rank_on_more_than_one_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    log.configure()
    logging.getLogger("mdaf_dist.train.trainer").warning("early stopping")
    log.configure(rank=0, world_size=1)
    logging.getLogger("mdaf_dist.data").info("prepared")
    first, second = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d W \[rank 1\] early stopping", first)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d I prepared", second)

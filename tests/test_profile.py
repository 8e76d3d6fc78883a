"""`mdaf profile`: FLOPs against the formula, component latencies that partition the forward
(on a clock the test advances: no assertion on measured time), Tables 8 and C1 with the paper's rows."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from mdaf_dist.analysis.profile import (
    C1_COMPONENTS, PAPER_EPOCH_SAMPLES, component_latencies, epoch_samples, flops_by_module, profile_model, table8, tableC1,
)
from mdaf_dist.cli import main
from tests.distributed import tiny_config

VOCAB = {"user": 20, "item": 70, "category": 5}


def test_linear_flops_match_the_formula():
    batch, d_in, d_out = 7, 12, 5
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, 3))
    flops = flops_by_module(model, torch.randn(batch, d_in))
    # a multiply and an add per weight and sample
    assert flops["0"] == 2 * batch * d_in * d_out
    assert flops["2"] == 2 * batch * d_out * 3
    assert flops["total"] == flops["0"] + flops["2"] and flops["1"] == 0


@pytest.fixture(scope="module")
def mdaf_profile(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("profile"), tmp_path_factory.mktemp("out"))
    # one intra-op thread: OpenMP threads that spin on a shared, busy machine make timings erratic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return profile_model(cfg.model, VOCAB, torch.device("cpu"), batch_size=32, eval_batch_size=64, steps=2, repeats=30, lr=1e-3)
    finally:
        torch.set_num_threads(threads)


def test_component_latencies_cover_the_whole_forward(mdaf_profile):
    labels = [label for label, *_ in C1_COMPONENTS]
    assert list(mdaf_profile["component_seconds"]) == labels
    assert min(mdaf_profile["component_seconds"].values()) > 0
    flops = mdaf_profile["component_flops"]
    assert flops["Embedding lookup"] == 0 and min(flops[label] for label in labels[1:]) > 0
    assert sum(flops.values()) == mdaf_profile["total_flops"]
    # the head's two linear layers, D -> D -> 1 at D = 8 on 64 samples
    assert flops["Prediction MLP"] == 2 * 64 * (8 * 8 + 8 * 1)


class _Clock:
    """time.perf_counter for the test: time passes only when a module says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Takes(nn.Module):
    def __init__(self, clock: _Clock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.seconds
        return x


class _WorkBeforeItsModules(nn.Module):
    """A forward that spends time before its first module, as MDAF's splitting of the features."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock
        self.first, self.second = _Takes(clock, 0.003), _Takes(clock, 0.005)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += 0.02
        return self.second(self.first(x))


def test_components_partition_the_forward_and_work_before_the_first_counts_with_it(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    model = _WorkBeforeItsModules(clock)
    seconds, whole = component_latencies(model, {"first": ("first",), "second": ("second",)}, (torch.randn(2, 4),), repeats=3, device=torch.device("cpu"))
    assert seconds == pytest.approx({"first": 0.023, "second": 0.005}, abs=1e-12)
    assert whole == pytest.approx(0.028, abs=1e-12)


def test_tables_have_the_papers_rows(mdaf_profile):
    bst = dict(mdaf_profile, model="bst", parameters=2 * mdaf_profile["parameters"])
    t8 = table8([mdaf_profile, bst], epoch_steps=100, epoch_samples=3200, device=torch.device("cpu"))
    assert [row[0] for row in t8.rows] == ["MDAF", "BST", "Speedup"]
    assert t8.rows[0][3] == pytest.approx(100 * mdaf_profile["train_step_seconds"])
    assert t8.rows[2][1] == "2.00x fewer" and t8.rows[2][5] == "2.83x fewer" and t8.rows[2][8] == f"{0.42 / 0.31:.2f}x faster"
    c1 = tableC1(mdaf_profile)
    assert [row[0] for row in c1.rows] == [label for label, *_ in C1_COMPONENTS] + ["Total"]
    assert sum(row[3] for row in c1.rows[:-1]) == pytest.approx(100.0)


def test_an_epoch_without_prepared_data_is_the_papers_not_zero_seconds(tmp_path):
    assert epoch_samples("") == (PAPER_EPOCH_SAMPLES, "the paper's (5.1.1)")
    assert epoch_samples(str(tmp_path)) == (PAPER_EPOCH_SAMPLES, f"the paper's (5.1.1): {tmp_path} holds no prepared data")


def test_profile_without_table_sizes_is_one_line(capsys):
    assert main(["profile", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mdaf profile: error: no table sizes: pass --vocab user=N,item=N,category=N or data_dir=PATH (a prepared directory)"
    )


def test_cli_profiles_mdaf_and_bst_each_in_a_fresh_process(tmp_path, capsys):
    tiny = ["model.embedding_dim=8", "model.history_length=8", "model.d_state=4",
            "loader.batch_size=32", "loader.eval_batch_size=64", "train.device=cpu"]  # fmt: skip
    argv = ["profile", "--vocab", "user=20,item=70,category=5", "--steps", "1", "--repeats", "1", "--out", str(tmp_path), *tiny]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| MDAF |" in printed and "| BST |" in printed and "| Speedup |" in printed
    assert "### Table C1: per-component computational cost (forward pass)" in (tmp_path / "profile.md").read_text()
    assert (tmp_path / "profile.json").is_file()

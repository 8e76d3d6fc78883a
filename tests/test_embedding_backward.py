"""The tables' backward with row-wise Adagrad on CPU (models/embedding_backward.py): our kernel
gives the weights and momentum of fbgemm's own kernel bit for bit (fbgemm's runs in a process
where ours is not installed), and those of row-wise Adagrad written out in torch, on one fbgemm
table batch shaped like the model's: tables user, item (features item and history, ids repeated
within and across them) and category (features category and history category), over steps with
duplicate ids, empty histories and an empty batch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    SplitTableBatchedEmbeddingBagsCodegen,
    WeightDecayMode,
)

from mdaf_dist.models import cpu_kernels, embedding_backward

REPO = Path(__file__).resolve().parents[1]
TABLE_ROWS = [40, 300, 25]  # user, item, category
FEATURE_TABLES = [0, 1, 1, 2, 2]  # user, item, history, category, history category
DIM, BATCH, LR, EPS = 12, 16, 0.05, 1e-3
# (most ids per bag, ids drawn from the table's first rows: few, so that they repeat) per step;
# the third step has no ids at all
STEPS = [(1, 0), (6, 20), (0, 0), (9, 300)]


def batch_ids(step: int, generator: torch.Generator):
    """One step's ids and offsets ([features x batch + 1], fbgemm's layout): up to
    STEPS[step][0] ids per bag (empty bags included), ids below min(STEPS[step][1], rows) or the
    whole table when that is 0."""
    most, span = STEPS[step]
    lengths = torch.randint(0, most + 1, (len(FEATURE_TABLES), BATCH), generator=generator)
    lengths[0] = min(most, 1)  # one user per sample
    ids = [torch.randint(0, min(span or TABLE_ROWS[t], TABLE_ROWS[t]), (int(n),), generator=generator) for t, n in zip(FEATURE_TABLES, lengths.sum(1))]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.flatten().cumsum(0)])
    return torch.cat(ids), offsets


def tables(**options) -> SplitTableBatchedEmbeddingBagsCodegen:
    """The tables, their weights uniform in +-0.5; `options`: further arguments of the fbgemm module."""
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows in TABLE_ROWS],
        feature_table_map=FEATURE_TABLES,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        pooling_mode=PoolingMode.NONE,
        learning_rate=LR,
        eps=EPS,
        **options,
    )
    with torch.no_grad():
        tbe.weights_host.copy_(torch.rand(tbe.weights_host.shape, generator=torch.Generator().manual_seed(1)) - 0.5)
    return tbe


def train(threads: int = 1):
    """Weights and momentum of `tables()` after the STEPS, each step's output gradient random
    (rows of very different scales), run by whichever kernel this process has."""
    tbe, generator = tables(), torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(len(STEPS)):
            ids, offsets = batch_ids(step, generator)
            out = tbe(ids, offsets)
            scale = 10.0 ** torch.randint(-3, 2, (out.shape[0], 1), generator=generator)
            out.backward(torch.randn(out.shape, generator=generator) * scale)
    finally:
        torch.set_num_threads(before)
    return tbe.weights_host.detach().clone(), tbe.momentum1_host.detach().clone()


@pytest.fixture(scope="module")
def fbgemm_result(tmp_path_factory):
    """`train()` by fbgemm's own kernel, in a process that never installs ours."""
    out = tmp_path_factory.mktemp("fbgemm") / "trained.pt"
    code = f"import torch; from tests.test_embedding_backward import train; torch.save(train(), {str(out)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def installed():
    if not embedding_backward.install():
        pytest.skip("the fused CPU kernels cannot be built here")


def reference_train():
    """`train()` with row-wise Adagrad written out in torch: each touched row's gradient summed
    over its ids, m += mean(g^2), w -= lr g / (sqrt(m) + eps)."""
    weights = [torch.rand(sum(TABLE_ROWS) * DIM, generator=torch.Generator().manual_seed(1)) - 0.5]
    weights = list(weights[0].split([rows * DIM for rows in TABLE_ROWS]))
    weights = [w.view(-1, DIM).double() for w in weights]
    momentum = [torch.zeros(rows, dtype=torch.float64) for rows in TABLE_ROWS]
    generator = torch.Generator().manual_seed(0)
    for step in range(len(STEPS)):
        ids, offsets = batch_ids(step, generator)
        table_of_id = torch.repeat_interleave(torch.tensor(FEATURE_TABLES), offsets[BATCH :: BATCH].diff(prepend=offsets[:1]))
        scale = 10.0 ** torch.randint(-3, 2, (len(ids), 1), generator=generator)
        grad = (torch.randn(len(ids), DIM, generator=generator) * scale).double()
        for t in range(len(TABLE_ROWS)):
            mine = table_of_id == t
            row_grad = torch.zeros_like(weights[t]).index_add_(0, ids[mine], grad[mine])
            touched = ids[mine].unique()
            g = row_grad[touched]
            momentum[t][touched] += (g * g).mean(1)
            weights[t][touched] -= LR * g / (momentum[t][touched].sqrt() + EPS)[:, None]
    return torch.cat([w.flatten() for w in weights]).float(), torch.cat(momentum).float()


@pytest.mark.parametrize("threads", [1, 2])
def test_ours_equals_fbgemms_kernel_bit_for_bit(installed, fbgemm_result, threads):
    weights, momentum = train(threads)
    fbgemm_weights, fbgemm_momentum = fbgemm_result
    assert not torch.equal(weights, tables().weights_host.detach())  # the steps moved the weights
    assert torch.equal(weights, fbgemm_weights)
    assert torch.equal(momentum, fbgemm_momentum)


def test_ours_equals_rowwise_adagrad_written_out(installed):
    weights, momentum = train()
    reference_weights, reference_momentum = reference_train()
    torch.testing.assert_close(momentum, reference_momentum, rtol=1e-5, atol=0)
    torch.testing.assert_close(weights, reference_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weight_decay": 0.01, "weight_decay_mode": WeightDecayMode.L2}, "weight_decay_mode 1 is not supported (only 0, no weight decay)"),
        ({"weight_decay": 0.01, "weight_decay_mode": WeightDecayMode.DECOUPLE}, "weight_decay_mode 2 is not supported (only 0, no weight decay)"),
        ({"max_norm": 1.0}, "max_norm 1 is not supported (only 0)"),
        ({"weights_precision": SparseType.FP16}, "only float32 weights, momentum and gradients are supported, got Half, Float and Float"),
    ],
)
def test_unsupported_options_fail_saying_which_leaving_the_weights(installed, options, message):
    tbe = tables(**options)
    ids, offsets = batch_ids(1, torch.Generator().manual_seed(0))
    before = tbe.weights_host.detach().clone()
    with pytest.raises(RuntimeError, match=re.escape(f"row-wise Adagrad table backward (mdaf_dist): {message}")):
        tbe(ids, offsets).float().sum().backward()
    assert torch.equal(tbe.weights_host.detach(), before)


def test_without_the_kernels_fbgemms_backward_stays_saying_why(monkeypatch, capsys):
    def fail():
        raise cpu_kernels.ExtensionUnavailable("no C++ compiler")

    monkeypatch.setattr(cpu_kernels, "load", fail)
    assert embedding_backward.install.__wrapped__() is False
    assert capsys.readouterr().err.splitlines() == [
        "mdaf_dist: fused CPU kernels unavailable (no C++ compiler); the tables' backward is fbgemm's"]

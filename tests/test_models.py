"""MDAF, its ablation variants and the baselines: shapes and gradients, no padding leak, the fixed
gate, the loss, the registry, `mdaf describe`, and learning a planted signal."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.cli import main as mdaf_main
from mdaf_dist.config import ConfigError, ModelConfig
from mdaf_dist.models.describe import count_parts
from mdaf_dist.models.loss import smoothed_bce
from mdaf_dist.models.registry import build_model

USERS, ITEMS, CATEGORIES = 40, 200, 10
VOCAB = {"user": USERS, "item": ITEMS, "category": CATEGORIES + 1}
SMALL = dict(embedding_dim=16, d_state=8, mlp_hidden=[32], cross_low_rank=8)

VARIANTS = {
    "mdaf": dict(name="mdaf"),
    "concat": dict(name="mdaf", fusion="concat"),
    "fixed_gate": dict(name="mdaf", fusion="fixed"),
    "attention_fusion": dict(name="mdaf", fusion="attention"),
    "dcnv3_official": dict(name="mdaf", static_branch="dcnv3_official"),
    "mlp_static": dict(name="mdaf", static_branch="mlp"),
    "static_only": dict(name="mdaf", sequence_branch="none"),
    "sequence_only": dict(name="mdaf", static_branch="none"),
    "autoint": dict(name="autoint"),
    "dcnv2": dict(name="dcnv2"),
    "bst": dict(name="bst"),
    "mamba4rec": dict(name="mamba4rec"),
    # DLF with 2 of its 8 layers keeps these tests fast (tests/test_dlf.py builds the paper's sizes);
    # the baseline as configs/baselines/dlf.yaml sets it, without the per-layer LayerNorm
    "dlf": dict(name="dlf", dlf_layers=2, dlf_layer_norm=False),
    "dlf_static": dict(name="mdaf", static_branch="dlf", dlf_layers=2),
    "cross_attention": dict(name="mdaf", fusion="cross_attention"),
    "cross_attention_static_to_seq": dict(name="mdaf", fusion="cross_attention", cross_attention_direction="static_to_seq"),
    "cross_attention_both": dict(name="mdaf", fusion="cross_attention", cross_attention_direction="both"),
    "dlf_naf": dict(name="mdaf", fusion="dlf_naf"),
}
SEQUENCE_MODELS = [k for k in VARIANTS if k not in ("static_only", "autoint", "dcnv2", "dlf")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with several intra-op threads on a busy machine the threads' spin-waits
    made a 2 s training run take up to 100 s. One thread keeps the runtime predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(variant, history_length=50, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(history_length=history_length, **SMALL, **VARIANTS[variant], **extra)
    return build_model(cfg, VOCAB, embedding_backend="plain")


def features(users, items, histories):
    """A batch as the loader builds it: one id for user/item/category, the history oldest first."""
    values = np.concatenate([users, items, items % CATEGORIES + 1] + [np.asarray(h, np.int64) for h in histories])
    lengths = [1] * (3 * len(users)) + [len(h) for h in histories]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "category", "hist_item"], values=torch.as_tensor(values).long(), lengths=torch.tensor(lengths)
    )


def random_batch(n=12, max_len=50, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.linspace(0, max_len, n).astype(int)  # 0 .. 50: includes the empty history
    return features(rng.integers(1, USERS, n), rng.integers(1, ITEMS, n), [rng.integers(1, ITEMS, k) for k in lengths])


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_backward(variant):
    model = small_model(variant)
    out = model(random_batch())
    assert out.logits.shape == (12,) and torch.isfinite(out.logits).all()
    smoothed_bce(out.logits, torch.ones(12)).backward()
    # every dense parameter is used; of the tables, Mamba4Rec reads only the item table
    assert [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("embeddings.")] == []
    assert model.embeddings.embeddings["item"].weight.grad.abs().sum() > 0


def test_mdaf_exposes_gate_and_both_branches():
    out = small_model("mdaf")(random_batch())
    assert out.gate.shape == (12,) and ((out.gate > 0) & (out.gate < 1)).all()
    assert out.h_static.shape == out.h_seq.shape == (12, 16)


def test_empty_history_gives_a_zero_sequence_representation():
    model = small_model("mdaf").eval()
    with torch.no_grad():
        out = model(random_batch())
    assert not out.h_seq[0].any() and out.h_seq[1:].abs().sum(1).gt(0).all()


@pytest.mark.parametrize("variant", SEQUENCE_MODELS)
def test_padding_does_not_leak(variant):
    """The same samples padded to L = 50 and to L = 64 give the same sequence representation."""
    model = small_model(variant).eval()
    batch = random_batch()
    with torch.no_grad():
        short = model(batch)
        model.history_length = 64
        long = model(batch)
    torch.testing.assert_close(long.h_seq, short.h_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(long.logits, short.logits, rtol=1e-5, atol=1e-5)


def test_history_beyond_the_length_is_cut_to_the_newest_steps():
    model = small_model("mdaf", history_length=5).eval()
    with torch.no_grad():
        full = model(features(np.array([3]), np.array([7]), [[11, 12, 13, 14, 15, 16, 17]]))
        newest = model(features(np.array([3]), np.array([7]), [[13, 14, 15, 16, 17]]))
    torch.testing.assert_close(full.logits, newest.logits)


def test_fixed_gate_weights_both_branches_by_half():
    model = small_model("fixed_gate").eval()
    with torch.no_grad():
        out = model(random_batch())
        expected = model.head(0.5 * out.h_static + 0.5 * out.h_seq).squeeze(-1)
    assert torch.equal(out.gate, torch.full((12,), 0.5))
    torch.testing.assert_close(out.logits, expected)


def test_label_smoothing_matches_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 1.0])
    eps = 0.1
    smoothed = [0.95, 0.05, 0.95]  # (1 - eps) y + eps / 2
    p = [1 / (1 + np.exp(-z)) for z in logits.tolist()]
    expected = -np.mean([y * np.log(q) + (1 - y) * np.log(1 - q) for y, q in zip(smoothed, p)])
    assert smoothed_bce(logits, labels, eps).item() == pytest.approx(expected, rel=1e-6)
    assert smoothed_bce(logits, labels, 0.0).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item(), rel=1e-6
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("fixed_gate", 1.5, r"model.fixed_gate=1.5 must lie in \[0, 1\]"),
    ],
)
def test_bad_variant_settings_are_errors(field, value, message):
    cfg = dataclasses.replace(ModelConfig(fusion="fixed", **SMALL), **{field: value})
    with pytest.raises(ConfigError, match=f"^{message}$"):
        build_model(cfg, VOCAB)


def test_no_branch_at_all_is_an_error():
    with pytest.raises(ConfigError, match="model.static_branch and model.sequence_branch cannot both be 'none'"):
        build_model(ModelConfig(static_branch="none", sequence_branch="none"), VOCAB)


def test_parameter_counts_at_the_paper_sizes():
    """D = 64: the gate is 2D*D + D + D + 1 = 8,321 (the paper's ~8K), the head D*D + D + D + 1."""
    parts = dict(count_parts(build_model(ModelConfig(), VOCAB, embedding_backend="plain")))
    assert parts["gate / fusion"] == 8_321
    assert parts["head"] == 4_225
    assert parts["embeddings"] == (USERS + ITEMS + CATEGORIES + 1) * 64
    assert parts["total"] == sum(n for part, n in parts.items() if part != "total")


def test_describe_prints_our_counts_beside_the_papers(capsys):
    assert mdaf_main(["describe", "--vocab", "user=40,item=200,category=11"]) == 0
    out = capsys.readouterr().out
    assert "45,969,365" in out and "8,321" in out and "Why the counts cannot agree" in out


def test_describe_rejects_a_bad_vocab(capsys):
    assert mdaf_main(["describe", "--vocab", "user=40,item=200"]) == 2
    assert "--vocab lacks category" in capsys.readouterr().err


# ---- learning a planted signal -------------------------------------------------------------
L = 10


def planted_batch(n, rng):
    """Users of group u % 2 click categories of their group's parity (80 % of their history).
    Group 1 clicks more, targets of the group's parity are liked, and a target whose category is
    in the history is likelier clicked. Static models see the group in the user id, sequence models
    in the history; both see the target."""
    users = rng.integers(1, USERS, n)
    group = users % 2
    histories = []
    for g, k in zip(group, rng.integers(1, L + 1, n)):
        cats = np.where(rng.random(k) < 0.8, 2 * rng.integers(0, CATEGORIES // 2, k) + g, rng.integers(0, CATEGORIES, k))
        histories.append(cats + CATEGORIES * rng.integers(0, ITEMS // CATEGORIES - 1, k))  # item % 10 = category - 1
    items = rng.integers(1, ITEMS, n)
    cats = items % CATEGORIES
    in_history = np.array([c in set(h % CATEGORIES) for c, h in zip(cats, histories)])
    logit = 2.0 * (group == 1) + 2.0 * (cats % 2 == group) + 1.5 * in_history - 3.0
    labels = torch.as_tensor(rng.random(n) < 1 / (1 + np.exp(-logit)), dtype=torch.float32)
    return features(users, items, histories), labels


def train_on_planted(variant, steps):
    """Adam (lr 1e-2), batches of 128, then AUC on 2,000 fresh samples."""
    torch.manual_seed(0)
    model = small_model(variant, history_length=L)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        batch, labels = planted_batch(128, rng)
        loss = smoothed_bce(model(batch).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch, labels = planted_batch(2000, rng)
    model.eval()
    with torch.no_grad():
        return roc_auc_score(labels.numpy(), model(batch).logits.numpy())


# Mamba4Rec alone must first learn to carry the history through the SSM (dt starts small): it
# stays near 0.5 for ~100 steps, then climbs at a point that depends on the seeds' trajectory
# (160 steps are too few for some). MDAF with DLF's eight layers as its static branch is near
# 0.75 after 60 steps, where the scan's rounding decides how near; every other model learns within 60.
STEPS = {"mamba4rec": 200, "dlf_static": 120}
# AUC measured with these seeds on CPU (the planted rule's own AUC is about 0.85); each test asserts
# a margin of 0.05 below it. "sequence_only" builds the Mamba4Rec model and is not trained twice.
MEASURED_AUC = {
    "mdaf": 0.822, "concat": 0.826, "fixed_gate": 0.824, "attention_fusion": 0.830,
    "dcnv3_official": 0.823, "mlp_static": 0.793, "static_only": 0.825, "autoint": 0.825,
    "dcnv2": 0.825, "bst": 0.789, "mamba4rec": 0.801, "dlf": 0.822, "dlf_static": 0.823,
    "cross_attention": 0.829, "dlf_naf": 0.828,
}


# the other cross-attention directions learn it too (0.823, 0.827) but are not trained here, to save time
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v in MEASURED_AUC])
def test_learns_the_planted_signal(variant):
    assert train_on_planted(variant, STEPS.get(variant, 60)) > MEASURED_AUC[variant] - 0.05


def test_sequence_only_ablation_is_the_mamba4rec_baseline():
    assert type(small_model("sequence_only")) is type(small_model("mamba4rec"))

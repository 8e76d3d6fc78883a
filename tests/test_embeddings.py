"""Embedding tables: the torchrec and plain backends agree, and the jagged history becomes a
right-aligned dense sequence."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from mdaf_dist.models.embeddings import INIT_BLOCK_ROWS, build_embeddings, embed, init_table_rows, right_aligned, table_configs

VOCAB = {"user": 7, "item": 30, "category": 5}
KEYS = ["user", "item", "category", "hist_item"]


def features(history_lengths):
    g = torch.Generator().manual_seed(0)
    b = len(history_lengths)
    n = sum(history_lengths)
    values = torch.cat([
        torch.randint(1, 7, (b,), generator=g), torch.randint(1, 30, (b,), generator=g),
        torch.randint(1, 5, (b,), generator=g), torch.randint(1, 30, (n,), generator=g),
    ])
    lengths = torch.tensor([1] * 3 * b + list(history_lengths))
    return KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths)


def test_tables_share_the_item_table_between_target_and_history():
    tables = {t.name: t for t in table_configs(VOCAB, 8)}
    assert tables["item"].feature_names == ["item", "hist_item"]
    assert tables["category"].feature_names == ["category"]
    assert {t.name: t.num_embeddings for t in tables.values()} == VOCAB
    with_hist = {t.name: t for t in table_configs(VOCAB, 8, history_categories=True)}
    assert with_hist["category"].feature_names == ["category", "hist_category"]


def test_missing_vocab_size_is_an_error():
    with pytest.raises(ValueError, match=r"vocab lacks sizes for \['category'\]"):
        table_configs({"user": 3, "item": 4}, 8)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown embedding backend 'fbgemm'"):
        build_embeddings(table_configs(VOCAB, 8), backend="fbgemm")


def test_backends_agree_for_the_same_weights():
    torchrec_ec = build_embeddings(table_configs(VOCAB, 8), backend="torchrec")
    plain = build_embeddings(table_configs(VOCAB, 8), backend="plain")
    assert plain.state_dict().keys() == torchrec_ec.state_dict().keys()
    plain.load_state_dict(torchrec_ec.state_dict())
    kjt = features([0, 3, 1, 5])
    a, b = torchrec_ec(kjt), plain(kjt)
    assert a.keys() == b.keys() == set(KEYS)
    for name in KEYS:
        torch.testing.assert_close(a[name].values(), b[name].values(), rtol=0, atol=0)
        assert torch.equal(a[name].lengths(), b[name].lengths())
    # the shared item table: history ids look up the same rows as target ids
    torch.testing.assert_close(b["hist_item"].values(), plain.embeddings["item"].weight[kjt["hist_item"].values()])


def test_backends_start_from_the_same_weights_and_leave_the_global_generator_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    plain = build_embeddings(table_configs(VOCAB, 8, seed=3), backend="plain").state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    torchrec_ec = build_embeddings(table_configs(VOCAB, 8, seed=3), backend="torchrec").state_dict()
    for name, value in plain.items():
        torch.testing.assert_close(torchrec_ec[name], value, rtol=0, atol=0, msg=name)
    other_seed = build_embeddings(table_configs(VOCAB, 8, seed=4), backend="plain").state_dict()
    assert not torch.equal(other_seed["embeddings.item.weight"], plain["embeddings.item.weight"])


def test_a_table_filled_shard_by_shard_equals_the_whole_table():
    rows, dim = 2 * INIT_BLOCK_ROWS + 100, 6
    whole = torch.empty(rows, dim)
    init_table_rows(whole, "item", rows, dim, 0, 0, seed=5)
    pieces = torch.full((rows, dim), float("nan"))
    row_cuts, col_cuts = [0, 5, INIT_BLOCK_ROWS + 7, rows], [0, 2, dim]
    for r0, r1 in zip(row_cuts, row_cuts[1:]):
        for c0, c1 in zip(col_cuts, col_cuts[1:]):
            init_table_rows(pieces[r0:r1, c0:c1], "item", rows, dim, r0, c0, seed=5)
    assert torch.equal(pieces, whole)
    assert 0 < whole.abs().max() <= (1 / rows) ** 0.5
    # each table has its own values
    user = torch.empty(rows, dim)
    init_table_rows(user, "user", rows, dim, 0, 0, seed=5)
    assert not torch.equal(user, whole)


def test_tables_start_uniform_within_sqrt_one_over_rows():
    weight = build_embeddings(table_configs(VOCAB, 8), backend="torchrec").embeddings["item"].weight
    assert weight.abs().max() <= (1 / 30) ** 0.5


def test_meta_device_builds_without_memory():
    ec = build_embeddings(table_configs({"user": 10**6, "item": 10**7, "category": 10}, 64), device=torch.device("meta"))
    assert ec.embeddings["item"].weight.is_meta


def test_right_aligned_left_pads_and_keeps_the_newest_steps():
    values = torch.arange(1.0, 8.0).unsqueeze(1)  # 7 steps, D = 1
    jt = JaggedTensor(values=values, lengths=torch.tensor([0, 2, 5]))
    dense, mask = right_aligned(jt, 3)
    assert dense.squeeze(-1).tolist() == [[0, 0, 0], [0, 1, 2], [5, 6, 7]]
    assert mask.tolist() == [[False] * 3, [False, True, True], [True] * 3]


def test_right_aligned_on_an_all_empty_batch():
    jt = JaggedTensor(values=torch.zeros(0, 4), lengths=torch.tensor([0, 0]))
    dense, mask = right_aligned(jt, 5)
    assert dense.shape == (2, 5, 4) and not dense.any() and not mask.any()


def test_embed_returns_one_vector_per_target_feature():
    ec = build_embeddings(table_configs(VOCAB, 8), backend="plain")
    e = embed(ec, features([2, 0, 4]), history_length=3)
    assert e.user.shape == e.item.shape == e.category.shape == (3, 8)
    assert e.history.shape == (3, 3, 8)
    assert e.history_mask.sum(1).tolist() == [2, 0, 3]

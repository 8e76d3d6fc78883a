"""The streaming loader: every sample exactly once across ranks and workers, also after a resume;
histories against a per-sample reference; seeded per-epoch shuffling; dtypes and layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mdaf_dist.config import LoaderConfig
from mdaf_dist.data.batch import CATEGORY, HIST_CATEGORY, HIST_ITEM, ITEM, USER
from mdaf_dist.data.layout import SAMPLE_SCHEMA, SAMPLES_DIR, Events, write_events, write_meta
from mdaf_dist.data.loader import make_loader, num_samples

NUM_SAMPLES = 1500
HISTORY = 5
# two files of uneven size, row groups of uneven size: balance must not depend on them
PARTS = ((0, 1000, 300), (1000, NUM_SAMPLES, 170))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Each sample's target item is its row number + 1, so a batch names its samples."""
    out = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    clicks = rng.integers(0, 3 * HISTORY, size=40)
    clicks[1] = 0  # a user with no clicks at all
    offsets = np.concatenate([[0, 0], np.cumsum(clicks)])  # user 0 is padding
    total = int(offsets[-1])
    events = Events(
        item=rng.integers(1, 5000, total).astype(np.int32),
        category=rng.integers(1, 50, total).astype(np.int32),
        ts=np.arange(total, dtype=np.int32),
        user_offsets=offsets,
    )
    write_events(out, events)
    write_meta(out, {"num_users": len(offsets) - 1})
    user = rng.integers(1, len(offsets) - 1, NUM_SAMPLES)
    pos = rng.integers(0, clicks[user - 1] + 1)
    pos[:20] = 0  # empty histories
    samples = {
        "user": user,
        "pos": pos,
        "item": np.arange(1, NUM_SAMPLES + 1),
        "category": rng.integers(1, 50, NUM_SAMPLES),
        "label": rng.integers(0, 2, NUM_SAMPLES),
        "ts": np.arange(NUM_SAMPLES),
    }
    for split in ("train", "valid"):
        (out / SAMPLES_DIR / split).mkdir(parents=True)
    for k, (lo, hi, group_rows) in enumerate(PARTS):
        columns = [pa.array(samples[field.name][lo:hi], field.type) for field in SAMPLE_SCHEMA]
        table = pa.table(columns, schema=SAMPLE_SCHEMA)
        pq.write_table(table, out / SAMPLES_DIR / "train" / f"part-{k:05d}.parquet", row_group_size=group_rows)
        if k == 0:
            pq.write_table(table, out / SAMPLES_DIR / "valid" / "part-00000.parquet", row_group_size=group_rows)
    return out, events, samples


def config(**overrides) -> LoaderConfig:
    base = dict(batch_size=64, eval_batch_size=100, shuffle_buffer=256, num_workers=0, seed=7)
    return LoaderConfig(**{**base, **overrides})


def sample_ids(batches) -> np.ndarray:
    """Row numbers of the samples in the batches, in the order they came."""
    return np.concatenate([batch.features[ITEM].values().numpy() - 1 for batch in batches])


def test_num_samples_from_metadata(data_dir):
    out, _, _ = data_dir
    assert num_samples(out, "train") == NUM_SAMPLES
    assert num_samples(out, "valid") == PARTS[0][1]


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 0)])
def test_every_sample_once_across_ranks_and_workers(data_dir, world_size, num_workers):
    out, _, _ = data_dir
    cfg = config(num_workers=num_workers)
    per_rank = [sample_ids(make_loader(out, "train", cfg, history_length=HISTORY, rank=r, world_size=world_size)) for r in range(world_size)]
    assert np.array_equal(np.sort(np.concatenate(per_rank)), np.arange(NUM_SAMPLES))
    sizes = [len(ids) for ids in per_rank]
    assert max(sizes) - min(sizes) <= 1


def test_resume_mid_epoch_yields_exactly_the_rest_in_order(data_dir):
    out, _, _ = data_dir
    cfg = config(num_workers=2)
    resumed_runs = []
    for rank in range(2):
        full = sample_ids(make_loader(out, "train", cfg, history_length=HISTORY, rank=rank, world_size=2, epoch=3))
        first = make_loader(out, "train", cfg, history_length=HISTORY, rank=rank, world_size=2, epoch=3)
        seen = []
        for step, batch in enumerate(first):
            seen.append(batch)
            if step == 4:  # an odd count: the next batch belongs to the second worker
                break
        resumed = make_loader(out, "train", cfg, history_length=HISTORY, rank=rank, world_size=2)
        resumed.load_state_dict(first.state_dict())
        rest = list(resumed)
        resumed_runs.append(np.concatenate([sample_ids(seen), sample_ids(rest)]))
        assert np.array_equal(resumed_runs[-1], full)
    assert np.array_equal(np.sort(np.concatenate(resumed_runs)), np.arange(NUM_SAMPLES))


def test_state_after_a_full_pass_starts_the_next_epoch(data_dir):
    out, _, _ = data_dir
    loader = make_loader(out, "train", config(), history_length=HISTORY, epoch=0)
    list(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 0
    second_pass = sample_ids(loader)
    assert np.array_equal(second_pass, sample_ids(make_loader(out, "train", config(), history_length=HISTORY, epoch=1)))


def test_resume_rejects_another_world_size(data_dir):
    out, _, _ = data_dir
    state = make_loader(out, "train", config(), history_length=HISTORY, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="saved with world size 2 and batch size 64; this loader has 1 and 64"):
        make_loader(out, "train", config(), history_length=HISTORY).load_state_dict(state)


def test_shuffle_is_seeded_and_differs_by_epoch(data_dir):
    out, _, _ = data_dir

    def order(epoch, seed=7):
        return sample_ids(make_loader(out, "train", config(seed=seed), history_length=HISTORY, epoch=epoch))

    epoch0 = order(0)
    assert np.array_equal(epoch0, order(0))
    assert not np.array_equal(epoch0, order(1))
    assert not np.array_equal(epoch0, order(0, seed=8))
    assert np.array_equal(np.sort(order(1)), np.arange(NUM_SAMPLES))


def test_no_shuffle_keeps_file_order_and_drop_last(data_dir):
    out, _, _ = data_dir
    batches = list(make_loader(out, "train", config(), history_length=HISTORY, shuffle=False, batch_size=400))
    assert [b.batch_size for b in batches] == [400, 400, 400, 300]
    assert np.array_equal(sample_ids(batches), np.arange(NUM_SAMPLES))
    kept = list(make_loader(out, "train", config(drop_last=True), history_length=HISTORY, shuffle=False, batch_size=400))
    assert [b.batch_size for b in kept] == [400, 400, 400]


def test_histories_match_per_sample_reference(data_dir):
    out, events, samples = data_dir
    batches = list(make_loader(out, "train", config(history_categories=True, num_workers=2), history_length=HISTORY))
    assert sum(b.batch_size for b in batches) == NUM_SAMPLES
    empty = 0
    for batch in batches:
        kjt = batch.features
        assert kjt.keys() == [USER, ITEM, CATEGORY, HIST_ITEM, HIST_CATEGORY]
        rows = kjt[ITEM].values().numpy() - 1
        users, pos = samples["user"][rows], samples["pos"][rows]
        assert np.array_equal(kjt[USER].values().numpy(), users)
        assert np.array_equal(kjt[CATEGORY].values().numpy(), samples["category"][rows])
        for key in (USER, ITEM, CATEGORY):
            assert np.array_equal(kjt[key].lengths().numpy(), np.ones(len(rows)))
        hist_items = kjt[HIST_ITEM].to_dense()
        hist_categories = kjt[HIST_CATEGORY].to_dense()
        for k in range(len(rows)):
            off = events.user_offsets[users[k]]
            window = slice(off + max(0, pos[k] - HISTORY), off + pos[k])
            assert np.array_equal(hist_items[k].numpy(), events.item[window])
            assert np.array_equal(hist_categories[k].numpy(), events.category[window])
            empty += pos[k] == 0
        assert np.array_equal(batch.labels.numpy(), samples["label"][rows].astype(np.float32))
    assert empty >= 20


def test_batch_dtypes_and_default_batch_sizes(data_dir):
    out, _, _ = data_dir
    train = next(iter(make_loader(out, "train", config(), history_length=HISTORY)))
    assert train.batch_size == 64
    assert train.labels.dtype == torch.float32
    assert train.features.values().dtype == torch.int64
    assert train.features.lengths().dtype == torch.int32
    assert train.features.keys() == [USER, ITEM, CATEGORY, HIST_ITEM]
    assert set(torch.unique(train.labels).tolist()) <= {0.0, 1.0}
    assert [b.batch_size for b in make_loader(out, "valid", config(), history_length=HISTORY, shuffle=False)] == [100] * 10

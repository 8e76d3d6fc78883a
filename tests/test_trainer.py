"""The training loop with uneven data: a rank that runs out first joins the others' steps with
a weight-0 padding batch, so nothing hangs (collectives time out after 60 s in the harness) and
every sample of the longer rank is still trained on."""

from __future__ import annotations

import itertools

from mdaf_dist.dist.env import distributed
from mdaf_dist.train.trainer import Trainer, padding_batch
from tests.distributed import prepare_tiny_data, run_ranks, tiny_config

BATCHES = {0: 3, 1: 2}


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


def test_rank_with_fewer_batches_does_not_hang_and_drops_nothing(tmp_path):
    data_dir = prepare_tiny_data(tmp_path / "tiny")
    cfg = tiny_config(data_dir, tmp_path / "run", "logging.log_every=1000")
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

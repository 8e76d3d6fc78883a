"""One loop that scores a model over a split, with no optimizer: what evaluation during
training, `mdaf evaluate` and `mdaf predict` (and through it `mdaf analyze`) share.

Every rank takes its unshuffled slice of the split (the loader's), and the ranks step in
lockstep: each step starts with an all-reduce of a "has a batch" flag, and a rank that has run
out meanwhile computes on a one-sample padding batch (id 0, the padding row of every table), so
it joins the embedding all-to-alls without contributing a row. Only real batches are yielded.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import Config
from mdaf_dist.data.batch import HIST_ITEM, USER, Batch, feature_keys
from mdaf_dist.data.loader import make_loader
from mdaf_dist.distributed.env import DistEnv, all_reduce_max
from mdaf_dist.models.output import ModelOutput
from mdaf_dist.train.metrics import Evaluator


def padding_batch(history_categories: bool) -> Batch:
    """One sample of padding ids (0 in every table): what an out-of-data rank computes on."""
    keys = feature_keys(history_categories)
    features = KeyedJaggedTensor(keys=keys, values=torch.zeros(len(keys), dtype=torch.int64), lengths=torch.ones(len(keys), dtype=torch.int32), stride=1)
    return Batch(features, torch.zeros(1))


class Scorer:
    """A model's outputs over the splits of cfg.data_dir (or another prepared directory); every
    method is a collective."""

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv) -> None:
        self.model, self.cfg, self.env = model, cfg, env
        self.padding = padding_batch(cfg.loader.history_categories).to(env.device)

    def next_or_padding(self, batches: Iterator[Batch]) -> Optional[Batch]:
        """This rank's next batch; None once every rank is out of data; the padding batch (to be
        given weight 0) while only some are."""
        batch = next(batches, None)
        if not all_reduce_max(batch is not None):
            return None
        return batch.to(self.env.device, non_blocking=True) if batch is not None else self.padding

    @torch.no_grad()
    def scored_batches(
        self, split: str, data_dir: Optional[str] = None, transform: Optional[Callable[[Batch], Batch]] = None
    ) -> Iterator[Tuple[Batch, ModelOutput]]:
        """This rank's slice of a split (of `data_dir`, default the run's data) in file order, each
        real batch (after `transform`) with the model's output in eval mode; every rank must run
        the generator to its end."""
        self.model.eval()
        loader = make_loader(data_dir or self.cfg.data_dir, split, self.cfg.loader, history_length=self.cfg.model.history_length, rank=self.env.rank, world_size=self.env.world_size, shuffle=False, device=self.env.device)
        batches = iter(loader)
        while (batch := self.next_or_padding(batches)) is not None:
            real = batch is not self.padding
            if real and transform is not None:
                batch = transform(batch)
            out = self.model(batch.features)
            if real:
                yield batch, out

    def evaluate(self, evaluator: Evaluator, split: str = "valid") -> Dict[str, Any]:
        """Exact metrics over a whole split (`evaluator` is reset first and keeps the rows)."""
        evaluator.reset()
        for batch, out in self.scored_batches(split):
            evaluator.update(out.logits, batch.labels, out.gate, batch.features[HIST_ITEM].lengths(), batch.features[USER].values())
        return evaluator.compute()

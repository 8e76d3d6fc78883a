"""Embedding tables (user, item, category) and the lookup every model starts from.

The tables live in one TorchRec `EmbeddingCollection` (non-pooled: each id keeps its own vector,
as a sequence model needs) stored as the model's `embeddings` attribute, so that
`DistributedModelParallel` finds and shards it. `PlainEmbeddingCollection` is the same thing in
plain PyTorch, with the same forward contract and state_dict keys, for unsharded reference runs
and machines without fbgemm. The item table is shared by the target item and the history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from mdaf_dist.data.batch import CATEGORY, HIST_CATEGORY, HIST_ITEM, ITEM, USER

BACKENDS = ("torchrec", "plain")


def _uniform_init(num_embeddings: int):
    """TorchRec's sharded kernels initialise uniform(+-sqrt(1/rows)); the unsharded
    `EmbeddingCollection` would use nn.Embedding's N(0, 1). Giving every table this init_fn makes
    sharded, unsharded and plain runs start from the same distribution."""
    bound = math.sqrt(1.0 / num_embeddings)

    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight.uniform_(-bound, bound)

    return init


def table_configs(vocab: Dict[str, int], dim: int, history_categories: bool = False) -> List[EmbeddingConfig]:
    """Tables user, item (features item + hist_item) and category (category [+ hist_category]).
    `vocab` maps table name -> rows, padding row 0 included."""
    missing = [t for t in (USER, ITEM, CATEGORY) if t not in vocab]
    if missing:
        raise ValueError(f"vocab lacks sizes for {missing}; expected keys user, item, category")
    features = {USER: [USER], ITEM: [ITEM, HIST_ITEM], CATEGORY: [CATEGORY] + ([HIST_CATEGORY] if history_categories else [])}
    return [
        EmbeddingConfig(
            name=table,
            num_embeddings=int(vocab[table]),
            embedding_dim=dim,
            feature_names=names,
            init_fn=_uniform_init(int(vocab[table])),
        )
        for table, names in features.items()
    ]


class PlainEmbeddingCollection(nn.Module):
    """`torchrec.EmbeddingCollection` in plain PyTorch: forward(KJT) -> {feature: JaggedTensor},
    parameters at `embeddings.<table>.weight`, so weights load across backends unchanged."""

    def __init__(self, tables: List[EmbeddingConfig], device: Optional[torch.device] = None):
        super().__init__()
        self.embeddings = nn.ModuleDict()
        self._features_by_table: Dict[str, List[str]] = {}
        for table in tables:
            self.embeddings[table.name] = nn.Embedding(table.num_embeddings, table.embedding_dim, device=device)
            if table.init_fn is not None:
                table.init_fn(self.embeddings[table.name].weight)
            self._features_by_table[table.name] = list(table.feature_names or [table.name])

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        jagged = features.to_dict()
        out: Dict[str, JaggedTensor] = {}
        for table, names in self._features_by_table.items():
            for name in names:
                ids = jagged[name]
                out[name] = JaggedTensor(values=self.embeddings[table](ids.values()), lengths=ids.lengths())
        return out


def build_embeddings(tables: List[EmbeddingConfig], backend: str = "torchrec", device: Optional[torch.device] = None) -> nn.Module:
    """`device=torch.device("meta")` builds the tables without memory, for sharding by the planner."""
    if backend == "torchrec":
        return EmbeddingCollection(tables=tables, device=device)
    if backend == "plain":
        return PlainEmbeddingCollection(tables, device=device)
    raise ValueError(f"unknown embedding backend {backend!r}; expected one of {BACKENDS}")


def right_aligned(sequence: JaggedTensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged [B, *, D] -> dense [B, max_len, D] with the newest step at position max_len - 1
    (left padding with zeros) and a bool mask [B, max_len] (True = real step). Sequences longer than
    max_len keep their newest max_len steps. Right alignment puts every sample's last real step at
    the same position, so "the output at the last step" is one slice."""
    values, lengths = sequence.values(), sequence.lengths()
    batch = lengths.shape[0]
    ends = torch.cumsum(lengths, 0)  # one past each sequence's last value
    steps = torch.arange(max_len, device=values.device)
    source = ends.unsqueeze(1) - max_len + steps  # [B, L] index into values
    mask = steps >= (max_len - lengths.clamp(max=max_len)).unsqueeze(1)
    # a zero row in front of the values gives padded steps exact zeros without branching on an empty batch
    padded_values = torch.cat([values.new_zeros(1, values.shape[-1]), values])
    index = torch.where(mask, source + 1, torch.zeros_like(source))
    return padded_values[index.reshape(-1)].reshape(batch, max_len, -1), mask


@dataclass
class EmbeddedFeatures:
    """One sample's embeddings: target-side vectors [B, D] and the history [B, L, D] + mask [B, L]."""

    user: torch.Tensor
    item: torch.Tensor
    category: torch.Tensor
    history: torch.Tensor
    history_mask: torch.Tensor

    def history_with_target(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The history with the target item appended as its newest step, [B, L + 1, D] + mask:
        the input of the sequence-only models (BST, Mamba4Rec), which must see what they score."""
        sequence = torch.cat([self.history, self.item.unsqueeze(1)], dim=1)
        mask = torch.cat([self.history_mask, self.history_mask.new_ones(self.history_mask.shape[0], 1)], dim=1)
        return sequence, mask


def embed(embeddings: nn.Module, features: KeyedJaggedTensor, history_length: int) -> EmbeddedFeatures:
    """Look every feature up once; user/item/category hold exactly one id per sample."""
    out = embeddings(features)
    history, mask = right_aligned(out[HIST_ITEM], history_length)
    return EmbeddedFeatures(out[USER].values(), out[ITEM].values(), out[CATEGORY].values(), history, mask)

"""Embedding tables (user, item, category) and the lookup every model starts from.

The tables live in one TorchRec `EmbeddingCollection` (non-pooled: each id keeps its own vector,
as a sequence model needs) stored as the model's `embeddings` attribute, so that
`DistributedModelParallel` finds and shards it. `PlainEmbeddingCollection` is the same thing in
plain PyTorch, with the same forward contract and state_dict keys, for unsharded reference runs
and machines without fbgemm. The item table is shared by the target item and the history.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from mdaf_dist.data.batch import CATEGORY, HIST_CATEGORY, HIST_ITEM, ITEM, USER

BACKENDS = ("torchrec", "plain")
# where a model's tables sit in its state_dict: model.embeddings (the collection) .embeddings.<table>
EMBEDDINGS_KEY = "embeddings.embeddings"


# rows drawn from one generator by `init_table_rows`
INIT_BLOCK_ROWS = 4096


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{table}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def init_table_rows(weight: torch.Tensor, table: str, num_rows: int, dim: int, row_offset: int, col_offset: int, seed: int) -> None:
    """Fill `weight`, the block [row_offset:, col_offset:] of table `table` ([num_rows, dim]), with
    the values the whole table has under `seed`: uniform(+-sqrt(1/num_rows)) (TorchRec's sharded
    kernels' distribution), drawn in blocks of INIT_BLOCK_ROWS rows, block b from its own
    generator seeded by (seed, table, b). A table's values then depend on the seed and the global
    row index only: 1 rank or N, any sharding type, sharded or plain start from the same weights,
    each rank drawing only the blocks its shards overlap, one at a time. The global generator is
    not touched, so what is built after the tables (dense modules) does not depend on them."""
    if weight.is_meta or weight.dim() != 2 or weight.numel() == 0:
        return  # nothing to fill (a rank that holds no shard of a table has an empty placeholder)
    rows, cols = weight.shape
    bound = math.sqrt(1.0 / num_rows)
    for block in range(row_offset // INIT_BLOCK_ROWS, (row_offset + rows - 1) // INIT_BLOCK_ROWS + 1):
        lo = block * INIT_BLOCK_ROWS
        hi = min(lo + INIT_BLOCK_ROWS, num_rows)
        generator = torch.Generator().manual_seed(_block_seed(seed, table, block))
        values = torch.empty(hi - lo, dim).uniform_(-bound, bound, generator=generator)
        first, last = max(lo, row_offset), min(hi, row_offset + rows)
        weight[first - row_offset : last - row_offset].copy_(values[first - lo : last - lo, col_offset : col_offset + cols])


def init_tables(model: nn.Module, tables: List[EmbeddingConfig], seed: int) -> None:
    """`init_table_rows` on every table of `model` (its tables at `model.embeddings`), whole or
    sharded: a sharded table (ShardedTensor in the state_dict) fills each of this rank's shards
    in place, at its offsets in the table."""
    state = model.state_dict()
    for table in tables:
        weight = state[f"{EMBEDDINGS_KEY}.{table.name}.weight"]
        shards = [(s.tensor, *s.metadata.shard_offsets) for s in weight.local_shards()] if hasattr(weight, "local_shards") else [(weight, 0, 0)]
        for tensor, row_offset, col_offset in shards:
            init_table_rows(tensor, table.name, table.num_embeddings, table.embedding_dim, row_offset, col_offset, seed)


def _seeded_init(table: str, num_rows: int, dim: int, seed: int):
    """The init_fn of an unsharded table: `init_table_rows` over the whole table."""

    def init(weight: torch.Tensor) -> None:
        init_table_rows(weight, table, num_rows, dim, 0, 0, seed)

    return init


def table_configs(vocab: Dict[str, int], dim: int, history_categories: bool = False, seed: int = 0) -> List[EmbeddingConfig]:
    """Tables user, item (features item + hist_item) and category (category [+ hist_category]).
    `vocab` maps table name -> rows, padding row 0 included; `seed` gives the initial weights
    (see `init_table_rows`)."""
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
            init_fn=_seeded_init(table, int(vocab[table]), dim, seed),
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
            # an explicit weight skips nn.Embedding's own N(0, 1) init and its draw from the global generator
            weight = torch.empty(table.num_embeddings, table.embedding_dim, device=device)
            self.embeddings[table.name] = nn.Embedding(table.num_embeddings, table.embedding_dim, _weight=weight)
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

"""The served model: raw-id batches in, probabilities out, in plain PyTorch.

    forward(user [B], item [B], category [B], history [B, L], history_length [B])
      -> {"probability": [B], "logit": [B], "gate": [B] (models with a fusion gate)}

`history` holds each sample's last L clicked item ids, oldest first and right-aligned (the
newest click in column L - 1); the first L - history_length columns are ignored (any value).
Raw ids are mapped to table rows through the training vocabularies held as buffers (binary
search): an id the training data never had maps to row 0, the padding row, as `mdaf predict
--data` does. The tables are plain `nn.Embedding`s, or, quantized, int8 rows with a per-row
scale and bias; everything after the lookup is the model's own `from_embeddings`, so `torch.export`
sees one graph of ATen ops and the exported program needs neither torchrec nor mdaf_dist.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from mdaf_dist.data.batch import CATEGORY, ITEM, USER
from mdaf_dist.models.embeddings import EmbeddedFeatures

TABLES = (USER, ITEM, CATEGORY)
INPUTS = ("user", "item", "category", "history", "history_length")


class VocabularyLookup(nn.Module):
    """Raw ids -> rows of one table: `raw_ids` (ascending) are the raw ids of rows 1..n."""

    def __init__(self, raw_ids: Tensor) -> None:
        super().__init__()
        # a sentinel keeps the binary search in range when the table has no row but padding
        self.register_buffer("raw_ids", torch.cat([raw_ids.to(torch.int64), raw_ids.new_full((1,), torch.iinfo(torch.int64).max)]))

    def forward(self, ids: Tensor) -> Tensor:
        at = torch.searchsorted(self.raw_ids, ids)
        known = (self.raw_ids[at] == ids) & (at < self.raw_ids.numel() - 1)
        return torch.where(known, at + 1, torch.zeros_like(at))


class Int8Table(nn.Module):
    """Rows stored as uint8 with a per-row scale and bias (fbgemm's row-wise int8, as TorchRec's
    inference quantization writes them): row = weight * scale + bias."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.reshape(-1, 1))
        self.register_buffer("bias", bias.reshape(-1, 1))

    def forward(self, rows: Tensor) -> Tensor:
        return self.weight[rows].float() * self.scale[rows].float() + self.bias[rows].float()


class ServingModel(nn.Module):
    """A trained model's dense part behind vocabulary lookups and tables (see the module doc)."""

    def __init__(self, model: nn.Module, tables: Dict[str, nn.Module], vocabularies: Dict[str, Tensor]) -> None:
        super().__init__()
        self.model = model
        self.tables = nn.ModuleDict(tables)
        self.lookups = nn.ModuleDict({name: VocabularyLookup(vocabularies[name]) for name in TABLES})

    def _embed(self, table: str, ids: Tensor) -> Tensor:
        return self.tables[table](self.lookups[table](ids))

    def forward(self, user: Tensor, item: Tensor, category: Tensor, history: Tensor, history_length: Tensor) -> Dict[str, Tensor]:
        steps = history.shape[1]
        mask = torch.arange(steps, device=history.device) >= (steps - history_length.clamp(max=steps)).unsqueeze(1)
        history_rows = self._embed(ITEM, history)
        # padded steps are exact zeros, as embeddings.right_aligned makes them
        history_rows = torch.where(mask.unsqueeze(-1), history_rows, torch.zeros_like(history_rows))
        e = EmbeddedFeatures(self._embed(USER, user), self._embed(ITEM, item), self._embed(CATEGORY, category), history_rows, mask)
        out = self.model.from_embeddings(e)
        result = {"probability": torch.sigmoid(out.logits), "logit": out.logits}
        if out.gate is not None:
            result["gate"] = out.gate
        return result

"""`Batch`: what the loader yields and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Feature names of the KeyedJaggedTensor. `item` and `hist_item` share the item table.
USER, ITEM, CATEGORY, HIST_ITEM, HIST_CATEGORY = "user", "item", "category", "hist_item", "hist_category"
FEATURES = (USER, ITEM, CATEGORY, HIST_ITEM)


def feature_keys(history_categories: bool) -> list[str]:
    """A batch's feature names in KeyedJaggedTensor order (loader.history_categories adds one)."""
    return [*FEATURES, HIST_CATEGORY] if history_categories else list(FEATURES)


@dataclass
class Batch:
    """features: one id per sample for user/item/category; the history (oldest first, at most L
    ids) for hist_item [and hist_category]. labels: float32 [B]."""

    features: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(self.features.to(device, non_blocking=non_blocking), self.labels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return Batch(self.features.pin_memory(), self.labels.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        self.labels.record_stream(stream)

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

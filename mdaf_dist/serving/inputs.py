"""A prepared directory's batches as the served model's inputs: raw ids, the history dense."""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch
from torch import Tensor

from mdaf_dist.config import LoaderConfig
from mdaf_dist.data.batch import CATEGORY, HIST_ITEM, ITEM, USER, Batch
from mdaf_dist.data.loader import make_loader
from mdaf_dist.data.vocab import PADDING_RAW_ID, load_vocab


def raw_inputs(batch: Batch, raw_by_row: Dict[str, np.ndarray], history_length: int) -> Dict[str, Tensor]:
    """`batch` (ids of the directory whose vocabularies are `raw_by_row`) as program.INPUTS: raw
    ids, and the history right-aligned in [B, history_length] with PADDING_RAW_ID before it."""
    features = batch.features
    values = {key: features[key].values().cpu().numpy() for key in (USER, ITEM, CATEGORY, HIST_ITEM)}
    lengths = features[HIST_ITEM].lengths().cpu().numpy().astype(np.int64)
    history = np.full((lengths.size, history_length), PADDING_RAW_ID, dtype=np.int64)
    sample = np.repeat(np.arange(lengths.size), lengths)
    step = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    history[sample, history_length - np.repeat(lengths, lengths) + step] = raw_by_row[ITEM][values[HIST_ITEM]]
    return {
        "user": torch.from_numpy(np.asarray(raw_by_row[USER][values[USER]], dtype=np.int64)),
        "item": torch.from_numpy(np.asarray(raw_by_row[ITEM][values[ITEM]], dtype=np.int64)),
        "category": torch.from_numpy(np.asarray(raw_by_row[CATEGORY][values[CATEGORY]], dtype=np.int64)),
        "history": torch.from_numpy(history),
        "history_length": torch.from_numpy(lengths),
    }


def split_inputs(data_dir: str, split: str, cfg: LoaderConfig, history_length: int) -> Iterator[Tuple[Batch, Dict[str, Tensor]]]:
    """Every batch of a split in file order (one process), with its raw-id inputs."""
    raw_by_row = {table: np.asarray(load_vocab(data_dir, table)) for table in (USER, ITEM, CATEGORY)}
    for batch in make_loader(data_dir, split, cfg, history_length=history_length, shuffle=False):
        yield batch, raw_inputs(batch, raw_by_row, history_length)

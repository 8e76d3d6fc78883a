"""`mdaf predict`: one row per sample of a split, scored by a checkpoint (or an export, `--model`),
written as Parquet.

    OUT.parquet/part-00000.parquet ...   one part file per rank, together every sample of the
                                         split once, in the split's file order

Columns (PREDICTION_SCHEMA): user, item, category (raw ids of the scored data), label, logit,
probability, gate (models with a fusion gate only), hist_len (history clicks the model saw),
day (days since the scored data's window start), ts. The parts' Parquet metadata (key "mdaf")
holds the checkpoint, split, data directory, sample count, the split's metrics and the unseen-id
counts. pyarrow and pandas read the directory as one table.

Rank r scores rows [r N / W, (r + 1) N / W) of the split (the loader's unshuffled slice), so the
rows of a 1-rank and an N-rank run are the same and none is lost or repeated. The sample
columns are read from those rows of the Parquet files; the model's outputs come batch by batch
in the same order (the labels are checked against each other).

Scoring another prepared directory (`--data`): its dense ids are not the training run's. Each id
goes back to its raw id (DIR/vocab) and to the training run's dense id; ids the training data
never had map to row 0, the padding row, and are counted per feature in the metadata.

Scoring an export (`--model EXPORT_DIR`, written by `mdaf export`): one process, no process
group, no checkpoint; the scored data's raw ids go to the exported program, whose vocabularies
map them to rows (unseen ids to the padding row, counted here the same way). Its probability
column is the program's own output.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import SECONDS_PER_DAY, load_config
from mdaf_dist.data.batch import CATEGORY, HIST_CATEGORY, HIST_ITEM, ITEM, USER, Batch, feature_keys
from mdaf_dist.data.layout import SPLITS, check_history_length, read_meta
from mdaf_dist.data.loader import rank_pieces, row_groups
from mdaf_dist.data.vocab import load_vocab
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import DistEnv, all_reduce, distributed
from mdaf_dist.errors import UserError
from mdaf_dist.files import dumps, output_directory
from mdaf_dist.train.evaluate import checkpoint_config, load_model, resolve_checkpoint
from mdaf_dist.train.metrics import Evaluator
from mdaf_dist.train.score import Scorer

PART_PATTERN = "part-*.parquet"
METADATA_KEY = b"mdaf"
# feature -> the table its ids index
TABLE_OF = {USER: USER, ITEM: ITEM, HIST_ITEM: ITEM, CATEGORY: CATEGORY, HIST_CATEGORY: CATEGORY}
SAMPLE_COLUMNS = ("user", "item", "category", "label", "ts")


def part_file(rank: int) -> str:
    return f"part-{rank:05d}.parquet"


def prediction_schema(with_gate: bool) -> pa.Schema:
    fields = [
        ("user", pa.int64()), ("item", pa.int64()), ("category", pa.int64()), ("label", pa.int8()),
        ("logit", pa.float32()), ("probability", pa.float32()),
    ] + ([("gate", pa.float32())] if with_gate else []) + [
        ("hist_len", pa.int32()), ("day", pa.int16()), ("ts", pa.int32()),
    ]  # fmt: skip
    return pa.schema(fields)


def read_predictions(path: str | Path) -> pa.Table:
    """Every part of a predictions directory (or one part file), in rank order."""
    path = Path(path)
    parts = sorted(path.glob(PART_PATTERN)) if path.is_dir() else [path]
    if not parts or not parts[0].is_file():
        raise UserError(f"no predictions at {path} (expected a directory of {PART_PATTERN} written by `mdaf predict`)")
    prediction_metadata(path)
    return pa.concat_tables([pq.read_table(part) for part in parts])


def prediction_metadata(path: str | Path) -> Dict[str, Any]:
    """The "mdaf" metadata of a predictions directory (the same in every part); one line for a
    file that is not Parquet or not written by `mdaf predict`."""
    path = Path(path)
    first = sorted(path.glob(PART_PATTERN))[0] if path.is_dir() else path
    try:
        metadata = pq.read_schema(first).metadata or {}
    except pa.ArrowInvalid as e:
        raise UserError(f"{first} is not a Parquet file ({e}): give predictions written by `mdaf predict`") from None
    if METADATA_KEY not in metadata:
        raise UserError(f"{first} has no {METADATA_KEY.decode()!r} metadata: give predictions written by `mdaf predict`")
    return json.loads(metadata[METADATA_KEY])


@dataclass
class VocabMap:
    """Dense ids of a scored directory -> dense ids of the training run, per table (0: unseen)."""

    tables: Dict[str, np.ndarray]

    @staticmethod
    def between(scored_dir: str, training_dir: str) -> "VocabMap":
        tables = {}
        for table in (USER, ITEM, CATEGORY):
            trained = np.asarray(load_vocab(training_dir, table))[1:]  # raw ids, ascending (vocab.py)
            scored = np.asarray(load_vocab(scored_dir, table))
            at = np.minimum(np.searchsorted(trained, scored), max(len(trained) - 1, 0))
            known = (trained[at] == scored) if len(trained) else np.zeros(len(scored), dtype=bool)
            known[0] = False
            tables[table] = np.where(known, at + 1, 0).astype(np.int64)
        return VocabMap(tables)

    def apply(self, batch: Batch, unseen: Dict[str, int]) -> Batch:
        """The batch with every feature's ids mapped; unseen ids (per feature) are added to `unseen`."""
        features = batch.features
        values = features.values().cpu().numpy()
        mapped = np.empty_like(values)
        for key, (start, stop) in zip(features.keys(), zip(features.offset_per_key()[:-1], features.offset_per_key()[1:])):
            ids = self.tables[TABLE_OF[key]][values[start:stop]]
            unseen[key] = unseen.get(key, 0) + int(np.count_nonzero(ids == 0))
            mapped[start:stop] = ids
        remapped = KeyedJaggedTensor(
            keys=features.keys(), values=torch.from_numpy(mapped).to(features.values().device),
            lengths=features.lengths(), stride=features.stride(),
        )  # fmt: skip
        return Batch(remapped, batch.labels)


def check_split(data_dir: str, split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {SPLITS}")
    splits = read_meta(data_dir).get("splits", {})
    if not splits.get(split, {}).get("rows"):
        have = ", ".join(name for name, info in splits.items() if info.get("rows")) or "none"
        raise UserError(f"{data_dir} has no {split} samples (splits with samples: {have}; a test split comes from prepare.test_days or prepare.split=fraction)")


def rank_rows(data_dir: str, split: str, rank: int, world_size: int) -> Dict[str, np.ndarray]:
    """SAMPLE_COLUMNS of the rows the loader gives `rank` when not shuffling, in its order."""
    groups = row_groups(data_dir, split)
    pieces = rank_pieces([g.num_rows for g in groups], np.arange(len(groups)), rank, world_size)
    parts: List[pa.Table] = []
    for piece in pieces:
        group = groups[piece.row_group]
        table = pq.ParquetFile(group.path).read_row_group(group.index, columns=list(SAMPLE_COLUMNS))
        parts.append(table.slice(piece.start, piece.stop - piece.start))
    if not parts:
        return {name: np.empty(0, dtype=np.int64) for name in SAMPLE_COLUMNS}
    table = pa.concat_tables(parts)
    return {name: table.column(name).to_numpy() for name in SAMPLE_COLUMNS}


def predict(env: DistEnv, path: Path, out: str, split: str = "valid", data_dir: Optional[str] = None, overrides: List[str] = ()) -> Dict[str, Any]:
    """Score a split with a checkpoint (`resolve_checkpoint`) and write this rank's part (a
    collective: every rank calls it); returns the metadata, the same on every rank."""
    out_dir = _out_dir(out)
    cfg = checkpoint_config(path, overrides)
    training_dir = cfg.data_dir
    scored_dir = data_dir or training_dir
    other_data = Path(scored_dir).resolve() != Path(training_dir).resolve()
    # the training data is verified (and its history length checked) by `load_model`
    _check_scored(scored_dir, split, cfg.model.history_length, verify=other_data)
    remap = VocabMap.between(scored_dir, training_dir) if other_data else None
    scorer = Scorer(load_model(path, cfg, env), cfg, env)
    unseen: Dict[str, int] = {}
    transform = (lambda batch: remap.apply(batch, unseen)) if remap is not None else None
    scored = ((batch, {"logit": result.logits, "gate": result.gate}) for batch, result in scorer.scored_batches(split, scored_dir, transform))
    columns = _columns(scored)
    rows = rank_rows(scored_dir, split, env.rank, env.world_size)
    metrics = _metrics(columns, rows)
    keys = feature_keys(cfg.loader.history_categories)
    meta = {
        "checkpoint": str(path),
        "step": ckpt.read_trainer_state(path)["step"],
        "split": split,
        "data_dir": str(scored_dir),
        "training_data_dir": str(training_dir),
        "world_size": env.world_size,
        "num_samples": int(metrics["num_samples"]),
        "metrics": metrics,
        "unseen_ids": dict(zip(keys, map(int, all_reduce([unseen.get(key, 0) for key in keys], dist.ReduceOp.SUM)))) if remap is not None else None,
    }
    if env.is_main:
        _clear(out_dir)
    dist.barrier()
    _write_part(out_dir / part_file(env.rank), rows, columns, scored_dir, meta)
    dist.barrier()
    return meta


def predict_with_export(model_dir: str, out: str, split: str = "valid", data_dir: Optional[str] = None) -> Dict[str, Any]:
    """Score a split with an export (`mdaf export`) in this process alone, no process group, and
    write one part; returns the metadata. The export's vocabularies map the scored data's raw ids."""
    from mdaf_dist.serving.inputs import split_inputs
    from mdaf_dist.serving.load import export_info, load_export

    out_dir = _out_dir(out)
    served = load_export(model_dir)
    info = export_info(model_dir)
    cfg = load_config(str(Path(model_dir) / ckpt.CONFIG_FILE))
    training_dir = cfg.data_dir
    scored_dir = data_dir or training_dir
    _check_scored(scored_dir, split, info["history_length"], verify=True)
    # the export's vocabularies are the training data's: that data need not be here
    remap = VocabMap.between(scored_dir, model_dir) if Path(scored_dir).resolve() != Path(training_dir).resolve() else None
    unseen: Dict[str, int] = {}

    @torch.no_grad()
    def scored() -> Iterator[Tuple[Batch, Dict[str, torch.Tensor]]]:
        for batch, inputs in split_inputs(scored_dir, split, cfg.loader, info["history_length"]):
            if remap is not None:
                remap.apply(batch, unseen)  # counts the ids the export's vocabularies lack
            yield batch, served(**inputs)

    columns = _columns(scored())
    rows = rank_rows(scored_dir, split, 0, 1)
    metrics = _metrics(columns, rows)
    meta = {
        "checkpoint": info["checkpoint"],
        "export": str(model_dir),
        "step": info["step"],
        "split": split,
        "data_dir": str(scored_dir),
        "training_data_dir": str(training_dir),
        "world_size": 1,
        "num_samples": int(metrics["num_samples"]),
        "metrics": metrics,
        "unseen_ids": {key: unseen.get(key, 0) for key in feature_keys(cfg.loader.history_categories)} if remap is not None else None,
    }
    _clear(out_dir)
    _write_part(out_dir / part_file(0), rows, columns, scored_dir, meta)
    return meta


def _out_dir(out: str) -> Path:
    out_dir = output_directory(out, "--out")
    if not out_dir.parent.is_dir():
        raise UserError(f"cannot write {out}: the directory {out_dir.parent} does not exist")
    return out_dir


def _check_scored(scored_dir: str, split: str, history_length: int, verify: bool) -> None:
    """Refuse a split without samples; with `verify`, data that does not match its checksums or
    was prepared with another history length."""
    check_split(scored_dir, split)
    if verify:
        check_history_length(scored_dir, read_meta(scored_dir, checksums=True), history_length)


def _columns(scored: Iterable[Tuple[Batch, Dict[str, Optional[torch.Tensor]]]]) -> Dict[str, np.ndarray]:
    """label, logit and hist_len of every scored batch, and gate and probability where the
    outputs have them."""
    outputs: Dict[str, List[np.ndarray]] = {"label": [], "logit": [], "hist_len": [], "gate": [], "probability": []}
    for batch, result in scored:
        outputs["label"].append(batch.labels.cpu().numpy())
        outputs["hist_len"].append(batch.features[HIST_ITEM].lengths().cpu().numpy())
        for name in ("logit", "gate", "probability"):
            if result.get(name) is not None:
                outputs[name].append(result[name].float().cpu().numpy())
    return {name: np.concatenate(values) if values else np.empty(0, np.float32) for name, values in outputs.items() if values or name in ("label", "logit", "hist_len")}


def _metrics(columns: Dict[str, np.ndarray], rows: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """The split's metrics (a collective under torch.distributed), the outputs checked against the rows."""
    if not np.array_equal(columns["label"], rows["label"].astype(np.float32)):
        raise AssertionError("the loader's batches and the split's rows disagree: predictions would be misaligned")
    # users by the scored data's ids: unseen users all score as padding but stay apart for GAUC
    evaluator = Evaluator()
    evaluator.update(
        *(torch.from_numpy(columns[name]) for name in ("logit", "label")),
        torch.from_numpy(columns["gate"]) if "gate" in columns else None,
        torch.from_numpy(columns["hist_len"]), torch.tensor(rows["user"]),  # a copy: pyarrow's arrays are read-only
    )  # fmt: skip
    return evaluator.compute()


def _clear(out_dir: Path) -> None:
    out_dir.mkdir(exist_ok=True)
    for stale in out_dir.glob(PART_PATTERN):
        stale.unlink()


def _write_part(path: Path, rows: Dict[str, np.ndarray], columns: Dict[str, np.ndarray], data_dir: str, meta: Dict[str, Any]) -> None:
    """One part file; the probability is the given one (an export's), else the logits' sigmoid."""
    window_start = int(read_meta(data_dir)["settings"]["window_start"])
    raw = {name: np.asarray(load_vocab(data_dir, name))[rows[name]] for name in (USER, ITEM, CATEGORY)}
    logits = columns["logit"].astype(np.float32)
    with_gate = "gate" in columns
    probability = columns["probability"] if "probability" in columns else 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    data = {
        **raw,
        "label": rows["label"].astype(np.int8),
        "logit": logits,
        "probability": probability.astype(np.float32),
        **({"gate": columns["gate"].astype(np.float32)} if with_gate else {}),
        "hist_len": columns["hist_len"].astype(np.int32),
        "day": ((rows["ts"].astype(np.int64) - window_start) // SECONDS_PER_DAY).astype(np.int16),
        "ts": rows["ts"].astype(np.int32),
    }
    schema = prediction_schema(with_gate).with_metadata({METADATA_KEY: dumps(meta).encode()})
    pq.write_table(pa.table(data, schema=schema), path)


def run(args: argparse.Namespace) -> int:
    if args.model:
        if args.overrides:
            raise UserError(f"overrides {args.overrides} apply to a checkpoint's config, not to an export")
        meta = predict_with_export(args.model, args.out, args.split, args.data)
        is_main = True
    else:
        path = resolve_checkpoint(args.checkpoint, args.best)
        with distributed(checkpoint_config(path, args.overrides).train.device) as env:
            meta = predict(env, path, args.out, args.split, args.data, args.overrides)
        is_main = env.is_main
    if is_main:
        m = meta["metrics"]
        print(
            f"{meta['num_samples']} {meta['split']} predictions -> {args.out} ({meta['world_size']} part files); "
            f"auc {m['auc']:.4f} gauc {m.get('gauc', float('nan')):.4f} logloss {m['logloss']:.4f} calibration {m['calibration']:.3f}"
        )
        if meta["unseen_ids"] is not None:
            print("ids unseen in training (scored as padding): " + ", ".join(f"{k}={v}" for k, v in meta["unseen_ids"].items()))
    return 0

"""`mdaf export --checkpoint DIR --out EXPORT_DIR [--quantize int8]`: a trained model as a
self-contained directory for serving.

    EXPORT_DIR/
        program.pt2          the served model (program.py: raw ids -> probabilities) through
                             `torch.export`, weights and vocabularies inside: torch.export.load
                             runs it without torchrec, mdaf_dist or a process group
        weights.safetensors  the unsharded weights by state_dict key; with --quantize int8 each
                             table is `<key>` (uint8 rows) + `<key>_qscale` + `<key>_qbias` (float16)
        vocab/<table>.npy    raw ids by table row ([0] = -1, the padding row): a raw id's row is
                             its position
        config.yaml          the run's resolved config
        export.json          checkpoint, step, its metrics, inputs, history length, quantization,
                             sizes (and, quantized, the validation AUC before and after)
        manifest.json        every file's size and SHA-256, written last

The checkpoint is read without a process group: DCP assembles each table from the shards of
however many ranks wrote it, so a checkpoint of 1 rank and of N exports the same weights. The
selective scan of Mamba models is exported with its pure-PyTorch `reference` backend (the fused
CPU kernel is a C++ extension the exported program could not carry).

--quantize int8 runs TorchRec's inference quantization (`quantize_inference_model`: row-wise int8
with a float16 scale and bias per row, fbgemm's layout) over the tables and serves the rows it
wrote, dequantized by the program in plain PyTorch; the dense modules stay float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from mdaf_dist.config import Config, to_yaml
from mdaf_dist.data.layout import read_meta
from mdaf_dist.data.vocab import VOCAB_DIR, load_vocab
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.errors import UserError
from mdaf_dist.files import MANIFEST_FILE, output_directory, published_directory, write_json, write_manifest
from mdaf_dist.models.embeddings import EMBEDDINGS_KEY
from mdaf_dist.models.registry import build_model
from mdaf_dist.serving.inputs import split_inputs
from mdaf_dist.serving.load import EXPORT_FILE, PROGRAM_FILE, WEIGHTS_FILE
from mdaf_dist.serving.program import INPUTS, TABLES, Int8Table, ServingModel
from mdaf_dist.train.evaluate import checkpoint_config, resolve_checkpoint
from mdaf_dist.train.metrics import exact_auc

QUANTIZATIONS = ("none", "int8")
OWNED = (PROGRAM_FILE, WEIGHTS_FILE, VOCAB_DIR, ckpt.CONFIG_FILE, EXPORT_FILE, MANIFEST_FILE)


def unsharded_model(path: Path, cfg: Config, vocab: Dict[str, int]) -> nn.Module:
    """The checkpoint's model with whole (plain) tables, in eval mode, read without a process
    group; its selective scan in the exportable reference backend."""
    model_cfg = dataclasses.replace(cfg.model, scan_backend="reference")
    model = build_model(model_cfg, vocab, embedding_backend="plain", seed=cfg.train.seed)
    ckpt.Checkpointer.load(path, model)
    return model.eval()


def int8_tables(model: nn.Module) -> Dict[str, Int8Table]:
    """The model's tables quantized by TorchRec's inference quantization, as plain modules."""
    from torchrec import EmbeddingCollection, EmbeddingConfig
    from torchrec.inference.modules import quantize_inference_model

    weights = {name: model.embeddings.embeddings[name].weight.detach() for name in TABLES}
    holder = nn.Module()
    holder.embeddings = EmbeddingCollection(
        tables=[EmbeddingConfig(name=name, num_embeddings=w.shape[0], embedding_dim=w.shape[1], feature_names=[name]) for name, w in weights.items()]
    )
    holder.embeddings.load_state_dict({f"embeddings.{name}.weight": w for name, w in weights.items()})
    quantized = quantize_inference_model(holder).embeddings
    tables: Dict[str, Int8Table] = {}
    for tbe in quantized._emb_modules:
        for spec, (rows, scale, bias) in zip(tbe.embedding_specs, tbe.split_embedding_weights_with_scale_bias(2)):
            tables[spec[0]] = Int8Table(rows.clone(), scale.contiguous().view(torch.float16).clone(), bias.contiguous().view(torch.float16).clone())
    return tables


def serving_model(model: nn.Module, raw_by_row: Dict[str, np.ndarray], quantize: str) -> ServingModel:
    """`model`'s dense part behind its tables (float or int8) and vocabulary lookups."""
    tables = int8_tables(model) if quantize == "int8" else {name: model.embeddings.embeddings[name] for name in TABLES}
    model.embeddings = None  # the tables are the served model's own
    vocabularies = {name: torch.tensor(raw_by_row[name][1:], dtype=torch.int64) for name in TABLES}
    return ServingModel(model, tables, vocabularies).eval()


def weights_of(served: ServingModel) -> Dict[str, torch.Tensor]:
    """The served model's weights under the checkpoint's state_dict keys (int8 tables as rows,
    `_qscale` and `_qbias`)."""
    weights = {key: value.contiguous() for key, value in served.model.state_dict().items()}
    for name, table in served.tables.items():
        key = f"{EMBEDDINGS_KEY}.{name}.weight"
        if isinstance(table, Int8Table):
            weights.update({key: table.weight, f"{key}_qscale": table.scale.flatten(), f"{key}_qbias": table.bias.flatten()})
        else:
            weights[key] = table.weight.detach().contiguous()
    return weights


def example_inputs(history_length: int, batch: int = 2) -> Dict[str, torch.Tensor]:
    return {
        "user": torch.ones(batch, dtype=torch.int64), "item": torch.ones(batch, dtype=torch.int64),
        "category": torch.ones(batch, dtype=torch.int64), "history": torch.ones(batch, history_length, dtype=torch.int64),
        "history_length": torch.full((batch,), history_length, dtype=torch.int64),
    }  # fmt: skip


def export_program(served: ServingModel, history_length: int) -> torch.export.ExportedProgram:
    """torch.export of the served model, the batch size dynamic."""
    batch = torch.export.Dim("batch", min=1)
    shapes = {name: {0: batch} for name in INPUTS}
    with torch.no_grad():
        return torch.export.export(served, (), example_inputs(history_length), dynamic_shapes=shapes)


@torch.no_grad()
def validation_auc(served: nn.Module, cfg: Config) -> Optional[float]:
    """AUC of the served model over the run's validation split (None without one)."""
    if not read_meta(cfg.data_dir).get("splits", {}).get("valid", {}).get("rows"):
        return None
    logits, labels = [], []
    for batch, inputs in split_inputs(cfg.data_dir, "valid", cfg.loader, cfg.model.history_length):
        logits.append(served(**inputs)["logit"])
        labels.append(batch.labels)
    return exact_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy())


def table_bytes(served: ServingModel) -> int:
    return sum(t.numel() * t.element_size() for t in served.tables.state_dict().values())


def export(checkpoint: str, out: str, quantize: str = "none", best: bool = False) -> Dict[str, Any]:
    """Write the export of a checkpoint (`resolve_checkpoint`) to `out`; returns export.json."""
    out_dir = output_directory(out, "--out")
    path = resolve_checkpoint(checkpoint, best)
    cfg = checkpoint_config(path)
    saved = ckpt.read_trainer_state(path)
    vocab = {name: int(size) for name, size in saved["vocab"].items()}
    raw_by_row = {}
    for name in TABLES:
        try:
            raw_by_row[name] = np.asarray(load_vocab(cfg.data_dir, name))
        except FileNotFoundError:
            raise UserError(f"{cfg.data_dir} has no {VOCAB_DIR}/{name}.npy: export needs the run's prepared data (give data_dir=PATH)") from None
        if len(raw_by_row[name]) != vocab[name]:
            raise UserError(f"{cfg.data_dir}/{VOCAB_DIR}/{name}.npy has {len(raw_by_row[name])} rows, the checkpoint's table {vocab[name]}: not the run's data")
    model = unsharded_model(path, cfg, vocab)
    if not hasattr(model, "from_embeddings"):
        raise UserError(f"model.name={cfg.model.name} cannot be exported: its class has no from_embeddings (the model after the table lookup)")
    history_length = cfg.model.history_length
    served = serving_model(model, raw_by_row, "none")
    info: Dict[str, Any] = {
        "checkpoint": str(path), "step": saved["step"], "metrics": saved.get("metrics"), "model": cfg.model.name,
        "inputs": list(INPUTS), "history_length": history_length, "quantize": quantize, "program": "torch.export",
        "table_bytes": table_bytes(served),
    }  # fmt: skip
    if quantize == "int8":
        float_auc = validation_auc(served, cfg)
        served = serving_model(unsharded_model(path, cfg, vocab), raw_by_row, "int8")
        int8_auc = validation_auc(served, cfg)
        info["float_table_bytes"], info["table_bytes"] = info["table_bytes"], table_bytes(served)
        info["valid_auc"] = {"float32": float_auc, "int8": int8_auc}
    program = export_program(served, history_length)
    with published_directory(out_dir, OWNED, MANIFEST_FILE) as staging:
        torch.export.save(program, str(staging / PROGRAM_FILE))
        save_file(weights_of(served), str(staging / WEIGHTS_FILE))
        (staging / VOCAB_DIR).mkdir()
        for name in TABLES:
            shutil.copyfile(Path(cfg.data_dir) / VOCAB_DIR / f"{name}.npy", staging / VOCAB_DIR / f"{name}.npy")
        (staging / ckpt.CONFIG_FILE).write_text(to_yaml(cfg))
        write_json(staging / EXPORT_FILE, info)
        write_manifest(staging)
    return info


def run(args: argparse.Namespace) -> int:
    info = export(args.checkpoint, args.out, args.quantize, args.best)
    print(f"exported {info['checkpoint']} (step {info['step']}) -> {args.out}: {PROGRAM_FILE} (torch.export), {WEIGHTS_FILE}, {VOCAB_DIR}/, {ckpt.CONFIG_FILE}")
    if args.quantize == "int8":
        auc = info["valid_auc"]
        change = "n/a (no validation split)" if auc["int8"] is None else f"{auc['float32']:.6f} -> {auc['int8']:.6f} ({auc['int8'] - auc['float32']:+.6f})"
        print(f"int8 tables: {info['table_bytes']:,} bytes ({info['table_bytes'] / info['float_table_bytes']:.3f} of float32's {info['float_table_bytes']:,}); validation AUC {change}")
    return 0

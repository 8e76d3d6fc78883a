"""`mdaf describe`: print a model, its parameter count per part, and the paper's own breakdown.

The tables are built on the meta device, so describing the full-size model (330M embedding
parameters at D = 64) allocates no memory.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mdaf_dist.config import ModelConfig, load_config
from mdaf_dist.data.layout import read_meta
from mdaf_dist.errors import UserError
from mdaf_dist.models.registry import build_model

# Taobao UserBehavior: distinct users, items, categories, plus the padding row 0
TAOBAO_VOCAB = {"user": 987_994 + 1, "item": 4_162_024 + 1, "category": 9_439 + 1}

# top-level attribute -> part of the model, for MDAF and the models that share its names
PARTS = {
    "embeddings": "embeddings",
    "static_norm": "static branch",
    "static": "static branch",
    "sequence": "sequential branch",
    "fusion": "gate / fusion",
    "head": "head",
}

# MDAF_paper.md 4.6; the total is quoted exactly, the parts are rounded as printed there
PAPER_MDAF = [
    ("embeddings", 30_000_000),
    ("static branch", 8_000_000),
    ("sequential branch", 6_000_000),
    ("gate / fusion", 8_000),
    ("head", 2_000_000),
    ("total", 45_969_365),
]

PAPER_NOTES = """\
Why the counts cannot agree with the paper's 4.6 (figures for the paper's sizes, D = 64):
- embeddings: D = 64 rows of the full vocabulary are ~5.16M x 64 = ~330M parameters. The paper's
  ~30M is ~470K rows: a subsampled vocabulary (its filtered data keeps about 1% of the users),
  so pass --vocab or --data-dir to count the tables of the data you train on.
- static branch: 2 LCN + 2 ECN layers on a 3D = 192 input are 4 x (192 x 192) weights plus a
  384 -> 64 projection, ~0.17M; ~8M would need layers about 7x wider than 3D.
- sequential branch: one Mamba block (d_inner 128, N 32) and a 64 -> 256 -> 64 FFN are ~0.07M,
  not ~6M.
- head: D -> D -> 1 at D = 64 is 4,225 parameters, not ~2M.
- gate: 2D -> D -> 1 is 8,321 parameters: the one part that matches (~8K).
The paper's parts sum to ~46M only through the embeddings; its layer sizes (5.1.4) and its
parameter counts cannot both hold."""


def parse_vocab(text: str) -> Dict[str, int]:
    """'user=N,item=N,category=N' -> dict; sizes count rows, padding row included."""
    vocab: Dict[str, int] = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise UserError(f"--vocab wants user=N,item=N,category=N, got {part!r}")
        vocab[name.strip()] = int(value)
    missing = {"user", "item", "category"} - vocab.keys()
    if missing:
        raise UserError(f"--vocab lacks {', '.join(sorted(missing))}")
    return vocab


def vocab_from_data_dir(data_dir: str) -> Dict[str, int]:
    meta = read_meta(data_dir)
    if "vocab" not in meta:
        raise UserError(f"{data_dir}/meta.json has no 'vocab' sizes")
    return {name: int(meta["vocab"][name]) for name in ("user", "item", "category")}


def count_parts(model: nn.Module) -> List[Tuple[str, int]]:
    """Parameters per part, in the order the parts first appear, then the total."""
    counts: Dict[str, int] = {}
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n:
            part = PARTS.get(name, name)
            counts[part] = counts.get(part, 0) + n
    return list(counts.items()) + [("total", sum(p.numel() for p in model.parameters()))]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dlf_layer_formula(cfg: ModelConfig) -> Tuple[str, int]:
    """DLF_paper.md's matrices for one layer, R = 3 tokens of width d = D, a = NAF rounds:
    W_LI, W_CI (R d), W_LO, W_CO, W_D, W_Gate (d^2), b_L, b_C, b_D (d); per round f_att (3d^2 + 3d)
    and W^C_M, b^C_M for three blocks (3 (2d^2 + d)); W_F, b_F (3d^2 + d); our W_Z, b_Z (4d^2 + d);
    the LayerNorm (2d) where dlf_layer_norm is on."""
    d, a = cfg.embedding_dim, cfg.dlf_attention_layers
    formula, n = "2Rd+11d^2+5d+a(9d^2+6d), R=3 d=D", 2 * 3 * d + 11 * d * d + 5 * d + a * (9 * d * d + 6 * d)
    if cfg.dlf_layer_norm:
        formula, n = formula + " + LN 2d", n + 2 * d
    return formula, n


def fusion_formula(cfg: ModelConfig) -> Tuple[str, int]:
    """The token fusions (models/fusion.py): cross_attention, per direction an attention
    (4D^2 + 4D) and a LayerNorm (2D), then W (2D^2 + D); dlf_naf, NAF of two blocks (7D^2 + 6D)."""
    d = cfg.embedding_dim
    if cfg.fusion == "dlf_naf":
        return "7D^2+6D (f_att, 2 W^C, W_F)", 7 * d * d + 6 * d
    directions = 2 if cfg.cross_attention_direction == "both" else 1
    return f"{directions}(4D^2+6D)+2D^2+D (attention, LN, W)", directions * (4 * d * d + 6 * d) + 2 * d * d + d


def reference_formulas(cfg: ModelConfig, model: nn.Module) -> List[Tuple[str, int, str, int]]:
    """(module, our parameters, the count its paper's equations give, that count) for the modules
    laid out as a reference publishes them: AutoInt's interacting layer, BST's block, the
    published DCNv3's cross layer, DLF's layer, the token fusions. Empty for the other models."""
    dim = cfg.embedding_dim
    rows = []
    if cfg.name == "dlf" or (cfg.name == "mdaf" and cfg.static_branch == "dlf"):
        layers = model.dlf.layers if cfg.name == "dlf" else model.static.dlf.layers
        rows.append((f"DLF layer x{len(layers)}", _count(layers[0]), *dlf_layer_formula(cfg)))
    if cfg.name == "mdaf" and cfg.sequence_branch != "none" and cfg.fusion in ("cross_attention", "dlf_naf"):
        rows.append((f"{cfg.fusion} fusion", _count(model.fusion), *fusion_formula(cfg)))
    if rows:
        return rows
    if cfg.name == "autoint":
        return [(f"interacting layer x{cfg.autoint_layers}", _count(model.layers[0]), "4D^2 (W_Q, W_K, W_V, W_Res)", 4 * dim * dim)]
    if cfg.name == "bst":
        m = 2 * dim
        return [
            ("positions", _count(model.positions), "(L+1)D", (cfg.history_length + 1) * dim),
            (f"transformer block x{cfg.bst_blocks}", _count(model.blocks[0]), "6m^2+10m, m=2D (MH 4m^2+4m, FFN 2m^2+2m, 2 LN)", 6 * m * m + 10 * m),
        ]
    layers = [*model.static.lcn, *model.static.ecn] if cfg.name == "mdaf" and cfg.static_branch == "dcnv3_official" else []
    if layers:
        d = 3 * dim
        formula, n = "d^2/2+2d, d=3D (W d x d/2, b, LN(d/2))", d * d // 2 + 2 * d
        if cfg.dcnv3_batch_norm:
            formula, n = formula + " + BN 2", n + 2
        return [(f"cross layer x{len(layers)}", _count(layers[0]), formula, n)]
    return []


def describe(cfg: ModelConfig, vocab: Dict[str, int]) -> str:
    model = build_model(cfg, vocab, embedding_backend="plain", embedding_device=torch.device("meta"))
    lines = [str(model), "", f"vocab: {vocab}", ""]
    ours = count_parts(model)
    paper: Optional[Dict[str, int]] = dict(PAPER_MDAF) if cfg.name == "mdaf" else None
    header = f"{'part':<20}{'parameters':>15}" + (f"{'paper (4.6)':>15}" if paper else "")
    lines.append(header)
    for part, n in ours:
        paper_col = f"{paper[part]:>15,}" if paper and part in paper else ("" if not paper else f"{'-':>15}")
        lines.append(f"{part:<20}{n:>15,}{paper_col}")
    formulas = reference_formulas(cfg, model)
    if formulas:
        lines += ["", f"{'module':<24}{'parameters':>12}  {'from the reference':<48}{'formula':>10}"]
        lines += [f"{name:<24}{ours:>12,}  {formula:<48}{n:>10,}" for name, ours, formula, n in formulas]
    if paper:
        lines += ["", PAPER_NOTES]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.vocab:
        vocab = parse_vocab(args.vocab)
    elif args.data_dir:
        vocab = vocab_from_data_dir(args.data_dir)
    else:
        vocab = dict(TAOBAO_VOCAB)
    try:
        print(describe(cfg.model, vocab))
    except ValueError as e:  # an unknown model, branch or fusion name in the config
        raise UserError(str(e)) from None
    return 0

"""Load an export (`mdaf export`) and score raw-id batches with it, in plain PyTorch: this module
imports torch, the standard library and the project's file helpers only, never torchrec, the
models or torch.distributed's process groups.

    model = load_export("EXPORT_DIR")
    out = model(user=..., item=..., category=..., history=..., history_length=...)
    out["probability"]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mdaf_dist.errors import UserError
from mdaf_dist.files import read_json, verify_manifest

PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "weights.safetensors"
EXPORT_FILE = "export.json"


def load_export(path: str | Path) -> nn.Module:
    """The export's program as a module (see serving/program.py for its inputs and outputs),
    its files verified against the manifest first; its parameters need no gradient."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"no export at {path}: expected a directory written by `mdaf export`")
    verify_manifest(root, "export")
    return torch.export.load(str(root / PROGRAM_FILE)).module().requires_grad_(False)


def export_info(path: str | Path) -> dict:
    """export.json: the checkpoint, step, history length, quantization and sizes of an export."""
    return read_json(Path(path) / EXPORT_FILE, "an export's description")

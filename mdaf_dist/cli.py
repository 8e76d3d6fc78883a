"""`mdaf` console script. Each subcommand lives in the module that owns the concept; that module
provides `configure_parser(parser)` and `run(args) -> int`, and is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from mdaf_dist.errors import UserError, one_line

# command -> (module, one-line help)
COMMANDS = {
    "synth": ("mdaf_dist.data.synth", "write synthetic UserBehavior-format CSV"),
    "prepare": ("mdaf_dist.data.prepare", "raw UserBehavior CSV -> events + CTR samples"),
    "describe": ("mdaf_dist.models.describe", "print a model and its parameter counts"),
    "train": ("mdaf_dist.train.main", "train in this process (torchrun/TorchX: python -m mdaf_dist.train)"),
    "evaluate": ("mdaf_dist.train.evaluate", "evaluate a checkpoint on the validation split"),
    "predict": ("mdaf_dist.analysis.predict", "per-sample predictions of a checkpoint -> Parquet (one part per rank)"),
    "export": ("mdaf_dist.serving.export", "a checkpoint -> a self-contained export for serving (torch.export program, safetensors)"),
    "analyze": ("mdaf_dist.analysis.analyze", "the paper's gate and training tables of one trained model"),
    "profile": ("mdaf_dist.analysis.profile", "parameters, memory, time, FLOPs per component (Tables 8, C1)"),
    "demo": ("mdaf_dist.demo", "synthetic data -> prepare -> train: the README's main job"),
    "study": ("mdaf_dist.studies.command", "many runs from a study file (run), their tables and plots (report)"),
}


def _usage() -> str:
    lines = ["usage: mdaf COMMAND [options]   (mdaf COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        print(_usage(), file=sys.stdout if wants_help else sys.stderr)
        if argv and not wants_help:
            print(f"\nmdaf: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if wants_help else 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mdaf {name}", description=help_text)
    module.configure_parser(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (UserError, OSError) as e:
        # bad input or a file system that refused: one line (an OSError's message may span many)
        print(f"mdaf {name}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

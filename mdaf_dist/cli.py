"""`mdaf` console script.

Every subcommand's arguments are declared here, by a `configure` function that imports nothing
(so `mdaf COMMAND --help` answers at once, without torch); its handler, `run(args) -> int` in the
module that owns the concept, is imported only when the command runs. A new command is one
`_command` entry: its help, its configure function, and "module:function" of its handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from mdaf_dist import log
from mdaf_dist.errors import UserError, one_line

Parser = argparse.ArgumentParser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth reading (not None, False or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "", argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[Parser], None]
    # "module:function", imported when the command runs
    handler: str


COMMANDS: Dict[str, Command] = {}


def _command(name: str, help: str, handler: str) -> Callable[[Callable[[Parser], None]], Callable[[Parser], None]]:
    def register(configure: Callable[[Parser], None]) -> Callable[[Parser], None]:
        COMMANDS[name] = Command(help, configure, handler)
        return configure

    return register


def _config_args(parser: Parser, what: str, example: str) -> None:
    parser.add_argument("--config", action="append", help=f"YAML config file{what}; repeat to overlay files in order")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


def _checkpoint_args(parser: Parser, alternative: Optional[Tuple[str, str]] = None, what: str = "") -> None:
    """--checkpoint (`what` ends its help) and --best; with `alternative` (an option and its help),
    exactly one of --checkpoint and that option."""
    source = parser.add_mutually_exclusive_group(required=True) if alternative else parser
    source.add_argument("--checkpoint", required=alternative is None, help=f"a checkpoint directory, or a folder of them (latest){what}")
    if alternative:
        source.add_argument(alternative[0], help=alternative[1])
    parser.add_argument("--best", action="store_true", help="with a folder of checkpoints: the best by validation AUC")


@_command("synth", "write synthetic UserBehavior-format CSV", "mdaf_dist.data.synth:run")
def _synth(parser: Parser) -> None:
    parser.add_argument("--out", help="output CSV path or URI (.csv, or .csv.gz for gzip)")
    parser.add_argument("--rows", type=int, help="number of rows to write")
    parser.add_argument("--seed", type=int, default=42, help="generator seed; with --stats, the seed of the user samples")
    parser.add_argument("--users", type=int, default=None, help="None: rows x the real file's users/rows")
    parser.add_argument("--items", type=int, default=None, help="None: the real file's item count")
    parser.add_argument("--categories", type=int, default=None, help="None: the real file's category count")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--stats", metavar="FILE", help="instead of writing: print FILE's statistics beside the real data set's")


@_command("prepare", "raw UserBehavior CSV -> events + CTR samples", "mdaf_dist.data.prepare:run")
def _prepare(parser: Parser) -> None:
    parser.add_argument("--input", help="raw UserBehavior CSV (plain, gzip, bzip2, xz, zstd or zip; local path or fsspec URI)")
    parser.add_argument("--out", help="output directory (prepared-data layout; a local path or file:// URI)")
    parser.add_argument("--quiet", action="store_true", help="no progress output (the stage table is still printed)")
    whole = parser.add_mutually_exclusive_group()
    whole.add_argument("--partition", metavar="I/N", help="prepare only partition I of N (one task of an array job) into DIR.partitions/")
    whole.add_argument("--merge", action="store_true", help="join the N partitions of DIR.partitions/ into DIR")
    _config_args(parser, " (its prepare: section and model.history_length)", "prepare.neg_ratio=2 prepare.user_fraction=0.01")


@_command("config", "every setting with its value, default and meaning", "mdaf_dist.config_show:run")
def _config(parser: Parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{show}")
    show = sub.add_parser("show", help="print every setting: resolved value, default, meaning", formatter_class=_DefaultsFormatter)
    _config_args(show, "", "model.fusion=concat train.lr=1e-3")


@_command("describe", "print a model and its parameter counts", "mdaf_dist.models.describe:run")
def _describe(parser: Parser) -> None:
    _config_args(parser, " (its model: section is described)", "model.fusion=concat")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--vocab", help="table sizes user=N,item=N,category=N (None: full Taobao)")
    source.add_argument("--data-dir", help="a prepared data directory whose meta.json gives the sizes")


@_command("train", "train in this process (torchrun/TorchX: python -m mdaf_dist.train)", "mdaf_dist.train.main:run")
def _train(parser: Parser) -> None:
    parser.add_argument("--embedding-backend", choices=("torchrec", "plain"), default="torchrec", help="plain: unsharded reference, one process")
    _config_args(parser, " (e.g. configs/smoke.yaml)", "train.max_epochs=1 sharding.tables.item=row_wise")


@_command("evaluate", "evaluate a checkpoint on the validation split", "mdaf_dist.train.evaluate:run")
def _evaluate(parser: Parser) -> None:
    _checkpoint_args(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the saved config, e.g. data_dir=PATH train.device=cpu")


@_command("predict", "per-sample predictions of a checkpoint or an export -> Parquet (one part per rank)", "mdaf_dist.analysis.predict:run")
def _predict(parser: Parser) -> None:
    _checkpoint_args(parser, ("--model", "an export directory (`mdaf export`): scored in this process, no process group"))
    parser.add_argument("--split", default="valid", help="valid, test or train")
    parser.add_argument("--data", help="a prepared directory to score (None: the training run's); ids unseen in training score as padding")
    parser.add_argument("--out", required=True, help="predictions directory, e.g. preds.parquet (one part file per rank)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the saved config, e.g. train.device=cpu loader.eval_batch_size=8192")


@_command("export", "a checkpoint -> a self-contained export for serving (torch.export program, safetensors)", "mdaf_dist.serving.export:run")
def _export(parser: Parser) -> None:
    _checkpoint_args(parser)
    parser.add_argument("--out", required=True, help="the export directory to write")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="int8: the tables quantized by TorchRec (row-wise int8)")


@_command("analyze", "the paper's gate and training tables of one trained model", "mdaf_dist.analysis.analyze:run")
def _analyze(parser: Parser) -> None:
    _checkpoint_args(parser, ("--predictions", "predictions written by `mdaf predict`"), ": scores --split first")
    parser.add_argument("--split", default="valid", help="with --checkpoint: the split to score")
    parser.add_argument("--results", help="the run's results.json, for Table 7 (None: RUN/results.json beside the checkpoints, else the checkpoint's records)")
    parser.add_argument("--out", help="output folder (None: RUN/analysis, or beside the predictions)")
    parser.add_argument("overrides", nargs="*", help="with --checkpoint: dotted overrides of the saved config")


@_command("profile", "parameters, memory, time, FLOPs per component (Tables 8, C1)", "mdaf_dist.analysis.profile:run")
def _profile(parser: Parser) -> None:
    parser.add_argument("--vocab", help="table sizes user=N,item=N,category=N (None: the data_dir's)")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes timed for latency")
    parser.add_argument("--out", help="write the tables here too (Markdown + JSON)")
    _config_args(parser, " (model, batch sizes, lr)", "data_dir=PATH loader.eval_batch_size=1024 train.device=cpu")


@_command("compare", "one table of metrics, differing settings and wall time across runs and studies", "mdaf_dist.studies.compare:run")
def _compare(parser: Parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_STUDY", help="training run directories (results.json) and study directories (their cells)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="table format")


@_command("demo", "synthetic data -> prepare -> train: the README's main job", "mdaf_dist.demo:run")
def _demo(parser: Parser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="working directory")
    parser.add_argument("--rows", type=int, default=120_000, help="synthetic rows to generate")
    parser.add_argument("--config", default="configs/demo.yaml", help="training config")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (CPU ranks)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic data")


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options stand between the study file and the overrides (`run S.yaml --out D k=v`):
    plain argparse takes both positionals at once, before the options."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


@_command("study", "many runs from a study file (run), their tables and plots (report)", "mdaf_dist.studies.command:run")
def _study(parser: Parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{run,report}", parser_class=_IntermixedParser)
    run_p = sub.add_parser("run", help="prepare the data and train every cell of a study (resumable)", formatter_class=_DefaultsFormatter)
    run_p.add_argument("study", help="study file, e.g. configs/studies/table3_ablations.yaml")
    run_p.add_argument("--out", required=True, help="the study's directory (created; a re-run resumes it)")
    run_p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler: local_cwd, slurm, kubernetes, ...")
    run_p.add_argument("--scheduler-args", default="", help="the scheduler's options as `torchx run -cfg` takes them, e.g. partition=gpu,time=4:00:00")
    run_p.add_argument("--resources", default="", help="what each rank asks the scheduler for, over the study file's, e.g. cpu_per_rank=4,memMB_per_rank=8192,gpu_per_rank=1")
    run_p.add_argument("--pending-timeout", type=float, default=300.0, metavar="SECONDS", help="fail a job pending this long for a reason that does not clear by waiting (e.g. PartitionConfig)")
    run_p.add_argument("--max-parallel", type=int, default=1, help="cells running at once")
    run_p.add_argument("--dryrun", action="store_true", help="print each cell's job as the scheduler would get it; run and write nothing")
    run_p.add_argument("overrides", nargs="*", help="dotted overrides for every cell, e.g. prepare.input=UserBehavior.csv.zip train.max_epochs=3")
    report_p = sub.add_parser("report", help="the study's tables beside the paper's numbers, and its plots", formatter_class=_DefaultsFormatter)
    report_p.add_argument("dir", help="a study directory written by `mdaf study run`")
    report_p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="what to print (both are written to DIR/report)")


def _usage() -> str:
    lines = ["usage: mdaf COMMAND [options]   (mdaf COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def parser_for(name: str) -> Parser:
    """The argument parser of command `name`; builds without importing its handler."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"mdaf {name}", description=command.help, formatter_class=_DefaultsFormatter)
    command.configure(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        print(_usage(), file=sys.stdout if wants_help else sys.stderr)
        if argv and not wants_help:
            print(f"\nmdaf: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if wants_help else 2
    name = argv[0]
    args = parser_for(name).parse_args(argv[1:])
    log.configure()
    try:
        module_name, function = COMMANDS[name].handler.split(":")
        return int(getattr(importlib.import_module(module_name), function)(args) or 0)
    except (UserError, OSError) as e:
        # bad input or a file system that refused: one line (an OSError's message may span many)
        print(f"mdaf {name}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

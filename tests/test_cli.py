"""The CLI explains itself: every --help answers without importing torch, shows defaults, and
`mdaf config show` lists every setting with its value, default and meaning."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from mdaf_dist import cli
from mdaf_dist.config import Config


def _subcommands():
    """Every command and every sub-action (study run, config show, ...), found from the parsers."""
    for name in cli.COMMANDS:
        yield [name]
        for action in cli.parser_for(name)._actions:
            if isinstance(action, cli.argparse._SubParsersAction):
                yield from ([name, sub] for sub in action.choices)


SUBCOMMANDS = list(_subcommands())


def test_the_subcommands_are_found():
    assert ["train"] in SUBCOMMANDS and ["study", "run"] in SUBCOMMANDS and ["config", "show"] in SUBCOMMANDS


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_help_imports_nothing_heavy(words):
    code = (
        "import sys\nfrom mdaf_dist import cli\n"
        f"try:\n    cli.main({[*words, '--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'torchrec', 'pyarrow', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert f"usage: mdaf {' '.join(words)}" in done.stdout


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["study", "run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "TorchX scheduler: local_cwd, slurm, kubernetes, ... (default: local_cwd)" in out
    assert "cells running at once (default: 1)" in out


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_config_show_lists_every_setting_with_value_default_and_meaning(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  fusion: concat\n")
    assert cli.main(["config", "show", "--config", str(path), "train.lr=0.002"]) == 0
    rows = [line.split(None, 3) for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["key", "value", "default", "meaning"]
    shown = {row[0]: row[1:] for row in rows[1:]}
    assert list(shown) == list(_keys(Config))
    assert shown["model.fusion"][:2] == ["'concat'", "'gate'"] and shown["train.lr"][:2] == ["0.002", "0.0005"]
    assert shown["loader.batch_size"] == ["2048", "2048", "training samples per batch and rank"]
    # the first clause of the comment above the field; a "; " inside parentheses does not end it
    assert shown["prepare.neg_ratio"][2] == "negatives per positive"
    assert shown["prepare.input"][2] == "raw UserBehavior CSV (plain, gzip, bzip2, xz, zstd or zip; local path or fsspec URI)"
    assert all(len(row) == 3 and row[2] for row in shown.values()), [key for key, row in shown.items() if len(row) < 3]


def test_config_show_refuses_a_bad_setting_in_one_line(capsys):
    assert cli.main(["config", "show", "model.fusion=concatt"]) == 2
    assert capsys.readouterr().err == "mdaf config: error: model.fusion='concatt' is not one of: gate, concat, fixed, attention, cross_attention, dlf_naf, optfusion\n"

"""`mdaf config show`: every setting with its resolved value, its default and what it means.

The meanings are the comments right above the fields in mdaf_dist/config.py, read from its
source, so that they are written once, where the setting is.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from typing import Any, Dict, Iterator, List, Tuple

from mdaf_dist import config
from mdaf_dist.config import Config, load_config

# longest meaning printed; the comment in config.py has the rest
MEANING_CHARS = 100


def field_comments() -> Dict[Tuple[str, str], str]:
    """(class name, field name) -> the comment block above the field, as one line."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    comments: Dict[Tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if not isinstance(statement, ast.AnnAssign):
                continue
            block: List[str] = []
            row = statement.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                block.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            comments[(node.name, statement.target.id)] = " ".join(block)
    return comments


def settings(cfg: Any, defaults: Any, prefix: str = "") -> Iterator[Tuple[str, Any, Any, str]]:
    """(dotted key, value, default, class name) of every leaf setting, in declaration order."""
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            yield from settings(value, default, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, default, type(cfg).__name__


def one_line_meaning(comment: str) -> str:
    """The comment's first clause (up to a "; " outside parentheses), cut to MEANING_CHARS."""
    depth, first = 0, comment
    for i, char in enumerate(comment):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and comment.startswith("; ", i):
            first = comment[:i]
            break
    return first if len(first) <= MEANING_CHARS else first[: MEANING_CHARS - 3] + "..."


def table(cfg: Config) -> str:
    comments = field_comments()
    rows = [("key", "value", "default", "meaning")]
    for key, value, default, owner in settings(cfg, Config()):
        rows.append((key, _show(value), _show(default), one_line_meaning(comments.get((owner, key.rsplit(".", 1)[-1]), ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows).rstrip()


def _show(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def run(args: argparse.Namespace) -> int:
    print(table(load_config(args.config, args.overrides)))
    return 0

"""A table as the analysis commands print and save it: Markdown for reading, JSON for tools.

Ours and the paper's numbers sit in columns of the same row, so every table reads as a
comparison; a missing value (an empty group, an epoch the paper did not run) is "-".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

from mdaf_dist.files import write_json


@dataclass
class Table:
    key: str  # "table4", "tableB1", ...: the JSON key and the paper's numbering
    title: str
    columns: List[str]
    rows: List[List[Any]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", markdown_table(self.columns, [[format_cell(cell) for cell in row] for row in self.rows])]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": [dict(zip(self.columns, row)) for row in self.rows], "note": self.note}


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table of cells already formatted as text."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_tables(tables: Sequence[Table], out_dir: Path, name: str, heading: str) -> str:
    """OUT/NAME.md and OUT/NAME.json; returns the Markdown."""
    text = "\n\n".join([f"## {heading}"] + [table.markdown() for table in tables]) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(text)
    write_json(out_dir / f"{name}.json", {t.key: t.to_json() for t in tables})
    return text

"""The one way sdiff writes a markdown (pipe) table: reports, the CLI's tables, benchmark
summaries. Cells are formatted with ``str`` (floats with ``floatfmt`` when given), ``|`` is
escaped, and columns are padded to a common width so the file also reads as plain text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["markdown_table"]


def markdown_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    floatfmt: str | None = None,
    right: Iterable[int] = (),
) -> str:
    """A pipe table with a header row; ``right`` lists the columns to right-align (numbers).
    None becomes an empty cell. Ends with a newline."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if floatfmt is not None and isinstance(value, float):
            value = format(value, floatfmt)
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = [cell(c) for c in columns]
    body = [[cell(v) for v in row] for row in rows]
    for row in body:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}: {row}")
    widths = [max(3, len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    right = set(right)

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]  # fmt: skip
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"  # fmt: skip
    return "\n".join([line(header), rule, *map(line, body)]) + "\n"

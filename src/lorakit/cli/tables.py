"""Plain-text tables for the verbs that print one (no verb of its own)."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """Columns padded to their widest cell; ``align`` one char per column, ``l`` or ``r`` (default: l then r)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

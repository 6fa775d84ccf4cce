"""Paste-ready LaTeX tables: a `table` float with `\\caption`, `\\label`, booktabs rules and the notes as a
wrapped paragraph under the tabular (`threeparttable`'s `tablenotes`), every text escaped.

Needs `\\usepackage{booktabs,threeparttable}` in the document's preamble (stated in the first line of
every emitted table). Best value of a column in bold, second best underlined, as papers do.
"""

from __future__ import annotations

import math
from typing import Sequence

PREAMBLE = r"\usepackage{booktabs,threeparttable}"

_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
             # < > | print as other glyphs (¡ ¿ —) under the default OT1 font encoding
             "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
# the non-ASCII characters textseg's own texts use; anything else becomes "?" (pdflatex would stop on it)
_UNICODE = {"±": r"$\pm$", "–": "--", "—": "---", "×": r"$\times$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
            "≥": r"$\geq$", "≤": r"$\leq$", "→": r"$\rightarrow$", "²": r"$^2$", "³": r"$^3$", "µ": r"$\mu$",
            "Δ": r"$\Delta$", "✓": r"\checkmark{}", "✗": r"$\times$", "…": r"\ldots{}", "’": "'", "‘": "`",
            "“": "``", "−": "$-$", "”": "''", "·": r"$\cdot$", "≈": r"$\approx$", "′": "'", "é": r"\'e", "ü": r"\"u"}
_ARROWS = {"->": r"$\rightarrow$", "<-": r"$\leftarrow$", "<=": r"$\leq$", ">=": r"$\geq$"}


def latex_escape(text: object) -> str:
    """Plain text → LaTeX that pdflatex renders as written (specials, `->`, `<`, known Unicode)."""
    s, out, i = str(text), [], 0
    while i < len(s):
        pair = s[i:i + 2]
        if pair in _ARROWS:
            out.append(_ARROWS[pair])
            i += 2
            continue
        ch = s[i]
        if ch in _SPECIALS:
            out.append(_SPECIALS[ch])
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append(_UNICODE.get(ch, "?"))
        i += 1
    return "".join(out)


def rank_marks(values: Sequence[float], higher_is_better: bool) -> list[str | None]:
    """Per value: "best", "second" or None, comparing at the printed precision (2 decimals). Ties share a
    mark; nothing is marked with fewer than two finite values, no "second" with fewer than three rows."""
    finite = [round(v, 2) for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return [None] * len(values)
    distinct = sorted(set(finite), reverse=higher_is_better)
    best = distinct[0]
    second = distinct[1] if len(distinct) > 1 and len(finite) > 2 else None
    marks: list[str | None] = []
    for v in values:
        r = round(v, 2) if v is not None and math.isfinite(v) else None
        marks.append("best" if r is not None and r == best else "second" if r is not None and r == second else None)
    return marks


def mark_latex(cell: str, mark: str | None) -> str:
    return rf"\textbf{{{cell}}}" if mark == "best" else rf"\underline{{{cell}}}" if mark == "second" else cell


def mark_markdown(cell: str, mark: str | None) -> str:
    return f"**{cell}**" if mark == "best" else f"_{cell}_" if mark == "second" else cell


def latex_label(text: str) -> str:
    """A \\label key from free text (letters, digits, - : . only)."""
    key = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-:.") else "-" for ch in str(text).lower())
    return "-".join(p for p in key.split("-") if p) or "results"


def latex_table(head_rows: Sequence[str], colspec: str, body: Sequence[Sequence[str]], notes: Sequence[str], *,
                caption: str, label: str, breaks: Sequence[int] = (), groups: dict[int, str] | None = None,
                size: str = r"\footnotesize") -> str:
    """The float. `head_rows` and `body` cells are LaTeX already; `caption` and `notes` are plain text
    (escaped here). `breaks`: body row indices before which a \\midrule separates groups; `groups`: body row
    index → a group title (plain text) set on its own spanning row there (after a \\midrule)."""
    lines = [f"% needs {PREAMBLE}", r"\begin{table}[t]", r"\centering", size, r"\setlength{\tabcolsep}{3pt}",
             rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{latex_label(label)}}}",
             r"\begin{threeparttable}", rf"\begin{{tabular}}{{{colspec}}}", r"\toprule"]
    lines += list(head_rows)
    lines.append(r"\midrule")
    ncol = len(body[0]) if body else 1
    for i, cells in enumerate(body):
        if (i in breaks or i in (groups or {})) and i > 0:
            lines.append(r"\midrule")
        if i in (groups or {}):
            lines.append(rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{latex_escape(groups[i])}}}}} \\")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines.append(r"\begin{tablenotes}[flushleft]")
        lines += [rf"\item {latex_escape(n)}" for n in notes]
        lines.append(r"\end{tablenotes}")
    lines += [r"\end{threeparttable}", r"\end{table}"]
    return "\n".join(lines) + "\n"

"""Evaluation post-processing that belongs to a method's protocol (docs/fidelity.md, "Policy").

When a method's official test script keeps the largest connected component (LCC) by default (its class's
`protocol_lcc` names that line: DTC, BCP, Text-SemiSeg), `textseg eval RUN` does the same for that method's runs
unless `--no-lcc` is given; `--lcc` forces it on for any method. The choice and its source are recorded in
meta.json (`lcc`, `lcc_source`) and in every results table.
"""

from __future__ import annotations

from textseg_cli.methods.registry import protocol_lcc


def resolve_lcc(flag: bool | None, method_name: str | None) -> tuple[bool, str]:
    """(apply LCC?, why): an explicit `--lcc`/`--no-lcc` wins, else the method's protocol, else off."""
    if flag is not None:
        return bool(flag), "--lcc" if flag else "--no-lcc"
    source = protocol_lcc(method_name)  # the method class's `protocol_lcc` (the official line), "" when none
    if source:
        return True, f"method protocol: {source}"
    return False, "default (the method's official test script does not apply LCC)"

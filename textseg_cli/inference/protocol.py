"""Evaluation post-processing that belongs to a method's protocol (docs/fidelity.md, "Policy").

When a method's official test script keeps the largest connected component (LCC) by default, `textseg eval RUN`
does the same for that method's runs unless `--no-lcc` is given; `--lcc` forces it on for any method. The
choice and its source are recorded in meta.json (`lcc`, `lcc_source`) and in every results table.
"""

from __future__ import annotations

# method name → the official line that makes LCC part of its evaluation
PROTOCOL_LCC: dict[str, str] = {
    "dtc": "HiLab-git/DTC code/test_LA.py:15 (--nms default 1)",
    "bcp": "DeepMed-Lab-ECNU/BCP code/test_LA.py:15 (--nms default 1)",
    "text-semiseg": "taozh2017/Text-SemiSeg prediction.py:139-140 (LCC always applied)",
}


def resolve_lcc(flag: bool | None, method_name: str | None) -> tuple[bool, str]:
    """(apply LCC?, why): an explicit `--lcc`/`--no-lcc` wins, else the method's protocol, else off."""
    if flag is not None:
        return bool(flag), "--lcc" if flag else "--no-lcc"
    source = PROTOCOL_LCC.get(str(method_name or ""))
    if source:
        return True, f"method protocol: {source}"
    return False, "default (the method's official test script does not apply LCC)"

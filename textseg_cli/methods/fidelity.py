"""Where each method's fidelity to its paper and official code is documented (`textseg models --fidelity`).

The ledger itself is docs/fidelity.md (baselines, text-guided methods, LViT's U-Net); each method class points
there with its `official_code`, `official_commit` (the commit the parity tests in tests/parity were written
against) and `ledger` (its section) class attributes, so a new method brings its own row. A default that is
textseg's reading rather than the official code (Text-SemiSeg's TMR; every choice of the paper-only methods
LLM-SegNet and TGC-Net) is marked *Interpretation* in its section, with the switch to the other reading.
"""

from __future__ import annotations

from typing import Iterable

from textseg_cli.methods.registry import method_class
from textseg_cli.methods.text_addon import TextAddon

ADDON_NAME = "+text"  # the "+Text" add-on (`--text tmr+csa`): not a method of its own, but it has a ledger section


def fidelity_rows(method_names: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(method, official code, commit, ledger) for each method name, read from the method classes
    (`ADDON_NAME` gives the text add-on's row)."""
    rows = []
    for name in method_names:
        cls = TextAddon if name == ADDON_NAME else method_class(name)
        if cls is None or not cls.official_code:
            rows.append((name, "not in the ledger", "", "docs/fidelity.md"))
        else:
            rows.append((name, cls.official_code, cls.official_commit, cls.ledger or "docs/fidelity.md"))
    return rows

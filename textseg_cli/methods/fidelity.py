"""Where each method's fidelity to its paper and official code is documented (`textseg models --fidelity`).

The ledger itself is docs/fidelity.md (baselines, text-guided methods, LViT's U-Net); this table only
points there, with the official repository and commit the parity tests (tests/parity) were written against.
"""

from __future__ import annotations

# method → (official code, commit checked, ledger section)
LEDGER: dict[str, tuple[str, str, str]] = {
    "sup": ("yulequan/UA-MT (code/train_LA.py)", "88ed29a", "docs/fidelity.md#supervised-only-sup"),
    "mcnet": ("ycwu1997/MC-Net", "fee453c", "docs/fidelity.md#mc-net-and-mc-net-mcnet-mcnet"),
    "mcnet+": ("ycwu1997/MC-Net", "fee453c", "docs/fidelity.md#mc-net-and-mc-net-mcnet-mcnet"),
    "uamt": ("yulequan/UA-MT", "88ed29a", "docs/fidelity.md#ua-mt-uamt"),
    "dtc": ("HiLab-git/DTC", "2525b9c", "docs/fidelity.md#dtc-dtc"),
    "urpc": ("HiLab-git/SSL4MIS", "06df604", "docs/fidelity.md#urpc-urpc"),
    "cps": ("HiLab-git/SSL4MIS", "06df604", "docs/fidelity.md#cps-cps"),
    "mcf": ("WYC-321/MCF", "ad20659", "docs/fidelity.md#mcf-mcf"),
    "bcp": ("DeepMed-Lab-ECNU/BCP", "7879f98", "docs/fidelity.md#bcp-bcp"),
    "mlrp": ("Jiawei0o0/mutual-learning-with-reliable-pseudo-labels", "5ca2d87", "docs/fidelity.md#mlrp-mlrp"),
    "text-semiseg": ("taozh2017/Text-SemiSeg", "18ceced", "docs/fidelity.md#text-semiseg-text-semiseg"),
    "vclipseg": ("SmileJET/VCLIPSeg", "fe50145", "docs/fidelity.md#vclipseg-vclipseg"),
    "llm-segnet": ("none published (paper only)", "", "docs/fidelity.md#llm-segnet-llm-segnet--no-official-code"),
    "tgcnet": ("none published (paper only)", "", "docs/fidelity.md#tgc-net-tgcnet--no-official-code"),
    "unet2d": ("none (textseg's standard 2D U-Net; LViT's is lvit-unet)", "", "docs/methods.md"),
    "lvit-unet": ("HUANGLIZI/LViT (nets/UNet.py)", "a9b0b41", "docs/fidelity.md#lvits-u-net-on-monuseg-lvit-unet-issue-19"),
}


def fidelity_rows(method_names) -> list[tuple[str, str, str, str]]:
    """(method, official code, commit, ledger) for each registered method name."""
    return [(n, *LEDGER.get(n, ("not in the ledger", "", "docs/fidelity.md"))) for n in method_names]

"""LLM-SegNet's unified segmentation loss (USL) against a hand computation of the paper's Eqs. 8 and 4 (issue 26).

LLM-SegNet has no official code, so the default follows the equations as printed: Eq. 8 sums the confident NLL
term (max q > t1) and the complementary NLL term (min q < t2) each over its own voxels, and Eq. 4's MSE of the
uncertain voxels has the argmax pseudo-label ỹ as its target. `method.usl_reading: textseg` (`--usl-reading
textseg`) is textseg's former reading: the complementary set leaves out the confident voxels (each voxel counted
once) and the MSE target is the soft q. Both are computed here voxel by voxel with `math`, not with the loss code.
"""

from __future__ import annotations

import math

import pytest
import torch

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods import llm_segnet
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.flags import text_flag_sets
from textseg_cli.methods.registry import build_method
from textseg_cli.methods.text_losses import usl_loss
from textseg_cli.runs.config import build_config
from textseg_cli.text.embeddings import save_embeddings

T1, T2, EPS = 0.9, 0.1, 1e-6

# two classes, four voxels (columns): confident (0.95), uncertain (0.5), confident the other way (0.98), uncertain
Q2 = [[0.95, 0.5, 0.02, 0.7], [0.05, 0.5, 0.98, 0.3]]
P2 = [[0.8, 0.6, 0.3, 0.55], [0.2, 0.4, 0.7, 0.45]]
# three classes, three voxels: confident and complementary (0.92 / 0.03), complementary only (0.6 / 0.05), uncertain
Q3 = [[0.92, 0.6, 0.5], [0.05, 0.35, 0.3], [0.03, 0.05, 0.2]]
P3 = [[0.7, 0.5, 0.4], [0.1, 0.3, 0.35], [0.2, 0.2, 0.25]]


def _t(rows):
    return torch.tensor(rows).unsqueeze(0)  # (1, K, N)


def hand_usl(p_rows, q_rows, kind="usl", reading="paper"):
    """The loss written out voxel by voxel: Σ over voxels of the voxel's terms, divided by the voxel count."""
    k, n = len(q_rows), len(q_rows[0])
    total = 0.0
    for v in range(n):
        q = [q_rows[c][v] for c in range(k)]
        p = [p_rows[c][v] for c in range(k)]
        qmax, qmin = max(q), min(q)
        a, b = q.index(qmax), q.index(qmin)
        target = q if reading == "textseg" else [1.0 if c == a else 0.0 for c in range(k)]  # Eq. 4: one-hot ỹ
        mse = sum((p[c] - target[c]) ** 2 for c in range(k)) / k
        if kind == "mse":
            total += mse
            continue
        confident = qmax > T1
        complementary = qmin < T2 and not (reading == "textseg" and confident)
        if confident:  # Eq. 8, first term
            total += -qmax * math.log(max(p[a], EPS))
        if complementary:  # Eq. 8, second term
            total += -(1 - qmin) * math.log(max(1 - p[b], EPS))
        if kind == "usl" and T2 < qmin and qmax < T1:
            total += mse
    return total / n


@pytest.mark.parametrize("kind", ["usl", "nll", "mse"])
@pytest.mark.parametrize("p,q", [(P2, Q2), (P3, Q3)], ids=["2 classes", "3 classes"])
def test_default_usl_is_eq8_and_eq4_as_printed(p, q, kind):
    assert usl_loss(_t(p), _t(q), T1, T2, kind).item() == pytest.approx(hand_usl(p, q, kind), rel=1e-6)


@pytest.mark.parametrize("kind", ["usl", "nll", "mse"])
@pytest.mark.parametrize("p,q", [(P2, Q2), (P3, Q3)], ids=["2 classes", "3 classes"])
def test_textseg_reading_reproduces_the_former_loss(p, q, kind):
    # checked before the change: the former code gave 0.148507 / 0.181709 (usl), 0.140382 / 0.180042 (nll) and
    # 0.033350 / 0.014422 (mse) on these tensors, what this hand computation gives
    got = usl_loss(_t(p), _t(q), T1, T2, kind, reading="textseg").item()
    assert got == pytest.approx(hand_usl(p, q, kind, reading="textseg"), rel=1e-6)


def test_a_confident_binary_voxel_counts_in_both_nll_terms():
    # max q = 0.95 > t1 and min q = 0.05 < t2: Eq. 8 adds −0.95·log 0.8 (argmax) and −(1 − 0.05)·log(1 − 0.2)
    q, p = _t([[0.95], [0.05]]), _t([[0.8], [0.2]])
    once = -0.95 * math.log(0.8)
    assert usl_loss(p, q, T1, T2).item() == pytest.approx(2 * once, rel=1e-6)
    assert usl_loss(p, q, T1, T2, reading="textseg").item() == pytest.approx(once, rel=1e-6)
    # an uncertain voxel: the paper's MSE target is the one-hot argmax, the former one the soft q
    q, p = _t([[0.6], [0.4]]), _t([[0.7], [0.3]])
    assert usl_loss(p, q, T1, T2).item() == pytest.approx((0.3 ** 2 + 0.3 ** 2) / 2, rel=1e-6)
    assert usl_loss(p, q, T1, T2, reading="textseg").item() == pytest.approx((0.1 ** 2 + 0.1 ** 2) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="reading"):
        usl_loss(p, q, reading="soft")


def test_llm_segnet_passes_the_reading_and_the_flag_sets_it(monkeypatch, tmp_path):
    assert build_config("llm-segnet", "synthetic", 3, [32, 32, 16])["method"]["usl_reading"] == "paper"
    assert text_flag_sets("llm-segnet", usl_reading="textseg") == ['method.usl_reading="textseg"']
    with pytest.raises(ConfigError, match="--usl-reading"):
        text_flag_sets("llm-segnet", usl_reading="soft")
    with pytest.raises(ConfigError, match="applies to llm-segnet"):
        text_flag_sets("vclipseg", usl_reading="paper")
    emb = save_embeddings(tmp_path / "bert.safetensors", {"embeddings": torch.randn(15, 32)},
                          {"encoder": "bert", "texts": [f"description {i}" for i in range(15)]})
    ctx = dict(class_names=["background", "liver"], dataset_name="synthetic", data_root=None, patch_size=[32, 32, 16])
    seen = []
    real = llm_segnet.usl_loss
    monkeypatch.setattr(llm_segnet, "usl_loss", lambda *a, **k: seen.append(k.get("reading")) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(1, 1, 32, 32, 16, generator=g), torch.zeros(1, 32, 32, 16, dtype=torch.long),
                  torch.randn(2, 1, 32, 32, 16, generator=g))
    for sets, expected in (([], "paper"), (['method.usl_reading="textseg"'], "textseg")):
        cfg = build_config("llm-segnet", "synthetic", 3, [32, 32, 16],
                           sets=["method.backbone.n_filters=4", f"method.text.embeddings={emb}", *sets])
        m = build_method("llm-segnet", cfg, 1, 2, 3, **ctx)
        seen.clear()
        m.training_step(batch, StepContext(0, 100, torch.device("cpu")))
        assert seen == [expected, expected]  # USL(A→B) and USL(B→A)
    cfg = build_config("llm-segnet", "synthetic", 3, [32, 32, 16],
                       sets=["method.backbone.n_filters=4", f"method.text.embeddings={emb}", "method.usl_reading=soft"])
    with pytest.raises(ConfigError, match="usl_reading"):
        build_method("llm-segnet", cfg, 1, 2, 3, **ctx)

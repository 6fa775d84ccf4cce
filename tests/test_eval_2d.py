"""2D evaluation: per-image Dice/IoU (mDice, mIoU), --eval-size, 2D tables, 2D runs with text and threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_cli

from textseg_cli.data.io import write_nifti
from textseg_cli.evaluation.folders import evaluate_pairs, resize_nearest
from textseg_cli.methods.base import Method


def test_resize_nearest_matches_torch_nearest():
    rng = np.random.default_rng(0)
    for shape, size in (((37, 53), 224), ((300, 250), 224), ((224, 224), 224), ((5, 9), 8)):
        m = rng.integers(0, 3, shape).astype(np.uint8)
        ref = F.interpolate(torch.from_numpy(m)[None, None].float(), size=(size, size), mode="nearest")[0, 0]
        np.testing.assert_array_equal(resize_nearest(m, size), ref.numpy().astype(np.uint8))


def test_mean_over_images_and_empty_policy():
    a = np.zeros((10, 10), np.uint8)
    a[2:6, 2:6] = 1
    b = np.zeros((10, 10), np.uint8)
    b[2:6, 2:4] = 1
    empty = np.zeros((10, 10), np.uint8)
    pairs = [("i0", a, a, None), ("i1", b, a, None), ("i2", empty, empty, None), ("i3", empty, a, None)]
    df = evaluate_pairs(pairs, 2, show_progress=False).set_index("case")
    assert df.loc["i1", "dice"] == pytest.approx(2 * 8 / 24) and df.loc["i1", "jaccard"] == pytest.approx(0.5)
    assert df.loc["i2", "dice"] == 1.0 and df.loc["i3", "dice"] == 0.0  # explicit empty-mask policy
    assert df["dice"].mean() == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    # at 224×224 the areas scale equally, so these Dice values stay the same; the size is recorded
    big = evaluate_pairs(pairs, 2, show_progress=False, eval_size=224)
    np.testing.assert_allclose(big["dice"].to_numpy(), df["dice"].to_numpy())
    assert big.attrs["eval_size"] == 224


def _folder(root: Path, name: str, shift: int, texts: bool = True) -> Path:
    """A prepared 2D folder with 3 val images (label = left part) and predictions shifted by `shift` columns."""
    (root / name / "images").mkdir(parents=True)
    (root / name / "labels").mkdir()
    cases = []
    for i in range(3):
        img = np.random.default_rng(i).random((20, 24)).astype(np.float32)
        lab = np.zeros((20, 24), np.uint8)
        lab[4:16, 4:12 + i] = 1
        write_nifti(root / name / "images" / f"im{i}.nii.gz", img, (1.0, 1.0))
        write_nifti(root / name / "labels" / f"im{i}.nii.gz", lab, (1.0, 1.0))
        write_nifti(root / f"pred_{name}" / f"im{i}.nii.gz", np.roll(lab, shift, axis=1), (1.0, 1.0))
        cases.append({"id": f"im{i}", "image": f"images/im{i}.nii.gz", "label": f"labels/im{i}.nii.gz",
                      "shape": [20, 24], "spacing": [1.0, 1.0], **({"text": f"lesion {i}"} if texts else {})})
    spec = {"format": "textseg-prepared/1", "name": name, "dim": 2, "modality": "X-ray", "channel_names": ["gray"],
            "class_names": ["background", "lesion"], "cases": cases, "splits": {"train": [], "val": ["im0", "im1", "im2"]},
            "preprocessing": [], "source": {}, "tool_version": "test", "patch_size": [16, 16]}
    (root / name / "dataset.json").write_text(json.dumps(spec))
    return root / name


def test_2d_table_puts_data_sets_side_by_side(tmp_path):
    qata, mos = _folder(tmp_path, "QaTa", 1), _folder(tmp_path, "MosMed", 0)
    runs = {}
    for method, flag in (("UNet", "--no-text"), ("TGC-Net", "--text")):
        for data in (qata, mos):
            out = tmp_path / f"ev_{method}_{data.name}"
            code, text = run_cli("eval", "--pred", tmp_path / f"pred_{data.name}", "--labels", data, "--split", "val",
                                 "--out", out, "--name", method, flag, "--eval-size", "224", "--table", "md")
            assert code == 0, text
            runs[(method, data.name)] = out
    meta = json.loads((runs[("UNet", "QaTa")] / "meta.json").read_text(encoding="utf-8"))
    assert meta["dim"] == 2 and meta["eval_size"] == 224 and meta["uses_text"] is False
    assert meta["dataset"] == "QaTa" and "mean over images" in meta["aggregation"]
    per_case = pd.read_csv(runs[("UNet", "QaTa")] / "per_case.csv")
    assert {"hd95", "asd"} <= set(per_case.columns) and len(per_case) == 3  # distances kept per image
    own = (runs[("UNet", "QaTa")] / "table.md").read_text(encoding="utf-8")
    assert "QaTa Dice (%)" in own and "95HD" not in own

    code, text = run_cli("eval", "--compare", *[runs[k] for k in sorted(runs)], "--table", "md")
    assert code == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert lines[0].replace(" ", "") == "|Method|Text|MosMedDice(%)↑|MosMedmIoU(%)↑|QaTaDice(%)↑|QaTamIoU(%)↑|"
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    assert set(rows) == {"TGC-Net", "UNet"} and rows["TGC-Net"][0] == "✓" and rows["UNet"][0] == "✗"
    dice_q = pd.read_csv(runs[("UNet", "QaTa")] / "per_case.csv")["dice"].mean() * 100
    iou_q = pd.read_csv(runs[("UNet", "QaTa")] / "per_case.csv")["jaccard"].mean() * 100
    assert rows["UNet"][3].strip("*") == f"{dice_q:.2f}" and rows["UNet"][4].strip("*") == f"{iou_q:.2f}"
    assert rows["UNet"][1].strip("*") == "100.00"  # MosMed predictions are perfect
    assert "224×224" in text and "mean over images" in text

    code, latex = run_cli("eval", "--compare", runs[("UNet", "QaTa")], runs[("TGC-Net", "QaTa")], "--table", "latex")
    assert code == 0 and r"\multicolumn{2}{c}{QaTa}" in latex and r"\checkmark" in latex
    code, old = run_cli("eval", "--compare", runs[("UNet", "QaTa")], "--layout", "3d")
    assert code == 0 and "95HD" in old
    code, err = run_cli("eval", "--pred", tmp_path / "pred_QaTa", "--labels", qata, "--layout", "2d")
    assert code == 2 and "--compare" in err


class Sign2D(Method):
    """Foreground where the image exceeds 0.5; records the texts it was given (a text-reading method)."""

    name = "sign2d"

    def __init__(self, cfg=None, in_channels=1, num_classes=2, dim=2, **context):
        super().__init__(cfg or {}, in_channels, num_classes, dim=dim, **context)
        self.net = nn.Conv2d(in_channels, 2, 1)
        with torch.no_grad():
            self.net.weight.zero_()
            self.net.weight[1, 0] = 40.0
            self.net.bias.copy_(torch.tensor([0.0, -20.0]))
        self.texts: list = []

    def set_case_text(self, text, aux=None, case_id=None):
        self.texts.append((case_id, text))

    def predict_logits(self, x, decoder=None):
        return self.net(x)


def test_evaluate_run_on_a_2d_run(tmp_path, monkeypatch):
    from textseg_cli.data.prepared import load_prepared
    from textseg_cli.runs.checkpoint import save_checkpoint
    from textseg_cli.runs.config import build_config, save_config
    from textseg_cli.evaluation import run as run_eval
    from textseg_cli.methods import registry

    data = _folder(tmp_path, "tiny2d", 0)
    for i in range(3):  # image = label + small noise, so "image > 0.5" recovers the label exactly
        lab = load_prepared(data).load_case(f"im{i}").label
        write_nifti(data / "images" / f"im{i}.nii.gz", lab + 0.1 * np.random.default_rng(i).random(lab.shape), (1., 1.))
    registry.list_methods()
    monkeypatch.setitem(registry.METHODS, "sign2d", Sign2D)
    seen = []
    ds = load_prepared(data)
    cfg = build_config("sign2d", ds.name, 2, ds.patch_size, sets=["inference.stride=8,8"])
    cfg["data"]["root"] = str(ds.root)
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    for name in ("best", "last"):
        save_checkpoint(run_dir / "checkpoints" / f"{name}.pt", {"method": Sign2D().state_dict(), "iteration": 1})
    original = run_eval.load_run

    def spy(*a, **k):
        run = original(*a, **k)
        seen.append(run.method)
        return run

    monkeypatch.setattr(run_eval, "load_run", spy)
    df = run_eval.evaluate_run(run_dir, split="val", inference="whole", overlays=2, eval_size=224, table="md")
    out = run_dir / "eval" / "val-best-whole"
    assert np.allclose(df["dice"], 1.0) and len(df) == 3
    assert seen[0].texts == [(f"im{i}", f"lesion {i}") for i in range(3)]  # each case's text reached the method
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["dim"] == 2 and meta["uses_text"] is True and meta["threshold"] == 0.5 and meta["eval_size"] == 224
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["im0.png", "im1.png"]
    assert "Text" in (out / "table.md").read_text(encoding="utf-8")


def test_threshold_on_the_foreground_probability():
    from textseg_cli.evaluation.run import mask_from_probs

    p = torch.tensor([0.2, 0.5, 0.51, 0.9]).reshape(1, 4)
    probs = torch.cat([1 - p, p])[:, None]  # (K=2, 1, 4)
    np.testing.assert_array_equal(mask_from_probs(probs, 2), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(mask_from_probs(probs, 2, threshold=0.8), [[0, 0, 0, 1]])

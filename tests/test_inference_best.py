"""`--inference paper|best` (issue 28): mirroring TTA, Gaussian window weights, post-processing chosen on validation
and replayed by `eval` and `predict`; the papers' protocol stays the default and its numbers do not move.
Parity with MONAI's Gaussian sliding window and nnU-Net v2's mirroring: tests/parity/test_inference_best_parity.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import run_cli
from textseg_cli.data.io import write_nifti
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.inference.postprocessing import (
    choose_lcc,
    lcc_classes,
    read_postprocessing,
    write_postprocessing,
)
from textseg_cli.inference.predict import predict_case
from textseg_cli.inference.settings import NO_RECORD, InferenceSettings
from textseg_cli.inference.sliding_window import (
    gaussian_importance,
    mirror_axes_combinations,
    mirrored,
    sliding_window_inference,
)
from textseg_cli.methods.base import Method
from textseg_cli.metrics.postprocess import lcc_per_class


class ConvMethod(Method):
    """A random 3x3(x3) convolution: not flip-symmetric, so mirroring changes its output."""

    name = "conv-test"

    def __init__(self, cfg=None, in_channels=1, num_classes=3, dim=3, **context):
        super().__init__(cfg or {}, in_channels, num_classes, dim=dim, **context)
        torch.manual_seed(0)
        self.net = (nn.Conv3d if dim == 3 else nn.Conv2d)(in_channels, num_classes, 3, padding=1)

    def predict_logits(self, x, decoder=None):
        return self.net(x)


class SignMethod(Method):
    """Foreground exactly where the image is positive (pointwise: mirroring and window weights change nothing)."""

    name = "sign-best"

    def __init__(self, cfg=None, in_channels=1, num_classes=2, dim=3, **context):
        super().__init__(cfg or {}, in_channels, num_classes, dim=dim, **context)
        self.net = nn.Conv3d(in_channels, 2, 1)
        with torch.no_grad():
            self.net.weight.zero_()
            self.net.weight[0, 0] = -10.0
            self.net.weight[1, 0] = 10.0
            self.net.bias.zero_()

    def predict_logits(self, x, decoder=None):
        return self.net(x)


FP32 = {"precision": "fp32", "fuse_bn": False, "channels_last": False}


# --- the pure pieces ------------------------------------------------------------------------------------------
def test_gaussian_importance_is_centred_symmetric_and_clamped():
    w = gaussian_importance((16, 9, 6))
    assert w.shape == (16, 9, 6) and w.dtype == torch.float32
    for axis in range(3):
        torch.testing.assert_close(w, torch.flip(w, [axis]))
    assert float(w.min()) >= 1e-3 - 1e-9 and float(w[7:9, 4, 2:4].min()) == pytest.approx(float(w.max()))
    x = np.arange(16) - 7.5  # from the centre; sigma = 16 / 8; the tails are raised to 1e-3
    expect = np.maximum(np.exp(-x ** 2 / (2 * 2.0 ** 2)), 1e-3)
    np.testing.assert_allclose(gaussian_importance((16,)).numpy(), expect, rtol=1e-5)
    assert expect[0] == 1e-3  # the clamp is exercised


def test_gaussian_blend_weights_window_centres_and_constant_is_unchanged():
    x = torch.randn(1, 20, 8)
    calls = []

    def fn(b):  # each window predicts its own start: the blend decides how overlaps mix
        calls.append(b.shape[0])
        k = torch.arange(b.shape[0], dtype=torch.float32).view(-1, 1, 1, 1) + len(calls) * 10
        return torch.cat([k.expand(-1, 1, *b.shape[2:]), -k.expand(-1, 1, *b.shape[2:])], 1)

    const = sliding_window_inference(fn, x, (8, 8), (4, 8), sw_batch_size=1)
    calls.clear()
    default = sliding_window_inference(fn, x, (8, 8), (4, 8), sw_batch_size=1, blend="constant")
    torch.testing.assert_close(const, default)
    calls.clear()
    gauss = sliding_window_inference(fn, x, (8, 8), (4, 8), sw_batch_size=1, blend="gaussian")
    # where two windows overlap, the Gaussian average leans to the window whose centre is nearer
    assert not torch.allclose(const, gauss)
    w = gaussian_importance((8, 8))[:, 0]
    expect = (10 * w[5] + 20 * w[1]) / (w[5] + w[1])  # row 5: offset 5 in window 0 (value 10), 1 in window 1 (20)
    assert float(gauss[0, 5, 0]) == pytest.approx(float(expect), rel=1e-5)
    assert float(const[0, 5, 0]) == pytest.approx(15.0)
    with pytest.raises(ConfigError, match="blend"):
        sliding_window_inference(fn, x, (8, 8), blend="cosine")


def test_mirror_combinations_follow_nnunet_order():
    assert mirror_axes_combinations(3) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_axes_combinations(2) == [(), (0,), (1,), (0, 1)]


def test_mirrored_is_flip_equivariant_and_keeps_the_forward_batch():
    net = ConvMethod().eval()
    seen = []

    def fn(b):
        seen.append(b.shape[0])
        return net.predict_proba(b)

    x = torch.randn(2, 1, 6, 5, 4)
    tta = mirrored(fn, 3, max_batch=4)
    with torch.no_grad():
        out = tta(x)
        assert seen == [4, 4, 4, 4]  # 2 crops x 8 flips, 4 per forward pass
        flipped = tta(torch.flip(x, [2, 4]))
    torch.testing.assert_close(torch.flip(flipped, [2, 4]), out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 6, 5, 4))
    with torch.no_grad():
        plain = fn(x)
    assert not torch.allclose(out, plain, atol=1e-4)


def test_predict_case_tta_equals_the_mean_over_flipped_images():
    method = ConvMethod()
    img = np.random.default_rng(1).standard_normal((1, 16, 16, 16)).astype(np.float32)  # a multiple of 16: no padding
    whole = dict(FP32, mode="whole", patch_size=[8, 8, 8])
    got = predict_case(method, img, dict(whole, tta=True), "cpu")
    ref = torch.zeros_like(got)
    for axes in mirror_axes_combinations(3):
        dims = [a + 1 for a in axes]
        flipped = np.ascontiguousarray(np.flip(img, dims)) if axes else img
        p = predict_case(method, flipped, whole, "cpu")
        ref += torch.flip(p, dims) if axes else p
    torch.testing.assert_close(got, ref / 8, atol=1e-6, rtol=1e-5)
    # 2D: the four flips
    m2 = ConvMethod(dim=2)
    img2 = np.random.default_rng(2).standard_normal((1, 11, 9)).astype(np.float32)
    p2 = predict_case(m2, img2, dict(FP32, patch_size=[8, 8], stride=[4, 4], tta=True, blend="gaussian"), "cpu")
    assert p2.shape == (3, 11, 9)
    torch.testing.assert_close(p2.sum(0), torch.ones(11, 9))


# --- post-processing chosen on validation -----------------------------------------------------------------------
def _blobs(shape=(16, 12, 8)):
    big = np.zeros(shape, np.uint8)
    big[2:9, 2:9, 1:6] = 1
    small = np.zeros(shape, np.uint8)
    small[12:14, 9:11, 6:8] = 1
    return big, small


def test_choose_lcc_keeps_it_where_it_helps_and_drops_it_where_it_hurts():
    big, small = _blobs()
    pred = big | small  # one spurious blob beside the structure
    helps = choose_lcc([("a", pred, big), ("b", pred, big)], 2, ["atrium"])
    (c,) = helps["classes"]
    assert c["lcc"] is True and c["dice_with"] == pytest.approx(1.0) and c["dice_without"] < 1.0
    assert helps["cases"] == ["a", "b"] and lcc_classes(helps) == (1,)
    hurts = choose_lcc([("a", pred, pred)], 2, ["atrium"])  # the second blob is real
    assert hurts["classes"][0]["lcc"] is False and hurts["classes"][0]["dice_with"] < 1.0
    assert lcc_classes(hurts) == ()
    # per class: class 1 gains, class 2 loses; a tie keeps the raw masks (nnU-Net: strictly better only)
    multi = np.where(big == 1, 1, 0) + np.where(small == 1, 2, 0)
    extra = multi.copy()
    extra[0, 0, 0] = 1  # a spurious class-1 voxel
    two_parts = multi.copy()
    two_parts[0, 11, 7] = 2  # a true second class-2 part
    rec = choose_lcc([("a", extra, multi), ("b", two_parts, two_parts)], 3, ["one", "two"])
    assert [c["lcc"] for c in rec["classes"]] == [True, False]
    tie = choose_lcc([("a", big, big)], 2)
    assert tie["classes"][0]["lcc"] is False and tie["classes"][0]["name"] == "class1"
    with pytest.raises(DataError, match="no validation case"):
        choose_lcc([], 2)


def test_postprocessing_record_round_trip_and_refusal(tmp_path):
    big, small = _blobs()
    rec = choose_lcc([("a", big | small, big)], 2, ["atrium"])
    path = write_postprocessing(tmp_path, rec)
    assert path.name == "postprocessing.json" and read_postprocessing(tmp_path) == json.loads(path.read_text())
    assert read_postprocessing(tmp_path / "nowhere") is None
    path.write_text('{"classes": [{"class": "1"}]}')
    with pytest.raises(DataError, match="post-processing record"):
        read_postprocessing(tmp_path)


def test_settings_presets_and_overrides():
    cfg = {"method": "dtc", "data": {"patch_size": [8, 8, 4]}, "inference": {"mode": "sliding"}}
    paper = InferenceSettings.from_config(cfg)
    assert (paper.preset, paper.tta, paper.blend, paper.lcc_classes, paper.tag) == ("paper", False, "constant", None, "")
    assert paper.lcc and "protocol" in paper.lcc_source  # DTC's official LCC, as before
    assert InferenceSettings.from_config(cfg, mode="paper") == paper
    none = InferenceSettings.from_config(cfg, mode="best")
    assert (none.preset, none.tta, none.blend, none.mode, none.tag) == ("best", True, "gaussian", "sliding", "-best")
    assert none.lcc is False and none.lcc_source == NO_RECORD and none.lcc_classes is None
    rec = {"classes": [{"class": 1, "name": "atrium", "lcc": False, "dice_without": 0.9, "dice_with": 0.8}]}
    best = InferenceSettings.from_config(cfg, mode="best", postprocessing=rec)
    assert best.lcc is False and best.lcc_classes == () and "chosen on validation" in best.lcc_source
    assert "LCC off (Dice 90.00 -> 80.00)" in best.lcc_source
    forced = InferenceSettings.from_config(cfg, mode="best", postprocessing=rec, lcc=True)
    assert forced.lcc and forced.lcc_classes is None and forced.lcc_source == "--lcc"
    mixed = InferenceSettings.from_config(cfg, mode="best", tta=False, blend="constant")
    assert (mixed.tta, mixed.blend, mixed.tag) == (False, "constant", "-best-notta-constant")
    assert InferenceSettings.from_config(cfg, tta=True).tag == "-tta"
    assert InferenceSettings.from_config(cfg, mode="whole", blend="gaussian").tag == "-gaussian"
    rec_ = best.record()
    assert rec_["preset"] == "best" and rec_["tta"] and rec_["blend"] == "gaussian"
    assert rec_["postprocessing"]["lcc_classes"] == []
    with pytest.raises(ConfigError, match="paper"):
        InferenceSettings.from_config(cfg, mode="fastest")
    with pytest.raises(ConfigError, match="blend"):
        InferenceSettings.from_config(cfg, blend="cosine")


# --- the commands -----------------------------------------------------------------------------------------------
SPACING = (0.8, 0.8, 1.25)


def _prepared(root: Path) -> Path:
    """Images: -1, a big +1 blob and a small separate +1 blob; references: the big blob only, so SignMethod's
    masks hold one false blob that LCC removes."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    big, small = _blobs()
    cases = []
    for i in range(5):
        cid = f"case{i}"
        img = np.where((big | small) == 1, 1.0, -1.0).astype(np.float32)
        img += np.random.default_rng(i).uniform(-0.2, 0.2, img.shape).astype(np.float32)
        write_nifti(root / "images" / f"{cid}.nii.gz", img, SPACING)
        write_nifti(root / "labels" / f"{cid}.nii.gz", big, SPACING)
        cases.append({"id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz",
                      "shape": list(img.shape), "spacing": list(SPACING)})
    spec = {"format": "textseg-prepared/1", "name": "blobs", "dim": 3, "modality": "MRI", "channel_names": ["mri"],
            "class_names": ["background", "atrium"], "cases": cases,
            "splits": {"train": ["case0", "case1"], "val": ["case2", "case3"], "test": ["case4"]},
            "preprocessing": [], "source": {}, "tool_version": "test", "patch_size": [8, 8, 4]}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def blob_run(tmp_path, monkeypatch):
    from textseg_cli.data.prepared import load_prepared
    from textseg_cli.methods import registry
    from textseg_cli.runs.checkpoint import save_checkpoint
    from textseg_cli.runs.config import build_config, save_config

    registry.list_methods()
    monkeypatch.setitem(registry.METHODS, "sign-best", SignMethod)
    ds = load_prepared(_prepared(tmp_path / "prepared"))
    run_dir = tmp_path / "run"
    cfg = build_config("sign-best", ds.name, ds.dim, ds.patch_size, sets=["inference.stride=4,4,2"])
    cfg["data"]["root"] = str(ds.root)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "cases.json").write_text(json.dumps({"labeled": ["case0"], "unlabeled": ["case1"], "val": ["case2"]}))
    for name in ("best", "last"):
        save_checkpoint(run_dir / "checkpoints" / f"{name}.pt",
                        {"method": SignMethod().state_dict(), "iteration": 3, "best_metric": 0.5})
    return SimpleNamespace(run_dir=run_dir, dataset=ds)


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _per_case(folder: Path) -> pd.Series:
    return pd.read_csv(folder / "per_case.csv").set_index("case")["dice"]


def test_eval_paper_is_unchanged_best_replays_the_choice_and_predict_follows(blob_run, tmp_path):
    run, ds = blob_run.run_dir, blob_run.dataset
    raw = {cid: ds.load_case(cid).image[0] > 0 for cid in ("case2", "case3", "case4")}
    big, _ = _blobs()

    # paper (the default): the raw argmax of the papers' windows, scored as before; the folder keeps its name
    code, text = run_cli("eval", run, "--split", "val")
    assert code == 0, text
    default = run / "eval" / "val-best-sliding"
    code, text = run_cli("eval", run, "--split", "val", "--inference", "paper", "--out", tmp_path / "paper")
    assert code == 0, text
    for folder in (default, tmp_path / "paper"):
        dice = _per_case(folder)
        for cid in ("case2", "case3"):
            assert dice[cid] == pytest.approx(_dice(raw[cid], big), abs=1e-6) and dice[cid] < 0.99
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["inference_preset"] == "paper" and meta["lcc"] is False
        assert meta["inference_settings"]["tta"] is False and meta["inference_settings"]["blend"] == "constant"

    # best without a record: one line says so, nothing is post-processed
    code, text = run_cli("eval", run, "--split", "val", "--inference", "best")
    assert code == 0, text
    assert "no postprocessing.json" in text
    assert _per_case(run / "eval" / "val-best-sliding-best")["case2"] < 0.99

    # choosing is for the validation split only
    code, text = run_cli("eval", run, "--split", "test", "--choose-postprocessing", "--out", tmp_path / "t")
    assert code == 2 and "validation split" in text
    assert not (run / "postprocessing.json").exists()

    code, text = run_cli("eval", run, "--choose-postprocessing", "--out", tmp_path / "chosen")
    assert code == 0, text
    rec = json.loads((run / "postprocessing.json").read_text())
    (cls,) = rec["classes"]
    assert cls["lcc"] is True and cls["dice_with"] == pytest.approx(1.0) and cls["dice_without"] < 0.99
    assert rec["cases"] == ["case2", "case3"] and rec["inference"]["tta"] is True
    assert (_per_case(tmp_path / "chosen") == 1.0).all()

    # best replays the record: in eval (here on test) and in predict; paper still writes the raw argmax
    code, text = run_cli("eval", run, "--split", "test", "--inference", "best", "--out", tmp_path / "test-best")
    assert code == 0, text
    assert _per_case(tmp_path / "test-best")["case4"] == pytest.approx(1.0)
    meta = json.loads((tmp_path / "test-best" / "meta.json").read_text())
    assert meta["lcc"] is True and "chosen on validation" in meta["lcc_source"]
    assert meta["inference_settings"]["postprocessing"]["lcc_classes"] == [1]
    raw_pred = nib.load(str(tmp_path / "test-best" / "predictions" / "case4.nii.gz")).get_fdata()
    assert raw_pred.sum() == raw["case4"].sum()  # predictions/ keeps the argmax before post-processing

    for preset, expect in (("best", big), ("paper", None)):
        out = tmp_path / f"pred-{preset}"
        code, text = run_cli("predict", run, "--images", ds.root, "--out", out, "--inference", preset)
        assert code == 0, text
        for cid in ("case2", "case4"):
            mask = np.asarray(nib.load(str(out / f"{cid}.nii.gz")).dataobj)
            np.testing.assert_array_equal(mask, expect if expect is not None else raw[cid].astype(np.uint8))
        info = json.loads((out / "predict.json").read_text())["inference"]
        assert info["preset"] == preset and info["tta"] is (preset == "best")
        assert (info["postprocessing"] is None) is (preset == "paper")
    np.testing.assert_array_equal(lcc_per_class(raw["case2"].astype(np.uint8)), big)


def test_best_flags_are_refused_where_they_mean_nothing(blob_run, tmp_path):
    run = blob_run.run_dir
    for args, what in ((["--blend", "cosine"], "--blend"), (["--inference", "fast"], "--inference"),
                       (["--choose-postprocessing", "--lcc"], "--lcc")):
        code, text = run_cli("eval", run, *args, "--out", tmp_path / "x")
        assert code == 2 and what in text, text
    code, text = run_cli("eval", "--pred", tmp_path, "--labels", tmp_path, "--tta")
    assert code == 2 and "--tta" in text
    code, text = run_cli("predict", run, "--images", blob_run.dataset.root, "--out", tmp_path / "p", "--blend", "x")
    assert code == 2 and "--blend" in text
    # --no-tta and --blend override the preset, and the output folder says so
    code, text = run_cli("eval", run, "--inference", "best", "--no-tta", "--blend", "constant")
    assert code == 0, text
    meta = json.loads((run / "eval" / "val-best-sliding-best-notta-constant" / "meta.json").read_text())
    assert meta["inference_settings"]["tta"] is False and meta["inference_settings"]["blend"] == "constant"

"""predict_case, predict_folder (`textseg predict`) and evaluate_run (`textseg eval RUN_DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import run_cli
from textseg_cli.data.io import write_nifti
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.inference.predict import predict_case, predict_folder
from textseg_cli.methods.base import Method

INF = {"mode": "sliding", "patch_size": [8, 8, 4], "stride": [3, 3, 2], "sw_batch_size": 2}


class SignMethod(Method):
    """Predicts foreground exactly where the image is positive, so every mask is checkable."""

    name = "sign"

    def __init__(self, cfg=None, in_channels=1, num_classes=2, dim=3, **context):
        super().__init__(cfg or {}, in_channels, num_classes, dim=dim, **context)
        self.net = (nn.Conv3d if dim == 3 else nn.Conv2d)(in_channels, 2, 1)
        with torch.no_grad():
            self.net.weight.zero_()
            self.net.weight[0, 0] = -10.0
            self.net.weight[1, 0] = 10.0
            self.net.bias.zero_()

    def predict_logits(self, x, decoder=None):
        # "decoder 1" predicts the complement, so tests can see which decoder was used
        return -self.net(x) if decoder == 1 else self.net(x)


def _image(shape=(13, 11, 7), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("mode", ["sliding", "whole"])
def test_predict_case_modes(mode):
    method = SignMethod()
    method.train()
    img = _image()
    probs = predict_case(method, img[None], dict(INF, mode=mode), "cpu")
    assert probs.shape == (2,) + img.shape and probs.dtype == torch.float32
    np.testing.assert_array_equal(probs.argmax(0).numpy(), (img > 0).astype(np.int64))
    probs = predict_case(method, img[None], dict(INF, mode=mode, decoder=1), "cpu")
    np.testing.assert_array_equal(probs.argmax(0).numpy(), (img <= 0).astype(np.int64))
    assert method.training  # validation inside training must not leave the model in eval mode


def test_predict_case_precision_and_layout():
    img = _image()
    for cfg in ({"precision": "bf16"}, {"precision": "fp32", "channels_last": False}):
        probs = predict_case(SignMethod(), img[None], dict(INF, **cfg), "cpu")
        np.testing.assert_array_equal(probs.argmax(0).numpy(), (img > 0).astype(np.int64))
    with pytest.raises(ConfigError, match="precision"):
        predict_case(SignMethod(), img[None], dict(INF, precision="fp8"), "cpu")


def test_predict_case_2d_and_errors():
    method = SignMethod(dim=2)
    img = _image((20, 9))
    probs = predict_case(method, torch.from_numpy(img)[None], {"patch_size": [8, 8], "stride": 4}, "cpu")
    np.testing.assert_array_equal(probs.argmax(0).numpy(), (img > 0).astype(np.int64))
    with pytest.raises(DataError, match="channel"):
        predict_case(SignMethod(), np.zeros((2, 8, 8, 4), np.float32), INF, "cpu")
    with pytest.raises(ConfigError, match="patch_size"):
        predict_case(SignMethod(), np.zeros((1, 8, 8, 4), np.float32), {"mode": "sliding"}, "cpu")
    with pytest.raises(ConfigError, match="mode"):
        predict_case(SignMethod(), np.zeros((1, 8, 8, 4), np.float32), dict(INF, mode="tiles"), "cpu")


# --- a tiny prepared data set and run folder ---------------------------------------------------------

SPACING = (0.625, 0.7, 1.25)
ORIGIN = (10.0, -5.0, 3.0)


def _prepared(root: Path) -> Path:
    cases, rng = [], np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(5):
        cid = f"case{i}"
        img = rng.standard_normal((12, 10, 6)).astype(np.float32)
        lab = (img > 0).astype(np.uint8)
        if i >= 3:
            lab[:6] = 0  # imperfect cases
        write_nifti(root / "images" / f"{cid}.nii.gz", img, SPACING, ORIGIN)
        write_nifti(root / "labels" / f"{cid}.nii.gz", lab, SPACING, ORIGIN)
        cases.append({"id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz",
                      "shape": [12, 10, 6], "spacing": list(SPACING)})
    spec = {"format": "textseg-prepared/1", "name": "tiny", "dim": 3, "modality": "MRI", "channel_names": ["mri"],
            "class_names": ["background", "atrium"], "cases": cases,
            "splits": {"train": ["case0", "case1"], "val": ["case2", "case3"], "test": ["case4"]},
            "preprocessing": [], "source": {}, "tool_version": "test", "patch_size": [8, 8, 4]}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def trained_run(tmp_path, monkeypatch):
    """A real run folder (config.yaml, cases.json, checkpoints) of SignMethod on the tiny prepared set."""
    from textseg_cli.data.prepared import load_prepared
    from textseg_cli.runs.checkpoint import save_checkpoint
    from textseg_cli.runs.config import build_config, save_config
    from textseg_cli.methods import registry

    registry.list_methods()  # import the real methods first, then add the test one
    monkeypatch.setitem(registry.METHODS, "sign", SignMethod)
    ds = load_prepared(_prepared(tmp_path / "prepared"))
    run_dir = tmp_path / "run"
    cfg = build_config("sign", ds.name, ds.dim, ds.patch_size, sets=["inference.stride=4,4,2"])
    cfg["data"]["root"] = str(ds.root)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "cases.json").write_text(json.dumps({"labeled": ["case0"], "unlabeled": ["case1"], "val": ["case2"]}))
    for name in ("best", "last"):
        save_checkpoint(run_dir / "checkpoints" / f"{name}.pt",
                        {"method": SignMethod().state_dict(), "iteration": 7, "best_metric": 0.5})
    return SimpleNamespace(run_dir=run_dir, dataset=ds)


def test_predict_folder_keeps_geometry(trained_run, tmp_path):
    images = tmp_path / "new"
    images.mkdir()
    img = _image((14, 9, 5), seed=7)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-20.0, 4.0, 7.5]
    affine[:2, :2] = [[0.0, -0.9], [0.8, 0.0]]  # a rotated in-plane direction
    nib.save(nib.Nifti1Image(img, affine), str(images / "patient_a.nii.gz"))
    nib.save(nib.Nifti1Image(-img, np.diag([1.0, 1.0, 1.0, 1.0])), str(images / "patient_b.nii"))
    (images / "notes.txt").write_text("ignored")
    out = tmp_path / "masks"

    code, text = run_cli("predict", trained_run.run_dir, "--images", images, "--out", out, "--checkpoint", "last",
                         "--inference", "whole")
    assert code == 0, text
    a = nib.load(str(out / "patient_a.nii.gz"))
    np.testing.assert_allclose(a.affine, affine, atol=1e-6)
    assert a.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(a.dataobj), (img > 0).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "patient_b.nii.gz")).dataobj), (-img > 0))
    meta = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert meta["inference"]["mode"] == "whole" and meta["checkpoint_rule"] == "last"

    code, text = run_cli("predict", trained_run.run_dir, "--images", images, "--out", out)
    assert code == 2 and "--force" in text
    with pytest.raises(ConfigError, match="differ"):
        predict_folder(trained_run.run_dir, images, images)


def test_predict_folder_reads_prepared_folder(trained_run, tmp_path):
    written = predict_folder(trained_run.run_dir, trained_run.dataset.root, tmp_path / "p", decoder="0")
    assert [p.name for p in written] == [f"case{i}.nii.gz" for i in range(5)]
    vol = nib.load(str(written[2]))
    np.testing.assert_allclose(vol.header.get_zooms(), SPACING)
    np.testing.assert_allclose(vol.affine[:3, 3], ORIGIN)
    np.testing.assert_array_equal(np.asarray(vol.dataobj), trained_run.dataset.load_case("case2").label)


def test_evaluate_run_writes_predictions_and_scores(trained_run, tmp_path):
    from textseg_cli.evaluation.run import evaluate_run

    df = evaluate_run(trained_run.run_dir, split="val", inference="whole")
    out = trained_run.run_dir / "eval" / "val-best-whole"
    preds = sorted(p.name for p in (out / "predictions").iterdir())
    assert preds == ["case2.nii.gz", "case3.nii.gz"]
    vol = nib.load(str(out / "predictions" / "case2.nii.gz"))
    np.testing.assert_allclose(vol.affine[:3, 3], ORIGIN)
    np.testing.assert_allclose(vol.header.get_zooms(), SPACING)
    dice = df.set_index("case")["dice"]
    assert dice["case2"] == pytest.approx(1.0)
    assert dice["case3"] < 0.9  # the imperfect reference
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["checkpoint_rule"] == "best-on-val" and meta["inference"] == "whole"
    assert meta["labeled"] == 1 and meta["unlabeled"] == 1 and meta["method"] == "sign"
    assert meta["split"] == "val"

    from textseg_cli.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        evaluate_run(trained_run.run_dir, split="val", inference="whole")


def test_eval_command_on_run_flags_the_test_split(trained_run, tmp_path):
    code, text = run_cli("eval", trained_run.run_dir, "--split", "test", "--checkpoint", "last", "--out",
                         tmp_path / "ev", "--decoder", "1", "--table", "md")
    assert code == 0, text
    assert "TEST split" in text and "model selection" in text
    meta = json.loads((tmp_path / "ev" / "meta.json").read_text(encoding="utf-8"))
    assert meta["checkpoint_rule"] == "last" and meta["decoder"] == 1 and meta["split"] == "test"
    assert meta["iteration"] == 7
    assert (tmp_path / "ev" / "predictions" / "case4.nii.gz").exists() and (tmp_path / "ev" / "table.md").exists()


def test_batchnorm_folding_is_exact_and_cached():
    from textseg_cli.inference.fusion import fuse_conv_bn, fused_for_inference
    from textseg_cli.models.registry import build_model

    torch.manual_seed(0)
    net = build_model("vnet_multi", 1, 2, up_modes=(0, 1), dim=2, n_filters=4)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as after training
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    fused, count = fuse_conv_bn(net)
    assert count >= 20 and any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # original untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(net(x), fused(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    first = fused_for_inference(net)
    assert fused_for_inference(net) is first
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # an optimiser step invalidates the cache
    assert fused_for_inference(net) is not first

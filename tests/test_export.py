"""`textseg export`: dynamic-shape exports (torch.export, ONNX, TorchScript) checked at a second shape, and the
self-contained predict.py beside them, which must reproduce `textseg predict` voxel for voxel without textseg."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_cli
from raw_fakes import phantom_ct, write_image

SP, FLIP = (0.8, 0.9, 2.0), (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory):
    """prep custom with resampling, a body crop and a CT window, then 40 iterations of sup (no LCC in its protocol;
    enough for a mask with both classes, so that the equality below is not that of two empty masks)
    predicting in float32 without BatchNorm folding, so that the exported network is the very computation."""
    root = tmp_path_factory.mktemp("export")
    for i in range(6):
        hu, lab = phantom_ct((26, 24, 8), seed=i, blob_radius=4)
        write_image(root / "imgs" / f"case{i}.nii.gz", hu, SP, (5.0, -3.0, 1.0), FLIP)
        write_image(root / "labs" / f"case{i}.nii.gz", lab, SP, (5.0, -3.0, 1.0), FLIP)
    code, text = run_cli("prep", "custom", "--images", root / "imgs", "--labels", root / "labs", "--out",
                         root / "prepared", "--spacing", "1", "--window-preset", "abdomen", "--crop", "body",
                         "--classes", "blob")
    assert code == 0, text
    code, text = run_cli("train", "--method", "sup", "--data", root / "prepared", "--out", root / "run",
                         "--iterations", "40", "--set", "train.batch_labeled=2", "--set", "inference.stride=16,16,8",
                         "--set", "data.patch_size=32,32,16",
                         "--set", "inference.fuse_bn=false", "--set", "inference.channels_last=false", "--threads", "1")
    assert code == 0, text
    return root


def _run_isolated(script, *args):
    """Run predict.py with `python -I -S` and only the interpreter's site-packages on sys.path: no textseg."""
    site = sysconfig.get_paths()["purelib"]
    boot = ("import sys, runpy; sys.path[:0] = [sys.argv.pop(1)]; sys.argv = sys.argv[1:]; "
            "import importlib.util; assert importlib.util.find_spec('textseg_cli') is None; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-I", "-S", "-c", boot, site, str(script), *map(str, args)],
                          capture_output=True, text=True, cwd=script.parent, timeout=600, check=False)


def test_predict_py_reproduces_textseg_predict_without_textseg(replay_run, tmp_path):
    root = replay_run
    image = root / "imgs" / "case5.nii.gz"
    code, text = run_cli("predict", root / "run", "--images", image, "--out", tmp_path / "pred", "--inference",
                         "paper", "--precision", "fp32", "--checkpoint", "last")
    assert code == 0, text
    exp = tmp_path / "exp"
    code, text = run_cli("export", root / "run", "--format", "torch-export", "--out", exp, "--checkpoint", "last")
    assert code == 0, text
    rec = json.loads((exp / "export.json").read_text(encoding="utf-8"))
    assert rec["dynamic"]["spatial"] and [rec["replay"]["crop"], rec["replay"]["window"]] == ["body", [40.0, 400.0]]
    source = (exp / "predict.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import)\s+textseg", source, re.MULTILINE)
    moved = tmp_path / "elsewhere"  # the export folder copied away from the repository and the run
    moved.mkdir()
    for f in exp.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    proc = _run_isolated(moved / "predict.py", image, "--out", tmp_path / "mine.nii.gz")
    assert proc.returncode == 0, proc.stderr
    ref, mine = nib.load(str(tmp_path / "pred" / "case5.nii.gz")), nib.load(str(tmp_path / "mine.nii.gz"))
    assert np.allclose(mine.affine, nib.load(str(image)).affine, atol=1e-6) and mine.shape == ref.shape
    a, b = np.asarray(ref.dataobj), np.asarray(mine.dataobj)
    assert 0.02 * a.size < np.count_nonzero(a) < 0.98 * a.size, np.count_nonzero(a)  # a mask worth comparing
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("fmt", ["torch-export", "onnx", "torchscript"])
def test_exports_take_other_shapes(replay_run, tmp_path, fmt):
    """The exported file, loaded back without textseg, equals the run's network at a shape it was not traced at
    (batch 3, 96x96x48: the issue's example)."""
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    from textseg_cli.runs.load import load_run

    code, text = run_cli("export", replay_run / "run", "--format", fmt, "--out", tmp_path / "e", "--checkpoint", "last")
    assert code == 0, text
    rec = json.loads((tmp_path / "e" / "export.json").read_text(encoding="utf-8"))
    assert rec["dynamic"]["batch"] and rec["dynamic"]["multiple"] == 16
    x = torch.randn(3, 1, 96, 96, 48, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "e" / rec["file"]
    if fmt == "onnx":
        import onnxruntime as ort

        got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0])
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            got = torch.jit.load(str(path))(x)
    else:
        got = torch.export.load(str(path)).module()(x)
    method = load_run(replay_run / "run", "last", device="cpu").method.eval()
    with torch.inference_mode():
        want = method.predict_proba(x, None)
    torch.testing.assert_close(got, want, atol=1e-5 if fmt == "onnx" else 1e-6, rtol=0)


def test_largest_component_without_scipy_matches_scipy(monkeypatch):
    """predict.py's torch fallback for the body crop (6-connected) and the LCC post-processing (26-connected)."""
    import builtins

    from textseg_cli.data.preprocessing import body_mask
    from textseg_cli.inference import export_predict_template as t
    from textseg_cli.metrics.postprocess import largest_connected_component

    rng = np.random.default_rng(0)
    masks = [rng.random((9, 8, 7)) > 0.6 for _ in range(10)]
    want = [(largest_connected_component(m), body_mask(m.astype(float), 0.5)) for m in masks]
    real = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    for m, (full, faces) in zip(masks, want):
        np.testing.assert_array_equal(t.largest_component(m, full=True), full)
        np.testing.assert_array_equal(t.largest_component(m), faces)

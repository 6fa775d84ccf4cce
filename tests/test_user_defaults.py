"""Defaults a user expects (issue 28 point 6): each test drives the CLI the way a researcher would and checks the
behaviour they expect without reading the docs first."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from conftest import run_cli

from textseg_cli.data.io import write_nifti

SPACING = (1.0, 1.0, 2.0)


def _ball(shape, center, radius):
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return (((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2) < radius ** 2).astype(np.uint8)


# --- 2. a Wilcoxon over one pair is no test: "n/a", not a p-value ----------------------------------------------------
def test_compare_over_a_single_common_case_prints_na_not_a_p_value(tmp_path):
    shape = (16, 16, 10)
    write_nifti(tmp_path / "labels" / "c0.nii.gz", _ball(shape, (8, 8, 5), 4), SPACING)
    write_nifti(tmp_path / "pa" / "c0.nii.gz", _ball(shape, (8, 8, 5), 3), SPACING)
    write_nifti(tmp_path / "pb" / "c0.nii.gz", _ball(shape, (9, 8, 5), 4), SPACING)
    for name in ("pa", "pb"):
        code, out = run_cli("eval", "--pred", tmp_path / name, "--labels", tmp_path / "labels", "--out",
                            tmp_path / f"ev_{name}", "--name", name)
        assert code == 0, out
    code, out = run_cli("eval", "--compare", tmp_path / "ev_pa", tmp_path / "ev_pb", "--table", "md",
                        "--out", tmp_path / "t.md")
    assert code == 0, out
    table = (tmp_path / "t.md").read_text(encoding="utf-8")
    row = next(line for line in table.splitlines() if line.startswith("| pb "))
    assert row.rstrip().endswith("| n/a |"), table  # was "| 1.000 |": a p-value from one difference
    assert "single common case" in table


# --- 3. curves.png: only loss terms in the loss panel, legends beside the curves ------------------------------------
def test_curves_plot_only_loss_terms_and_keep_legends_off_the_curves(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    run = tmp_path / "run"
    run.mkdir()
    it = np.arange(10, 110, 10)
    pd.DataFrame({"iteration": it, "loss": np.linspace(1, 0.2, 10), "loss_dice": np.linspace(0.8, 0.1, 10),
                  "unsup_loss": np.linspace(0.3, 0.1, 10), "consistency_weight": np.linspace(0, 1, 10),
                  "data_wait_s": np.full(10, 0.02), "lr": np.full(10, 0.01), "it_per_s": np.full(10, 3.0),
                  "data_wait_share": np.full(10, 0.06), "phase": np.ones(10), "pseudo_fg_fraction": np.full(10, 0.1),
                  "time_s": it * 0.3}).to_csv(run / "log.csv", index=False)
    figures = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        result = real_savefig(fig, *args, **kwargs)
        figures.append((fig, fig.canvas.get_renderer()))  # before plt.close detaches the Agg canvas
        return result

    monkeypatch.setattr(Figure, "savefig", keep)
    code, out = run_cli("plot", run, "--out", tmp_path / "curves.png")
    assert code == 0, out
    fig, renderer = figures[-1]
    loss_ax = next(ax for ax in fig.axes if ax.get_title() == "loss terms")
    assert sorted(line.get_label() for line in loss_ax.lines) == ["loss", "loss_dice", "unsup_loss"]
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        for other in fig.axes:  # no legend lies over the plotting area of any panel
            assert not box.overlaps(other.get_window_extent(renderer)), (ax.get_title(), other.get_title())


TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=2", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1", "--iterations", "1", "--val-every", "0"]


# --- 1. no --labeled on a set with image-only cases: labeled = the cases with labels ------------------------------
def test_train_without_labeled_uses_the_cases_that_have_labels(synthetic_data, tmp_path):
    data = tmp_path / "mixed"
    shutil.copytree(synthetic_data, data)
    spec = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    train = spec["splits"]["train"]
    image_only = train[-2:]  # as `prep custom` orders them: labelled cases first, image-only ones at the end
    for case in spec["cases"]:
        if case["id"] in image_only:
            (data / case["label"]).unlink()
            case["label"] = None
    spec.pop("labeled", None)
    (data / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    run = tmp_path / "run"
    code, text = run_cli("train", "--method", "mcnet", "--data", data, "--out", run, *TINY)
    assert code == 0, text  # was: "case '...' is used with its label but the label file is missing" (exit 2)
    flat = " ".join(text.split())  # the console wraps long lines
    assert f"{len(train) - 2} labeled (no --labeled: the training cases with a label file" in flat, text
    cases = json.loads((run / "cases.json").read_text(encoding="utf-8"))
    assert cases["labeled"] == train[:-2] and cases["unlabeled"] == image_only


# --- 6. predict --images DIR: masks kept beside the images are not segmented ---------------------------------------
def test_predict_skips_label_files_in_the_images_folder_and_says_so(synthetic_data, tmp_path):
    run = tmp_path / "run"
    code, text = run_cli("train", "--method", "sup", "--data", synthetic_data, "--labeled", "2", "--out", run, *TINY)
    assert code == 0, text
    images = tmp_path / "new"
    rng = np.random.default_rng(0)
    for name in ("p1.nii.gz", "p2.nii.gz"):
        write_nifti(images / name, rng.standard_normal((32, 32, 16)).astype(np.float32), (1.5, 1.5, 2.0))
    for name in ("p1_gt.nii.gz", "p2_seg.nii.gz", "p3_label.nii.gz"):
        write_nifti(images / name, _ball((32, 32, 16), (16, 16, 8), 5), (1.5, 1.5, 2.0))
    out = tmp_path / "masks"
    code, text = run_cli("predict", run, "--images", images, "--out", out, "--checkpoint", "last", "--preprocessed",
                         "--device", "cpu")
    assert code == 0, text
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["p1.nii.gz", "p2.nii.gz"]  # was: 5 masks
    flat = " ".join(text.split())
    assert "skipped 3 file(s) named like labels" in flat and "p1_gt.nii.gz" in flat and "p3_label.nii.gz" in flat
    meta = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert sorted(meta["skipped_label_files"]) == ["p1_gt.nii.gz", "p2_seg.nii.gz", "p3_label.nii.gz"]
    # a single label-looking file given on purpose is still segmented
    code, text = run_cli("predict", run, "--images", images / "p1_gt.nii.gz", "--out", tmp_path / "one",
                         "--checkpoint", "last", "--preprocessed", "--device", "cpu")
    assert code == 0 and (tmp_path / "one" / "p1_gt.nii.gz").exists(), text


# --- 8. experiment YAML: an unquoted comma list in `set:` ----------------------------------------------------------
def test_experiment_set_with_an_unquoted_comma_list_reaches_the_config(tmp_path):
    spec = tmp_path / "e.yaml"
    spec.write_text("name: patch\ndataset: la\nlabeled: [8]\nseeds: [1]\nmethods:\n  - method: sup\n"
                    "    set: [data.patch_size=64,64,32, optim.lr=0.02]\n", encoding="utf-8")
    code, out = run_cli("experiment", "run", spec, "--dry-run")
    assert code == 0, out  # was: "--set '64': expected KEY=VALUE" (YAML split the item at its commas)
    flat = " ".join(out.split())
    assert "patch 64x64x32" in flat and "--set data.patch_size=64,64,32 --set optim.lr=0.02" in flat
    spec.write_text("name: patch\ndataset: la\nlabeled: [8]\nseeds: [1]\nmethods:\n  - method: sup\n"
                    "    set: [64, data.patch_size=64]\n", encoding="utf-8")
    code, out = run_cli("experiment", "run", spec, "--dry-run")
    assert code == 2 and 'set: ["data.patch_size=[64,64,32]"]' in " ".join(out.split()), out


# --- 5. class names written as identifiers read as words in a CLIP prompt --------------------------------------------
def test_encode_puts_words_not_underscores_into_clip_prompts(synthetic_data, tmp_path):
    data = tmp_path / "named"
    shutil.copytree(synthetic_data, data)
    spec = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    spec["class_names"] = ["background", "left_atrium"]
    (data / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    code, out = run_cli("encode", "--encoder", "clip", "--pretrained", "none", "--data", data,
                        "--out", tmp_path / "a.safetensors", "--device", "cpu")
    assert code == 0, out
    side = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert side["texts"] == ["A pixel of a background.", "A pixel of a left atrium."]  # was "... a left_atrium."
    assert side["class_names"] == ["background", "left_atrium"]  # the data set's names stay as recorded
    # VCLIPSeg's documented line names its classes explicitly: used exactly as typed
    code, out = run_cli("encode", "--encoder", "clip", "--pretrained", "none", "--dataset", "la",
                        "--classes", "Background,Left Atrial", "--out", tmp_path / "b.safetensors", "--device", "cpu")
    assert code == 0, out
    side = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    assert side["texts"] == ["A pixel of a Background.", "A pixel of a Left Atrial."]


# --- 7. prep overlays: axial slices in the radiological view, whatever the array order ------------------------------
def _oriented_set(root):
    """Three cases of one phantom, a blob at the patient's right-anterior, stored in different array orders:
    RAS, x flipped (LAS) and x/y swapped; the NIfTI affine says which."""
    import nibabel as nib

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ras = np.zeros((20, 16, 6), np.uint8)
    ras[14:18, 11:15, :] = 1  # high x = Right, high y = Anterior
    stored = {"ras": (ras, np.diag([1.0, 1.0, 2.0, 1.0])),
              "las": (ras[::-1].copy(), np.diag([-1.0, 1.0, 2.0, 1.0])),
              "swapped": (ras.transpose(1, 0, 2).copy(), np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0],
                                                                   [0, 0, 0, 1.0]]))}
    cases = []
    for cid, (lab, affine) in stored.items():
        img = lab.astype(np.float32) * 2 + np.random.default_rng(0).standard_normal(lab.shape).astype(np.float32) * 0.1
        nib.save(nib.Nifti1Image(img, affine), str(root / "images" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), str(root / "labels" / f"{cid}.nii.gz"))
        cases.append({"id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz",
                      "shape": list(lab.shape), "spacing": [1.0, 1.0, 2.0]})
    spec = {"format": "textseg-prepared/1", "name": "oriented", "dim": 3, "modality": "CT", "channel_names": ["CT"],
            "class_names": ["background", "blob"], "cases": cases,
            "splits": {"train": list(stored), "val": [], "test": []}, "preprocessing": [], "source": {},
            "tool_version": "test", "patch_size": [16, 16, 4]}
    (root / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    return root


def test_prep_overlays_show_the_patients_right_on_the_image_left_and_anterior_up(tmp_path):
    from PIL import Image

    from textseg_cli.reports.overlays import REFERENCE_COLOUR, auto_scale, panel_origin

    data = _oriented_set(tmp_path / "prepared")
    code, out = run_cli("prep", "overlays", data, "--n", "3", "--out", tmp_path / "ov")
    assert code == 0, out
    top, left = panel_origin(title=True, captions=True)
    scale = auto_scale((16, 20))
    for cid in ("ras", "las", "swapped"):
        pic = np.asarray(Image.open(tmp_path / "ov" / f"{cid}.png").convert("RGB"))
        pan = pic[top:top + 16 * scale, left:left + 20 * scale]  # displayed (anterior-posterior, right-left)
        rows, cols = np.nonzero(np.all(pan == REFERENCE_COLOUR, axis=-1))
        assert rows.size, cid
        # the blob sits at the patient's right-anterior: image left, top (was: bottom right for "ras")
        assert cols.mean() < pan.shape[1] / 2 and rows.mean() < pan.shape[0] / 2, (cid, rows.mean(), cols.mean())


# --- 9. export: TorchScript's deprecation notices are silenced, nothing else ----------------------------------------
def test_export_silences_only_torchscripts_own_deprecation_warnings(synthetic_data, tmp_path, monkeypatch):
    import warnings

    import torch

    from textseg_cli.inference import export

    run = tmp_path / "run"
    code, text = run_cli("train", "--method", "sup", "--data", synthetic_data, "--labeled", "2", "--out", run, *TINY)
    assert code == 0, text
    forward = export._Probabilities.forward

    def noisy(self, x):  # a model that warns while it is traced: the user must see that
        if torch.jit.is_tracing():
            warnings.warn("the model's own FutureWarning while traced", FutureWarning)
        return forward(self, x)

    monkeypatch.setattr(export._Probabilities, "forward", noisy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, text = run_cli("export", run, "--format", "torchscript", "--out", tmp_path / "exp", "--checkpoint",
                             "last")
    assert code == 0, text
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "torch.jit" in m], messages  # trace/save/load deprecations: silenced
    assert "the model's own FutureWarning while traced" in messages  # was: every FutureWarning swallowed


# --- 4. `textseg models`: CLIP towers counted on the meta device, no "random weights" warnings ---------------------
def test_models_counts_tgcnet_on_the_meta_device_without_warnings(monkeypatch):
    from textseg_cli.models.tgcnet import clip_backbone

    devices = []
    build = clip_backbone.build_open_clip

    def spy(*args, **kwargs):
        clip = build(*args, **kwargs)
        devices.append(next(clip.parameters()).device.type)
        return clip

    monkeypatch.setattr(clip_backbone, "build_open_clip", spy)
    code, out = run_cli("models", "--in-channels", "1", "--classes", "2", "--patch", "112,112,80")
    assert code == 0, out
    # was: open_clip moved the tower to the CPU, meta refused, and ViT-L-14-336 was built and initialised for real
    # (most of the command's 30 s), twice, each time logging "No pretrained weights loaded"
    assert devices and set(devices) == {"meta"}, devices
    assert "No pretrained weights loaded" not in out and "initialized randomly" not in out, out
    assert "439,165,026" in out and "427,944,193" in out  # tgcnet and its frozen CLIP: the counts of a real build


def test_tgcnet_class_prompts_speak_class_names_without_underscores():
    """The same rule as `textseg encode` (point 5) for TGC-Net's own class prompts (more than two classes)."""
    from textseg_cli.methods.tgcnet import TGCNetMethod
    from textseg_cli.models.tgcnet.clip_backbone import TINY_CLIP

    net = dict(clip_model=TINY_CLIP, d_model=64, cnn_channels=(8, 16, 32, 32, 64), sse_layers=1, decoder_hidden=32,
               window=4, date_heads=4)
    cfg = {"method": {"clip_model": "tiny", "date": "main-only", "net": {k: v for k, v in net.items()
                                                                           if k != "clip_model"}}}
    m = TGCNetMethod(cfg, 1, 3, dim=2, data_root=None, class_names=["background", "left_atrium", "right_atrium"])
    assert m.class_prompts == ["a photo of the background.", "a photo of the left atrium.",
                               "a photo of the right atrium."]

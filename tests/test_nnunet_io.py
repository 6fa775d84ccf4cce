"""nnU-Net v2 in (`prep nnunet`) and out (`export-data`), and nnU-Net's prediction folder in `eval --pred`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli
from raw_fakes import phantom_ct, write_image

SP = (0.8, 0.8, 2.0)


def _nnunet_raw(root, n=6):
    src = root / "Dataset501_Liver"
    for i in range(n):
        hu, lab = phantom_ct((20, 18, 6), seed=i, blob_radius=3)
        lab = lab.astype(np.uint8)
        lab[lab.shape[0] // 2:] *= 2  # half the blob is class 2
        write_image(src / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", hu, SP)
        write_image(src / "labelsTr" / f"liver_{i:03d}.nii.gz", lab, SP)
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": n, "file_ending": ".nii.gz", "name": "Liver"}))
    ids = [f"liver_{i:03d}" for i in range(n)]
    (src / "splits_final.json").write_text(json.dumps([{"train": ids[2:], "val": ids[:2]},
                                                       {"train": ids[:2] + ids[4:], "val": ids[2:4]}]))
    return src, ids


def test_prep_nnunet_keeps_names_and_folds(tmp_path):
    src, ids = _nnunet_raw(tmp_path)
    code, text = run_cli("prep", "nnunet", "--src", src, "--out", tmp_path / "p")
    assert code == 0, text
    ds = json.loads((tmp_path / "p" / "dataset.json").read_text(encoding="utf-8"))
    assert ds["class_names"] == ["background", "liver", "tumour"] and ds["channel_names"] == ["CT"]
    assert ds["modality"] == "CT" and ds["splits"]["val"] == ids[:2] and ds["splits"]["train"] == ids[2:]
    assert [f["val"] for f in ds["extra"]["folds"]] == [ids[:2], ids[2:4]]
    code, text = run_cli("prep", "msd", "--src", src, "--out", tmp_path / "m")
    assert code == 2 and "nnunet" in text.lower()


def test_export_data_nnunet_and_msd_and_eval_of_nnunet_predictions(tmp_path, synthetic_data):
    code, text = run_cli("export-data", synthetic_data, "--format", "nnunet", "--out", tmp_path / "Dataset502_Syn",
                         "--labeled", "4")
    assert code == 0, text
    src = json.loads((synthetic_data / "dataset.json").read_text(encoding="utf-8"))
    out = tmp_path / "Dataset502_Syn"
    spec = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert spec["labels"] == {n: i for i, n in enumerate(src["class_names"])} and spec["file_ending"] == ".nii.gz"
    splits = json.loads((out / "splits_final.json").read_text(encoding="utf-8"))
    assert splits == [{"train": src["splits"]["train"][:4], "val": src["splits"]["val"]}]
    assert spec["numTraining"] == 4 + len(src["splits"]["val"]) == len(list((out / "labelsTr").iterdir()))
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in src["splits"]["test"]]
    # nnU-Net's prediction folder as it writes it: masks plus its own json files
    pred = tmp_path / "nnunet_pred"
    pred.mkdir()
    for f in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        (pred / f).write_text("{}")
    for cid in src["splits"]["test"]:
        lab = nib.load(str(out / "labelsTs" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), lab.affine), str(pred / f"{cid}.nii.gz"))
    code, text = run_cli("eval", "--pred", pred, "--labels", synthetic_data, "--split", "test",
                         "--out", tmp_path / "ev", "--name", "nnunet")
    assert code == 0, text
    import pandas as pd

    df = pd.read_csv(tmp_path / "ev" / "per_case.csv")
    assert len(df) == len(src["splits"]["test"]) and (df["dice"] == 1.0).all()
    code, text = run_cli("export-data", synthetic_data, "--format", "msd", "--out", tmp_path / "Task09_Syn")
    assert code == 0, text
    msd = json.loads((tmp_path / "Task09_Syn" / "dataset.json").read_text(encoding="utf-8"))
    assert msd["numTraining"] == len(src["splits"]["train"]) + len(src["splits"]["val"])
    assert all((tmp_path / "Task09_Syn" / t["label"]).is_file() for t in msd["training"])


def test_export_passes_nnunet_integrity_check(tmp_path, synthetic_data, monkeypatch):
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    out = tmp_path / "Dataset503_Syn"
    code, text = run_cli("export-data", synthetic_data, "--out", out)
    assert code == 0, text
    verify.verify_dataset_integrity(str(out), num_processes=1)

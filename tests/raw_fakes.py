"""Tiny raw data sets in the layouts researchers download (DICOM series, NIfTI/NRRD/MHA, MSD, BraTS, h5),
generated on the fly for the preparer tests. Arrays are (x, y, z); geometry is LPS as SimpleITK uses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np


def phantom_ct(shape=(24, 20, 8), seed=0, blob_center=None, blob_radius=3):
    """A CT-like volume in HU (air outside an ellipsoidal body, soft tissue inside) and a blob label."""
    rng = np.random.RandomState(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    body = ((x - cx) / (shape[0] * 0.4)) ** 2 + ((y - cy) / (shape[1] * 0.4)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    c = blob_center or (int(cx), int(cy), shape[2] // 2)
    blob = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= blob_radius ** 2
    hu[blob] = 120.0
    return hu.astype(np.int16), blob.astype(np.uint8)


def sitk_image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    import SimpleITK as sitk

    arr = np.asarray(array)
    if arr.ndim == 4:  # (C, x, y, z) -> 4D image with channels last axis t
        img = sitk.JoinSeries([sitk_image(c, spacing, origin, direction) for c in arr])
        return img
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    return img


def write_image(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk_image(array, spacing, origin, direction), str(path))
    return path


def write_dicom_series(folder, hu, spacing=(0.8, 0.8, 2.0), origin=(-10.0, -20.0, 30.0), uid="1"):
    """Write a CT series slice by slice (int16 HU, rescale intercept -1024) with shuffled file names,
    so a reader must sort by ImagePositionPatient."""
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vol = sitk_image(hu.astype(np.int16), spacing, origin)
    series_uid = f"1.2.826.0.1.3680043.2.1125.{uid}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = hu.shape[2]
    names = list(range(n))
    random.Random(int(uid) if str(uid).isdigit() else 0).shuffle(names)
    for i in range(n):
        sl = sitk.GetImageFromArray(np.transpose(hu[:, :, i], (1, 0)).astype(np.int16)[None])
        sl.SetSpacing(spacing)
        tags = {"0008|0060": "CT", "0020|000e": series_uid, "0020|000d": series_uid + ".0",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(i + 1), "0018|0050": str(spacing[2]),
                "0020|0032": "\\".join(str(v) for v in vol.TransformIndexToPhysicalPoint((0, 0, i))),
                "0028|1052": "-1024", "0028|1053": "1", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{i + 1}"}
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"1-{names[i] + 1:03d}.dcm"))
        writer.Execute(sl)
    return folder


def write_h5(path, image, label):
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)
    return path


def make_msd_task(root, name="Task06_Lung", n=4, channels=1, labels=None, modality=None, shape=(24, 20, 8),
                  spacing=(0.8, 0.8, 2.5), prefix="lung"):
    """An MSD task folder: dataset.json, imagesTr/, labelsTr/ (+ macOS '._' junk the json does not list)."""
    root = Path(root) / name
    labels = labels or {"0": "background", "1": "cancer"}
    modality = modality or ({"0": "CT"} if channels == 1 else {str(i): f"MR{i}" for i in range(channels)})
    training = []
    for i in range(n):
        hu, lab = phantom_ct(shape, seed=i)
        img = hu if channels == 1 else np.stack([hu.astype(np.float32) + 100 * c for c in range(channels)])
        cid = f"{prefix}_{i + 1:03d}"
        write_image(root / "imagesTr" / f"{cid}.nii.gz", img, spacing)
        write_image(root / "labelsTr" / f"{cid}.nii.gz", lab, spacing)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    (root / "imagesTr" / f"._{prefix}_001.nii.gz").write_bytes(b"\x00junk")
    spec = {"name": name.split("_", 1)[-1], "modality": modality, "labels": labels, "numTraining": n,
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def make_brats(root, n_hgg=3, n_lgg=2, shape=(24, 24, 12)):
    """BraTS-2019 style training folders: HGG/ and LGG/ with <case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz."""
    root = Path(root) / "MICCAI_BraTS_2019_Data_Training"
    ids = []
    for grade, count in (("HGG", n_hgg), ("LGG", n_lgg)):
        for i in range(count):
            cid = f"BraTS19_{grade}_{i:03d}"
            rng = np.random.RandomState(len(ids))
            x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
            brain = ((x - 12) / 8.0) ** 2 + ((y - 12) / 9.0) ** 2 + ((z - 6) / 5.0) ** 2 <= 1
            seg = np.zeros(shape, np.uint8)
            seg[(x - 12) ** 2 + (y - 11) ** 2 + (z - 6) ** 2 <= 9] = 2
            seg[(x - 12) ** 2 + (y - 11) ** 2 + (z - 6) ** 2 <= 2] = 4
            seg[(x - 12) ** 2 + (y - 11) ** 2 + (z - 6) ** 2 <= 0] = 1
            for k, mod in enumerate(("flair", "t1", "t1ce", "t2")):
                img = np.where(brain, 200.0 + 50 * k + rng.normal(0, 20, shape), 0.0)
                img[seg > 0] += 300
                img[brain] = np.maximum(img[brain], 1.0)
                write_image(root / grade / cid / f"{cid}_{mod}.nii.gz", img.astype(np.float32), (1, 1, 1),
                            (0.0, -239.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
            write_image(root / grade / cid / f"{cid}_seg.nii.gz", seg, (1, 1, 1), (0.0, -239.0, 0.0),
                        (-1, 0, 0, 0, -1, 0, 0, 0, 1))
            ids.append(cid)
    return root, ids

"""`textseg prep lvit`: the LViT layout, its real-world quirks, and an error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli
from textseg_cli.data.prep.lvit import prep_lvit
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import DataError


def _make_split(root: Path, split: str, names: list[str], *, img_ext=".png", sheet_ext=".png", mask_prefix="",
                sheet: str | None = "own", size=(20, 16), rgb=True, texts: dict | None = None) -> dict[str, str]:
    """Write <root>/<Split>_Folder with tiny images/masks and (optionally) its spreadsheet."""
    folder = root / f"{split}_Folder"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    rng = np.random.default_rng(len(names))
    rows = {}
    for n in names:
        shape = (size[1], size[0], 3) if rgb else (size[1], size[0])
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / "img" / f"{n}{img_ext}")
        m = np.zeros((size[1], size[0]), np.uint8)
        m[2:6, 3:9] = 255
        Image.fromarray(m).save(folder / "labelcol" / f"{mask_prefix}{n}.png")
        rows[f"{mask_prefix}{n}{sheet_ext}"] = (texts or {}).get(n, f"Text of {n}, upper left.")
    if sheet == "own":
        pd.DataFrame({"Image": list(rows), "Description": list(rows.values())}).to_excel(
            folder / f"{split}_text.xlsx", index=False)
    return rows


def test_tif_images_with_png_sheet_and_layout(tmp_path):
    src = tmp_path / "src"
    _make_split(src, "Train", ["a1", "a2", "a3"])
    _make_split(src, "Val", ["b1"], rgb=False)
    _make_split(src, "Test", ["c1", "c2"], img_ext=".tif", sheet_ext=".png")  # MoNuSeg test quirk
    ds = prep_lvit(src, tmp_path / "out")
    assert ds.dim == 2 and ds.in_channels == 3  # grey val image replicated to the set's 3 channels
    assert {k: len(v) for k, v in ds.spec["splits"].items()} == {"train": 3, "val": 1, "test": 2}
    assert all(ds.text(c) == f"Text of {c}, upper left." for c in ds.case_ids)
    case = ds.load_case("c2")
    assert case.image.shape == (3, 16, 20) and case.image.dtype == np.float32  # (C, rows, cols)
    assert case.image.min() == 0.0 and case.image.max() == 1.0
    assert set(np.unique(case.label)) == {0, 1} and case.label[2:6, 3:9].all() and case.label.sum() == 24
    # Stored as released: row/column order matches the PNG on disk.
    src_img = np.asarray(Image.open(src / "Test_Folder" / "img" / "c2.tif"), dtype=np.float32)
    ch0 = (src_img[..., 0] - src_img[..., 0].min()) / np.ptp(src_img[..., 0])
    assert np.allclose(case.image[0], ch0, atol=1e-5)
    steps = [s["step"] for s in ds.spec["preprocessing"]]
    assert "minmax_per_channel" in steps and ds.spec["patch_size"] == [16, 20]


def test_qata_mask_prefix_and_shared_train_val_sheet(tmp_path):
    src = tmp_path / "src"
    rows = _make_split(src, "Train", ["covid_1", "covid_2"], mask_prefix="mask_", sheet=None, rgb=False)
    rows |= _make_split(src, "Val", ["covid_3"], mask_prefix="mask_", sheet=None, rgb=False)
    pd.DataFrame({"Image": list(rows), "Description": list(rows.values())}).to_excel(
        src / "Train_Val_text.xlsx", index=False)
    ds = prep_lvit(src, tmp_path / "out", resize=8)
    assert ds.in_channels == 1 and ds.spec["splits"] == {"train": ["covid_1", "covid_2"], "val": ["covid_3"]}
    assert ds.text("covid_3") == "Text of covid_3, upper left."
    case = ds.load_case("covid_1")
    assert case.image.shape == (1, 8, 8) and ds.spec["patch_size"] == [8, 8] and ds.spec["extra"]["resize"] == 8


def test_image_without_text_is_an_error_or_listed_exclusion(tmp_path):
    src = tmp_path / "src"
    _make_split(src, "Train", ["a1", "a2"])
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(src / "Train_Folder" / "img" / "lonely.png")
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(src / "Train_Folder" / "labelcol" / "lonely.png")
    code, out = run_cli("prep", "lvit", "--src", src, "--out", tmp_path / "o1")
    assert code == 2 and "lonely.png" in out and "no text row" in out
    code, out = run_cli("prep", "lvit", "--src", src, "--out", tmp_path / "o2", "--allow-missing-text")
    assert code == 0, out
    spec = json.loads((tmp_path / "o2" / "dataset.json").read_text(encoding="utf-8"))
    assert spec["splits"]["train"] == ["a1", "a2"]
    assert spec["extra"]["excluded"][0]["file"].endswith("lonely.png")


def test_text_row_without_image_is_an_error(tmp_path):
    src = tmp_path / "src"
    _make_split(src, "Train", ["a1"])
    df = pd.read_excel(src / "Train_Folder" / "Train_text.xlsx")
    df.loc[len(df)] = ["ghost.png", "No such image."]
    df.to_excel(src / "Train_Folder" / "Train_text.xlsx", index=False)
    with pytest.raises(DataError, match=r"Train_text\.xlsx.*ghost\.png"):
        prep_lvit(src, tmp_path / "out")


def test_mask_size_differs_from_image_is_an_error(tmp_path):
    src = tmp_path / "src"
    _make_split(src, "Train", ["a1", "a2"])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "Train_Folder" / "labelcol" / "a2.png")
    with pytest.raises(DataError, match=r"labelcol/a2\.png.*mask size 10x10 differs from image size 20x16"):
        prep_lvit(src, tmp_path / "out")


def test_missing_mask_and_missing_columns_name_the_file(tmp_path):
    src = tmp_path / "src"
    _make_split(src, "Train", ["a1", "a2"])
    (src / "Train_Folder" / "labelcol" / "a1.png").unlink()
    with pytest.raises(DataError, match=r"img/a1\.png.*no mask"):
        prep_lvit(src, tmp_path / "out")
    src2 = tmp_path / "src2"
    _make_split(src2, "Train", ["a1"], sheet=None)
    pd.DataFrame({"File": ["a1.png"], "Text": ["x"]}).to_excel(src2 / "Train_Folder" / "Train_text.xlsx", index=False)
    with pytest.raises(DataError, match=r"Train_text\.xlsx.*missing column"):
        prep_lvit(src2, tmp_path / "out2")


def test_real_monuseg_train_and_val(monuseg_dir, tmp_path):
    code, out = run_cli("prep", "lvit", "--src", monuseg_dir, "--out", tmp_path / "mono", "--resize", "64")
    assert code == 0, out
    ds = load_prepared(tmp_path / "mono")
    assert len(ds.split("train")) == 24 and len(ds.split("val")) == 6 and "test" not in ds.spec["splits"]
    assert all(ds.text(c) for c in ds.case_ids)
    assert ds.text("TCGA-21-5786-01Z-00-DX1") == "The nuclei density in the upper right is high."
    case = ds.load_case("TCGA-21-5786-01Z-00-DX1")
    assert case.image.shape == (3, 64, 64) and 0.05 < case.label.mean() < 0.6
    assert ds.spec["modality"] == "histology"  # known by name; DATE's offline prompts read it


def test_real_monuseg_smoke_train_and_eval(monuseg_dir, tmp_path, one_thread):
    """Real MoNuSeg end to end at toy size: prep → offline auxiliary prompts → tgcnet (tiny CLIP, DATE
    injection) → eval at 224×224 with each case's text."""
    data, run = tmp_path / "mono", tmp_path / "run"
    assert run_cli("prep", "lvit", "--src", monuseg_dir, "--out", data, "--resize", "64")[0] == 0
    code, out = run_cli("describe", "--per-case", data, "--llm", "offline")
    assert code == 0, out
    code, out = run_cli("train", "--method", "tgcnet", "--data", data, "--out", run, "--iterations", "3",
                        "--set", "data.profile=synthetic2d", "--set", "train.batch_labeled=2", "--val-every", "3",
                        "--clip-weights", "none")
    assert code == 0, out
    from textseg_cli.runs.load import load_run

    assert load_run(run, "last").method.date_mode == "injection"  # aux_texts.json found: the full DATE
    code, out = run_cli("eval", run, "--split", "val", "--eval-size", "224")
    assert code == 0, out
    df = pd.read_csv(run / "eval" / "val-best-whole" / "per_case.csv")
    assert len(df) == 6 and df["dice"].between(0, 1).all()



def test_protocol_lvit_reads_pixels_like_lvits_loader(tmp_path):
    src = tmp_path / "src"
    _make_split(src, "Train", ["a1"], size=(16, 16))
    with pytest.raises(DataError, match="needs --resize"):
        prep_lvit(src, tmp_path / "no", protocol="lvit")
    ds = prep_lvit(src, tmp_path / "out", resize=8, protocol="lvit")
    case = ds.load_case("a1", with_label=True)
    raw = np.asarray(Image.open(src / "Train_Folder" / "img" / "a1.png")).astype(np.float64)
    # 2× down, cv2 INTER_LINEAR: the mean of each 2×2 block, rounded to a grey level, / 255 (no min-max)
    expect = np.floor(raw.reshape(8, 2, 8, 2, 3).mean(axis=(1, 3)) + 0.5) / 255
    assert np.allclose(np.moveaxis(case.image, 0, -1), expect, atol=1e-6)
    # mask rows 2:6, cols 3:9 → blocks 1..2 × 1..4 (a half-covered block is > 0 after bilinear)
    want = np.zeros((8, 8), np.uint8)
    want[1:3, 1:5] = 1
    assert np.array_equal(case.label, want)
    assert ds.spec["extra"]["protocol"] == "lvit" and ds.spec["preprocessing"][-1]["params"]["divide_by"] == 255

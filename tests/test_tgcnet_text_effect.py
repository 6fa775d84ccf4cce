"""Does TGC-Net use the text? Two answers, both through the real training path (engine `train()`).

1. Default suite, a mechanism that holds on any CPU and precision: every image holds two look-alike
   lesions (one left, one right) and appears twice in the data set, once per text ("the lesion on the
   left." / "... right.") with that lesion as the label. A text-blind model sees the same image with two
   labels and can reach at most a mean Dice of about 2/3 (both lesions) on such pairs; a model that reads
   the text segments the named lesion, and switching the text moves the prediction to the other one.
2. Benchmark (`-m benchmark`): the original setting (synthetic2d, 300 iterations, true texts vs texts
   shuffled across the training cases) over several seeds, with the mean margin tested against its spread.
   A single seed's margin moves with the CPU (AMD EPYC vs Intel AMX kernels), so it is no default-suite claim.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from textseg_cli.data.prep.synthetic2d import prep_synthetic_2d
from textseg_cli.data.prep.writer import PreparedWriter
from textseg_cli.data.prepared import load_prepared
from textseg_cli.engine.setup import train
from textseg_cli.runs.load import load_run

SIDES = {"left": " ".join(["left"] * 8), "right": " ".join(["right"] * 8)}  # every token differs (random tiny CLIP)


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    return float(2 * (pred & label).sum() / max(1, pred.sum() + label.sum()))


def _left_right_pairs(out: Path, n_images: int, n_val_images: int, seed: int, size: int = 32) -> None:
    """Write the two-lesion set: image k is case `lr_k_left` (label = left lesion) and `lr_k_right`."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    half = size / 2
    w = PreparedWriter(out, name="synthetic2d-left-right", dim=2, modality="synthetic", channel_names=["intensity"],
                       class_names=["background", "lesion"])
    ids = []
    for k in range(n_images):
        image = 0.25 + 0.05 * rng.standard_normal((size, size)).astype(np.float32)
        masks = {}
        for side, c0 in (("left", 0.0), ("right", half)):
            r = rng.uniform(0.35, 0.42) * half  # discs of similar size and brightness: only the side tells them apart
            cr, cc = rng.uniform(r + 1, size - r - 1), c0 + rng.uniform(r + 1, half - r - 1)
            masks[side] = ((rows - cr) ** 2 + (cols - cc) ** 2 <= r * r).astype(np.uint8)
            image[masks[side] > 0] += 0.5
        image = np.clip(image, 0.0, 1.0).astype(np.float32)
        for side, text in SIDES.items():
            ids.append(f"lr_{k:03d}_{side}")
            w.add_case(ids[-1], image, masks[side], (1.0, 1.0), text=text)
    n_val = 2 * n_val_images
    w.finish(splits={"train": ids[:-n_val], "val": ids[-n_val:], "test": []},
             preprocessing=[{"step": "generate", "params": {"generator": "tests/test_tgcnet_text_effect.py",
                                                            "seed": seed, "size": [size, size]}}],
             source={"layout": "synthetic2d-left-right", "paths": []}, patch_size=[size, size], seed=seed)


@pytest.mark.benchmark  # 300 training iterations (~50-60 s idle, 500 s loaded); seed 0 in bf16 needed ~280 of them
@pytest.mark.parametrize("seed", [0])  # seeds 1, 2 pass too (see the docstring)
def test_tgcnet_segments_the_lesion_its_text_names(tmp_path, one_thread, seed):
    """300 iterations of the tiny TGC-Net (synthetic2d profile, lr 0.003, batch 8). Training first sits on the
    text-blind plateau (both lesions, loss ≈ 0.63) and then, once it reads the text, drops to ≈ 0.05. Measured on
    an Intel Xeon (AMX): the drop came between iterations 80 and 280 (seed 0 bf16 latest: still 0.65 at 200, 0.08 at
    280). One-word texts, whose random-CLIP features are closer, stayed on the plateau past 200 more often.
    With these texts, at iteration 200: named-lesion Dice min 0.93 / 0.97 / 0.98 (seed 1 fp32, seed 2 fp32, seed 2
    bf16) and Dice 0.000 with the lesion not named, on every validation case."""
    _left_right_pairs(tmp_path / "data", n_images=20, n_val_images=4, seed=seed)
    train("tgcnet", tmp_path / "data", iterations=300, out=tmp_path / "run", quiet=True, seed=seed,
          sets=["data.profile=synthetic2d", "val.every=0"])
    method = load_run(tmp_path / "run", "last").method
    ds = load_prepared(tmp_path / "data")
    val = ds.split("val")
    named, other = [], []
    with torch.no_grad():
        for cid in val[::2]:
            cases = {side: ds.load_case(cid.replace("_left", f"_{side}")) for side in SIDES}
            image = torch.from_numpy(cases["left"].image)[None]
            for side, swapped in (("left", "right"), ("right", "left")):
                method.set_case_text(cases[side].text)
                pred = method.predict_proba(image)[0].argmax(0).numpy().astype(bool)
                named.append(_dice(pred, cases[side].label.astype(bool)))
                other.append(_dice(pred, cases[swapped].label.astype(bool)))
    table = {"named": [round(d, 3) for d in named], "other": [round(d, 3) for d in other]}
    # a text-blind prediction is the same for both texts of an image: its mean named Dice is at most ~2/3
    assert min(named) >= 0.85 and float(np.mean(named)) >= 0.9, table
    assert max(other) <= 0.15, table


def _synthetic_with_shuffled_texts(root: Path, seed: int) -> None:
    """`root/true`: synthetic2d (132 cases, 32²); `root/shuf`: the same with the training cases' texts shuffled."""
    prep_synthetic_2d(root / "true", n_cases=132, size=32, seed=seed, n_val=12, n_test=0)
    shutil.copytree(root / "true", root / "shuf")
    spec = json.loads((root / "shuf" / "dataset.json").read_text(encoding="utf-8"))
    train_ids = set(spec["splits"]["train"])
    texts = [c["text"] for c in spec["cases"] if c["id"] in train_ids]
    random.Random(seed).shuffle(texts)
    it = iter(texts)
    for c in spec["cases"]:
        if c["id"] in train_ids:
            c["text"] = next(it)
    (root / "shuf" / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")


def true_vs_shuffled(root: Path, seed: int, iterations: int = 300) -> dict[str, float]:
    """Validation Dice (each case scored with its true text) of a run trained on true and on shuffled texts."""
    _synthetic_with_shuffled_texts(root, seed)
    ds = load_prepared(root / "true")
    scores = {}
    for name in ("true", "shuf"):
        train("tgcnet", root / name, iterations=iterations, out=root / f"run_{name}", quiet=True, seed=seed,
              sets=["data.profile=synthetic2d", "val.every=0"])
        method = load_run(root / f"run_{name}", "last").method
        dice = []
        with torch.no_grad():
            for cid in ds.split("val"):
                case = ds.load_case(cid)
                method.set_case_text(case.text)
                pred = method.predict_proba(torch.from_numpy(case.image)[None])[0].argmax(0).numpy().astype(bool)
                dice.append(_dice(pred, case.label.astype(bool)))
        scores[name] = float(np.mean(dice))
    return scores


SPREAD_SEEDS = (0, 1, 2)
T_95_ONE_SIDED = {2: 2.920, 3: 2.353, 4: 2.132}  # Student t quantile 0.95 by degrees of freedom (n − 1)


@pytest.mark.benchmark  # 3 seeds × 2 runs × 300 iterations: about 10-25 min on 2 CPU cores
@pytest.mark.timeout(3600)
def test_true_text_beats_shuffled_text_over_seeds(tmp_path, one_thread):
    """One-sided paired t-test over seeds: mean(true − shuffled) > t_{0.95, n−1} · SD / √n, i.e. the margin
    is positive at the 5 % level. The seed (data, shuffle, initialisation) is the unit of replication."""
    rows = []
    for seed in SPREAD_SEEDS:
        s = true_vs_shuffled(tmp_path / f"s{seed}", seed)
        rows.append((seed, s["true"], s["shuf"], s["true"] - s["shuf"]))
    margins = [r[3] for r in rows]
    n, mean, sd = len(margins), statistics.mean(margins), statistics.stdev(margins)
    print("\nseed | Dice true | Dice shuffled | true - shuffled")
    for seed, t, sh, m in rows:
        print(f"{seed} | {t:.4f} | {sh:.4f} | {m:+.4f}")
    print(f"mean {mean:+.4f}, SD {sd:.4f}, n {n}, t = {mean / (sd / math.sqrt(n)) if sd else float('inf'):.2f}")
    assert mean > T_95_ONE_SIDED[n - 1] * sd / math.sqrt(n), rows

"""`textseg plan`: fingerprint, target spacing, patch and batch within memory, iterations within the time budget.

Timings are injected (`--s-per-it`, `--s-per-val-case`, a fake probe) so that no assertion depends on the speed
of the machine running the tests; the memory trials on the tiny synthetic set are real but far below any limit.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import one_line_error, run_cli

from textseg_cli.data.prep.synthetic import prep_synthetic
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError
from textseg_cli.experiments import plan as planmod
from textseg_cli.experiments.plan import Trial, fit_budget, make_plan, target_spacing
from textseg_cli.runs.checks import patch_multiple
from textseg_cli.runs.config import build_config

S_IT, S_CASE = 0.01, 0.02


def _plan_cli(tmp_path, data, *extra):
    out, js = tmp_path / "plan.yaml", tmp_path / "plan.json"
    code, text = run_cli("plan", data, "--method", "sup", "--device", "cpu", "--out", out, "--json", js, *extra)
    return code, text, out, js


def test_plan_cli_fingerprint_budget_and_round_trip(tmp_path, synthetic_data, one_thread):
    code, text, out, js = _plan_cli(tmp_path, synthetic_data, "--budget-min", "0.5", "--s-per-it", str(S_IT),
                                    "--s-per-val-case", str(S_CASE))
    assert code == 0, text
    assert "data.patch_size" in text and "train.iterations" in text  # the rich table, one reason per value
    rec = json.loads(js.read_text())
    cfg = yaml.safe_load(out.read_text())
    assert cfg == rec["config"]
    assert out.read_text().startswith("# textseg plan")  # reasons as comments above the config

    # fingerprint: recomputed here with numpy from the prepared files of splits train + val (never test)
    ds = load_prepared(synthetic_data)
    ids = ds.split("train") + ds.split("val")
    fp = rec["fingerprint"]
    assert fp["cases"] == len(ids) and fp["labeled"] == len(ids) and fp["unlabeled"] == 0
    entries = {c["id"]: c for c in ds.spec["cases"]}
    assert fp["median_spacing"] == pytest.approx(np.median([entries[c]["spacing"] for c in ids], axis=0))
    assert fp["median_shape"] == pytest.approx(np.median([entries[c]["shape"] for c in ids], axis=0))
    fg_vals, fg_counts = [], []
    for cid in ids:
        case = ds.load_case(cid)
        assert (case.label > 0).sum() <= planmod.MAX_FG_SAMPLES  # every foreground voxel enters the statistics
        fg_vals.append(case.image[0][case.label > 0])
        fg_counts.append(int((case.label == 1).sum()))
    v = np.concatenate(fg_vals).astype(np.float64)
    st = fp["intensity"][0]
    assert st["mean"] == pytest.approx(v.mean()) and st["std"] == pytest.approx(v.std())
    assert st["percentile_00_5"] == pytest.approx(np.percentile(v, 0.5))
    assert st["percentile_99_5"] == pytest.approx(np.percentile(v, 99.5))
    assert st["min"] == pytest.approx(v.min()) and st["max"] == pytest.approx(v.max())
    assert fp["foreground"][0]["median_voxels"] == pytest.approx(np.median(fg_counts))

    # patch: a multiple of the network's, at least 16, no larger than the median shape allows
    full = build_config("sup", ds.name, ds.dim, ds.patch_size, user_config=cfg)
    k = patch_multiple(full)
    patch = cfg["data"]["patch_size"]
    assert all(p % k == 0 and p >= 16 for p in patch)
    assert all(p <= max(16, m) for p, m in zip(patch, rec["median_shape_at_target"]))
    assert cfg["train"]["batch_labeled"] >= 2 and cfg["train"]["batch_unlabeled"] == 0  # sup: labelled only

    # budget arithmetic: iterations x s/it + validations x cases x s/case within the budget, validation last
    it, every, n_val = cfg["train"]["iterations"], cfg["val"]["every"], len(ds.split("val"))
    budget = 0.5 * 60
    assert it % every == 0
    spent = it * S_IT + (it // every) * n_val * S_CASE
    assert spent <= budget * (1 - planmod.MARGIN) + 1e-9
    assert (it // every) * n_val * S_CASE <= planmod.VAL_SHARE * budget
    assert spent + every * S_IT + n_val * S_CASE > budget * (1 - planmod.MARGIN) * (1 - planmod.VAL_SHARE)  # not wasteful
    assert cfg["train"]["time_budget_min"] == 0.5
    assert rec["measured"]["s_per_it"] == S_IT and rec["measured"]["expected_seconds"] == pytest.approx(spent)

    # the YAML is a `train --config` layer: resolved as written, and it trains
    code, text = run_cli("train", "--method", "sup", "--data", synthetic_data, "--config", out, "--print-config")
    assert code == 0, text
    shown = yaml.safe_load(text)
    assert shown["data"]["patch_size"] == patch and shown["train"]["iterations"] == it
    assert shown["val"]["every"] == every and shown["train"]["batch_labeled"] == cfg["train"]["batch_labeled"]
    run = tmp_path / "run"
    code, text = run_cli("train", "--method", "sup", "--data", synthetic_data, "--config", out, "-n", "1",
                         "--out", run, "--device", "cpu", "--threads", "1")
    assert code == 0, text
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["patch_size"] == patch and saved["train"]["batch_labeled"] == cfg["train"]["batch_labeled"]


def test_plan_measures_timing_when_not_given(tmp_path, synthetic_data, one_thread):
    code, text, out, js = _plan_cli(tmp_path, synthetic_data, "--budget-min", "0.2")
    assert code == 0, text
    m = json.loads(js.read_text())["measured"]
    assert m["s_per_it"] > 0 and "timed" in m["s_per_it_source"] and m["s_per_val_case"] > 0
    assert m["trial_peak_bytes"] > 0 and m["trial_peak_bytes"] <= m["memory_limit_bytes"]
    cfg = yaml.safe_load(out.read_text())
    assert cfg["train"]["iterations"] * m["s_per_it"] <= 0.2 * 60


@pytest.mark.parametrize("args, needle", [
    (["--budget-min", "0"], "--budget-min"),
    (["--budget-min", "-3"], "--budget-min"),
    (["--budget-min", "0.001", "--s-per-it", "1"], "iteration(s)"),
    (["--s-per-it", "0"], "--s-per-it"),
    (["--memory-gb", "0.000001"], "does not fit"),
    (["--memory-gb", "-1"], "--memory-gb"),
    (["--method", "no-such-method"], "unknown method"),
    (["--device", "tpu"], "--device"),
])
def test_bad_inputs_exit_2(tmp_path, synthetic_data, one_thread, args, needle):
    code, text, out, _ = _plan_cli(tmp_path, synthetic_data, *args)
    one_line_error(code, text, needle)
    assert not out.exists()


def test_missing_data_and_existing_out_exit_2(tmp_path, synthetic_data):
    code, text, _, _ = _plan_cli(tmp_path, tmp_path / "nowhere")
    one_line_error(code, text, "nowhere")
    (tmp_path / "plan.yaml").write_text("mine\n")
    code, text, out, _ = _plan_cli(tmp_path, synthetic_data)
    assert code == 2 and out.read_text() == "mine\n", text


def test_target_spacing_median_and_anisotropy_rule():
    iso_sp, iso_sh = [[1.0, 1.0, 1.0], [0.8, 0.8, 1.2], [1.2, 1.1, 0.9]], [[100, 100, 90]] * 3
    t, why = target_spacing(iso_sp, iso_sh)
    assert t == pytest.approx(np.median(iso_sp, axis=0)) and "median" in why
    # thick slices with few voxels: nnU-Net takes the 10th percentile of that axis (not below the others' largest)
    sp = [[0.7, 0.7, z] for z in (5.0, 5.0, 3.0, 6.0, 2.5, 5.0)]
    sh = [[512, 512, 40]] * 6
    t, why = target_spacing(sp, sh)
    assert t[:2] == pytest.approx([0.7, 0.7])
    assert t[2] == pytest.approx(np.percentile([s[2] for s in sp], 10)) and t[2] < 5.0 and "10th percentile" in why
    # coarse axis but as many voxels: the median stays (the voxel condition of the rule)
    t, _ = target_spacing(sp, [[64, 64, 60]] * 6)
    assert t[2] == pytest.approx(5.0)


def test_fit_budget_arithmetic():
    s = fit_budget(600.0, 0.5, 2.0, 4)
    assert s.iterations % s.val_every == 0 and s.validations == planmod.MAX_VALIDATIONS
    assert s.iterations * 0.5 + s.validations * 4 * 2.0 <= 600 * (1 - planmod.MARGIN)
    # one validation of all cases exceeds the validation share: the first cases that fit, once, at the end
    s = fit_budget(600.0, 0.5, 30.0, 8)
    assert s.validations == 1 and s.max_cases == math.floor(planmod.VAL_SHARE * 600 * (1 - planmod.MARGIN) // 30)
    assert s.val_every == s.iterations and s.iterations * 0.5 + s.max_cases * 30.0 <= 600 * (1 - planmod.MARGIN)
    # not even one case fits: validation off
    s = fit_budget(600.0, 0.5, 200.0, 8)
    assert s.validations == 0 and s.val_every == 0 and s.iterations == int(600 * (1 - planmod.MARGIN) // 0.5)
    with pytest.raises(ConfigError, match="iteration"):
        fit_budget(10.0, 5.0, 1.0, 1)


class FakeProbe:
    """Peak memory = FIXED + PER_VOXEL x images x voxels; no network is run."""
    FIXED, PER_VOXEL = 50e6, 2000.0

    def __init__(self):
        self.model = object()
        self.trials = []

    def trial(self, patch, bl, bu, steps=1, warmup=0, limit=None):
        peak = self.FIXED + self.PER_VOXEL * (bl + bu) * float(np.prod(patch))
        self.trials.append((list(patch), bl, bu))
        return Trial(list(patch), (bl, bu), peak, [0.25] * steps, fits=limit is None or peak <= limit)

    def validation_case_s(self, volume):
        return 1.0, "fake"


@pytest.fixture(scope="module")
def larger_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "prepared"
    prep_synthetic(out, n_cases=4, size=(96, 64, 48), n_classes=1, seed=0, n_val=1, n_test=1, patch_size=(32, 32, 32))
    return out


def test_patch_shrinks_largest_axis_until_it_fits(larger_set):
    # sup on 'synthetic': batches of 2 (+0); start [96, 64, 48] = the median shape in multiples of 16
    limit_vox = 64 * 48 * 48  # fits once the patch holds at most this many voxels
    gb = (FakeProbe.FIXED + FakeProbe.PER_VOXEL * 2 * limit_vox) / 2**30
    probe = FakeProbe()
    plan = make_plan(larger_set, method="sup", device="cpu", budget_min=5, memory_gb=gb, probe=probe)
    expected, p = None, [96, 64, 48]
    while expected is None:  # shrink the largest side by 16 until it fits
        if np.prod(p) <= limit_vox:
            expected = p
        else:
            i = int(np.argmax(p))
            p = p[:i] + [p[i] - 16] + p[i + 1:]
    assert plan.config["data"]["patch_size"] == expected == [48, 64, 48]
    assert plan.config["train"]["batch_labeled"] == 2  # the patch shrank: the batch stays at the minimum
    assert plan.measured["s_per_it"] == 0.25  # the probe's timed steps
    assert plan.config["train"]["iterations"] * 0.25 + plan.config["train"]["iterations"] // max(
        1, plan.config["val"]["every"]) * 1.0 <= 5 * 60
    never = [t for t in probe.trials if np.prod(t[0]) > 96 * 64 * 48]
    assert not never


def test_batch_grows_when_the_whole_median_shape_fits(larger_set):
    probe = FakeProbe()
    plan = make_plan(larger_set, method="sup", device="cpu", budget_min=5, memory_gb=64, probe=probe)
    assert plan.config["data"]["patch_size"] == [96, 64, 48]
    b = plan.config["train"]["batch_labeled"]
    # nnU-Net's cap: one batch within 5 % of the data's voxels (3 train+val cases of 96x64x48 here)
    cap = int(planmod.BATCH_VOXEL_SHARE * 3 * 96 * 64 * 48 // (96 * 64 * 48))
    assert b == max(planmod.MIN_BATCH, min(planmod.MAX_BATCH, cap))


def test_prep_custom_plan_writes_plan_yaml(tmp_path, one_thread):
    from raw_fakes import phantom_ct, write_image

    images, labels = tmp_path / "imgs", tmp_path / "labs"
    for i in range(5):
        hu, lab = phantom_ct((40, 36, 20), seed=i, blob_radius=6)
        write_image(images / f"c{i}.nii.gz", hu, (1.0, 1.0, 1.0))
        write_image(labels / f"c{i}.nii.gz", lab, (1.0, 1.0, 1.0))
    out = tmp_path / "out"
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", out, "--split", "3,1,1",
                         "--plan")
    assert code == 0, text
    cfg = yaml.safe_load((out / "plan.yaml").read_text())
    assert all(p % 16 == 0 for p in cfg["data"]["patch_size"]) and cfg["train"]["iterations"] >= planmod.MIN_ITERATIONS
    assert "data.patch_size" in text


class SlowProbe(FakeProbe):
    """Steps take time in proportion to the voxels of the batch: the largest patch leaves too few iterations."""

    def trial(self, patch, bl, bu, steps=1, warmup=0, limit=None):
        t = super().trial(patch, bl, bu, steps, warmup, limit)
        t.step_s = [2e-6 * (bl + bu) * float(np.prod(patch))] * steps
        return t


def test_patch_shrinks_for_time_down_to_min_iterations(larger_set):
    plan = make_plan(larger_set, method="sup", device="cpu", budget_min=5, memory_gb=64, probe=SlowProbe(),
                     min_iterations=500)
    m = plan.measured
    assert m["memory_patch"] == [96, 64, 48] and m["memory_patch_iterations"] < 500
    patch = plan.config["data"]["patch_size"]
    assert np.prod(patch) < np.prod(m["memory_patch"]) and all(p % 16 == 0 and p >= 48 for p in patch)
    assert plan.config["train"]["iterations"] >= 500 or all(p <= 64 for p in patch)
    kept = make_plan(larger_set, method="sup", device="cpu", budget_min=5, memory_gb=64, probe=SlowProbe(),
                     min_iterations=0)
    assert kept.config["data"]["patch_size"] == [96, 64, 48]

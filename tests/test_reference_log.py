"""`textseg plot RUN --reference-log FILE`: AD-MT's official per-iteration logs parsed (reports/reference_logs.py)
and drawn beside a run's curves; a file in no known format is a one-line error naming the file and the line."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
from conftest import SHARED, one_line_error, run_cli

import textseg_cli.reports.curves as curves
from textseg_cli.errors import DataError
from textseg_cli.reports.reference_logs import read_reference_log

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

ADMT_LOGS = SHARED / "official" / "AD-MT" / "training-logs"

# the shapes of AD-MT's log lines (code/train_post_3d_aut.py), with tqdm's bars around them as in the shipped logs
SYNTHETIC_LOG = """{'base_lr': 0.01,
 'batch_size': 4}
  0%|          | 0/3 [00:00<?, ?it/s]iteration:1  t-loss:0.6000, loss-lb:0.5900, loss-ulb:0.7000, \
conflict/consist:0.0000/0.0000, weight:0.01, high-r:0.00, conflic:465363, lr:0.0100, alt:True
iteration:2  t-loss:0.5000, loss-lb:0.4900, loss-ulb:0.6000, conflict/consist:0.0000/0.0000, weight:0.01, \
high-r:0.10, conflic:1000, lr:0.0100, alt:False

 50%|#####     | 1/2 [00:02<00:02,  2.69s/it][A
average metric is 0.5
iteration 2 : dice_score: 0.420000 best_dice: 0.420000
 <<Test>> - Ep:0  - Dice-S/T:40.00/42.00, Best-S:40.00, Best-T:42.00
          - AvgLoss(lb/ulb/all):0.43/0.08/0.35, highR:/0.18
iteration:3  t-loss:0.4000, loss-lb:0.3900, loss-ulb:0.5000, conflict/consist:0.1000/0.2000, weight:0.02, \
high-r:0.20, conflic:10, lr:0.0099, alt:False
"""


def _fields(line: str) -> dict[str, str]:
    """The `key:value` fields of a training line, split by hand (not with the parser's regular expressions)."""
    body = line[line.index("iteration:"):]
    head, rest = body.split("  ", 1)
    out = {"iteration": head.split(":")[1]}
    for item in rest.split(", "):
        key, value = item.split(":", 1)
        out[key] = value
    return out


def test_parses_a_real_admt_log_as_its_lines_say():
    path = ADMT_LOGS / "log_LA_lb4.log"
    if not path.is_file():
        pytest.skip(f"AD-MT's official training logs not available at {ADMT_LOGS}")
    df = read_reference_log(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    steps = [_fields(ln) for ln in lines if "iteration:" in ln]
    dice_lines = [ln.split() for ln in lines if "dice_score" in ln]  # iteration N : dice_score: X best_dice: Y
    tests = [ln for ln in lines if "<<Test>>" in ln]
    assert len(df) == len(steps) == 15000 and df["iteration"].tolist() == list(range(1, 15001))
    assert {"iteration", "loss", "loss_lb", "loss_ulb", "lr", "weight", "dice", "dice_student"} <= set(df.columns)
    by_it = df.set_index("iteration")
    for f in steps[::499] + steps[-1:]:
        row = by_it.loc[int(f["iteration"])]
        assert row["loss"] == float(f["t-loss"]) and row["loss_lb"] == float(f["loss-lb"])
        assert row["loss_ulb"] == float(f["loss-ulb"]) and row["lr"] == float(f["lr"])
        assert row["weight"] == float(f["weight"]) and row["conflic"] == float(f["conflic"])
        assert (row["conflict"], row["consist"]) == tuple(float(v) for v in f["conflict/consist"].split("/"))
        assert row["alt"] == (1.0 if f["alt"] == "True" else 0.0)
    assert df["dice"].notna().sum() == len(dice_lines) == len(tests) == 100
    for words, test in zip(dice_lines, tests):
        it, dice = int(words[1]), float(words[4])
        assert by_it.loc[it, "dice"] == dice
        student = float(test.split("Dice-S/T:")[1].split("/")[0]) / 100
        assert by_it.loc[it, "dice_student"] == pytest.approx(student, abs=1e-12)
    assert by_it.loc[190, "dice"] == 0.210953 and by_it.loc[15000, "dice"] == 0.891499  # as printed in the file


def test_parses_the_format_with_progress_bars_and_two_term_fields(tmp_path):
    path = tmp_path / "admt.log"
    path.write_text(SYNTHETIC_LOG, encoding="utf-8")
    df = read_reference_log(path)
    assert df["iteration"].tolist() == [1, 2, 3] and df["loss"].tolist() == [0.6, 0.5, 0.4]
    assert df["lr"].tolist() == [0.01, 0.01, 0.0099] and df["alt"].tolist() == [1.0, 0.0, 0.0]
    assert (df.loc[2, "conflict"], df.loc[2, "consist"]) == (0.1, 0.2)
    assert math.isnan(df.loc[0, "dice"]) and df.loc[1, "dice"] == 0.42 and df.loc[1, "dice_student"] == 0.4
    assert math.isnan(df.loc[2, "dice"])


@pytest.mark.parametrize("text,where", [
    ("iteration,loss\n1,0.5\n", "line 1"),  # a log.csv, not an official log
    ("", "the file is empty"),
    ("iteration:1  t-loss:0.5, lr:0.01\niteration:2  t-loss:0.4x, lr:0.01\n", "line 2"),  # a garbled value
    ("iteration:1  t-loss:0.5, lr:0.01\niteration:2 loss 0.4\n", "line 2"),  # a step line cut short
    ("iteration:1  t-loss:0.5\niteration 1 : dice_score: high\n", "line 2"),
    ("iteration:1  t-loss:0.5\niteration:1  t-loss:0.4\n", "iteration 1 is logged twice"),
], ids=["csv", "empty", "value", "step", "dice", "twice"])
def test_unknown_or_broken_files_are_data_errors_naming_file_and_line(tmp_path, text, where):
    path = tmp_path / "odd.log"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_reference_log(path)
    msg = str(info.value)
    assert str(path) in msg and where in msg and "\n" not in msg
    with pytest.raises(DataError, match="reference log not found"):
        read_reference_log(tmp_path / "missing.log")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_data):
    """A 2-iteration run with validation at both steps (one training for the module's plot tests)."""
    run = tmp_path_factory.mktemp("plot") / "run"
    code, out = run_cli("train", "--method", "sup", "--data", synthetic_data, "--labeled", "2", "--iterations", "2",
                        "--out", run, "--device", "cpu", "--threads", "1", "--val-every", "1", "--set",
                        "train.log_every=1", "--set", "method.backbone.n_filters=2", "--set", "train.batch_labeled=1")
    assert code == 0, out
    return run


def test_plot_draws_the_reference_beside_the_run(tmp_path, tiny_run, monkeypatch):
    run = tiny_run
    ref = tmp_path / "log_LA_lb4.log"
    ref.write_text(SYNTHETIC_LOG, encoding="utf-8")
    figures = []
    build = curves.curves_figure

    def keep(*args, **kwargs):
        figures.append(build(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(curves, "curves_figure", keep)
    code, out = run_cli("plot", run, "--reference-log", ref, "--out", tmp_path / "cmp.png")
    assert code == 0, out
    assert (tmp_path / "cmp.png").stat().st_size > 1000 and "wrote" in out
    (fig,) = figures
    panels = {ax.get_title(): ax for ax in fig.axes}
    loss = {ln.get_label(): ln for ln in panels["loss terms"].lines}
    dice = {ln.get_label(): ln for ln in panels["validation Dice"].lines}
    assert set(loss) == {"loss", "loss_ce", "loss_dice", "log_LA_lb4.log: loss"}, sorted(loss)
    assert set(dice) == {"run", "log_LA_lb4.log"}
    np.testing.assert_array_equal(loss["log_LA_lb4.log: loss"].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(loss["log_LA_lb4.log: loss"].get_ydata(), [0.6, 0.5, 0.4])
    np.testing.assert_array_equal(dice["log_LA_lb4.log"].get_xdata(), [2])
    np.testing.assert_array_equal(dice["run"].get_xdata(), [1, 2])
    assert "log_LA_lb4.log" in [t.get_text() for t in panels["validation Dice"].get_legend().get_texts()]
    assert all(ax.get_xlabel() == "iteration" for ax in (panels["consistency weight"], panels["validation Dice"]))
    # the run alone: no reference line
    alone = curves.curves_figure([run])
    assert not [ln for ax in alone.axes for ln in ax.lines if "log_LA_lb4.log" in ln.get_label()]
    plt.close(alone)


def test_plot_with_a_real_admt_log(request):
    path = ADMT_LOGS / "log_pancrease_lb6.log"
    if not path.is_file():
        pytest.skip(f"AD-MT's official training logs not available at {ADMT_LOGS}")
    fig = curves.curves_figure([request.getfixturevalue("tiny_run")], reference_logs=[path])
    ref = [ln for ax in fig.axes for ln in ax.lines if ln.get_label().startswith("log_pancrease_lb6.log")]
    assert len(ref) == 4  # loss, lr, weight, Dice
    assert max(max(ln.get_xdata()) for ln in ref) == 15000
    plt.close(fig)


def test_plot_refuses_a_file_in_no_known_format(tmp_path, tiny_run):
    run = tiny_run
    bad = tmp_path / "not_a_log.txt"
    bad.write_text("epoch 1 loss=0.5\n", encoding="utf-8")
    code, out = run_cli("plot", run, "--reference-log", bad, "--out", tmp_path / "cmp.png")
    one_line_error(code, out, "not_a_log.txt", "line 1", "not a known per-iteration training log")
    assert not (tmp_path / "cmp.png").exists()

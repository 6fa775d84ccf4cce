"""Training curves from RUN/log.csv: `RUN/curves.png` (written by training) and `textseg plot RUN [RUN ...]`.

Four panels against iteration: loss terms, learning rate, consistency weight(s) and validation Dice.
Several runs are overlaid with one colour per run (the total loss solid, its terms dashed). `--reference-log FILE`
adds an official per-iteration log (reports/reference_logs.py) beside them: its total loss, learning rate,
consistency weight and validation Dice, drawn thin in a colour of its own and labelled with the file's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from textseg_cli.console import err_console
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.reports.reference_logs import read_reference_log
from textseg_cli.storage.files import atomic_path



def loss_columns(columns) -> list[str]:
    """The loss terms of a log.csv: `loss` and the columns that name a loss (loss_dice, unsup_loss, ...); timing,
    throughput and diagnostics (data_wait_s, it_per_s, phase, pseudo_fg_fraction) are not losses."""
    return [c for c in columns if "loss" in str(c).lower() and not str(c).startswith("val_")]



def read_log(run_dir: str | Path):

    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        raise DataError("no log.csv (not a run folder, or training has not logged yet)", path)
    return pd.read_csv(path)


def curves_figure(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None,
                  reference_logs: Sequence[str | Path] = ()):
    """The matplotlib Figure of the curves of one or more runs, with the official logs `reference_logs` overlaid
    (x axis: iterations for both). The caller saves and closes it."""
    try:
        import matplotlib  # lazy: heavy (matplotlib)
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'textseg-cli[plot]'") from None
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt  # lazy: heavy (matplotlib)


    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise DataError("no run folders given")
    logs = [read_log(r) for r in runs]  # every file read before the figure exists: an error leaves none open
    references = [(Path(p).name, read_reference_log(p)) for p in reference_logs]
    names = list(labels) if labels else [r.name for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (ax_loss, ax_lr), (ax_w, ax_val) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (df, name) in enumerate(zip(logs, names)):
        c = colours[i % len(colours)]
        it = df["iteration"]
        terms = loss_columns(df.columns)
        for j, col in enumerate(terms):
            s = df[col].notna()
            if s.any():  # one run: a colour per term; several: a colour per run, the terms dashed
                ax_loss.plot(it[s], df[col][s], color=c if len(runs) > 1 else colours[j % len(colours)],
                             ls="-" if col == "loss" else "--", lw=1.5 if col == "loss" else 0.8,
                             label=f"{name}: {col}" if len(runs) > 1 else col)
        for col, ax in (("lr", ax_lr),):
            if col in df:
                s = df[col].notna()
                ax.plot(it[s], df[col][s], color=c, label=name)
        for col in [c_ for c_ in df.columns if "weight" in c_]:
            s = df[col].notna()
            ax_w.plot(it[s], df[col][s], color=c, label=f"{name}: {col}" if len(runs) > 1 else col)
        if "val_dice" in df:
            s = df["val_dice"].notna()
            ax_val.plot(it[s], df["val_dice"][s], color=c, marker="o", ms=3, label=name)
    for k, (fname, ref) in enumerate(references):  # colours after the runs'; thin, so the run stays readable
        c = colours[(len(runs) + k) % len(colours)] if len(runs) > 1 else "black"
        for col, ax, label, style in (("loss", ax_loss, f"{fname}: loss", {"lw": 0.6, "alpha": 0.6}),
                                      ("lr", ax_lr, fname, {"lw": 0.8, "ls": ":"}),
                                      ("weight", ax_w, fname, {"lw": 0.8, "ls": ":"}),
                                      ("dice", ax_val, fname, {"lw": 0.8, "marker": "s", "ms": 2})):
            if col in ref and ref[col].notna().any():
                s = ref[col].notna()
                ax.plot(ref["iteration"][s], ref[col][s], color=c, label=label, **style)
    for ax, title in ((ax_loss, "loss terms"), (ax_lr, "learning rate"), (ax_w, "consistency weight"),
                      (ax_val, "validation Dice")):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:  # beside the panel, never over the curves
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    return fig


def plot_curves(run_dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                reference_logs: Sequence[str | Path] = ()) -> Path:
    """Draw the curves of one or more runs (and the official logs `reference_logs`) into `out` (PNG, atomically).
    Returns `out`."""
    fig = curves_figure(run_dirs, labels, reference_logs)
    import matplotlib.pyplot as plt  # lazy: heavy (matplotlib); curves_figure has checked that it is installed

    out = Path(out)
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90, bbox_inches="tight")  # "tight": the legends outside the panels are kept
    finally:
        plt.close(fig)
    return out


def write_run_curves(run_dir: Path) -> None:
    """RUN/curves.png, or nothing when matplotlib is missing (training must not fail over a plot)."""
    try:
        import matplotlib  # noqa: F401  # lazy: heavy (matplotlib)
    except ImportError:
        return
    try:
        plot_curves([run_dir], Path(run_dir) / "curves.png")
    except Exception as exc:  # a full disk or a broken font cache must not stop training

        err_console.print(f"[yellow]warning:[/] curves.png not written ({type(exc).__name__}: {exc})")

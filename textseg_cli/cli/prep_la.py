"""`textseg prep la`: the Left Atrium benchmark (h5 or raw challenge layout) with the standard split."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import prep_app
from textseg_cli.console import console


@prep_app.command("la")
def prep_la_cmd(
    src: Path = typer.Option(..., "--src", help="Folder of case folders: <ID>/mri_norm2.h5 (preprocessed) or "
                             "<ID>/lgemri.nrrd + laendo.nrrd (raw challenge). Only read, never written."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not overlap --src)."),
    val: int = typer.Option(8, "--val", help="Validation cases carved (seeded) from the training cases; 0 keeps "
                            "the literature's 80/20 split as is.", min=0),
    test: int = typer.Option(0, "--test", help="Extra test cases carved from training, for copies that lack the "
                             "20 standard test cases.", min=0),
    keep_labeled: int = typer.Option(8, "--keep-labeled", help="The first N training cases (the labeled subset "
                                     "of the convention: 8 = 10%) are never carved into val/test.", min=0),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation draw and of the raw layout's crop margins."),
    cases: str = typer.Option(None, "--cases", help="Only these case ids, comma-separated (quick checks)."),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes.", min=1),
    drop_failed: bool = typer.Option(False, "--drop-failed", help="Write the data set without cases that fail "
                                     "to load (listed in dataset.json) instead of stopping with an error."),
    force: bool = typer.Option(False, "--force", help="Redo every case in an existing --out folder "
                               "(default: resume, skipping finished cases)."),
) -> None:
    """Prepare the Left Atrium data set (2018 Atrial Segmentation Challenge) with the standard split.

    Absent cases of the standard split are reported by name; images of the h5 layout are copied unchanged."""
    from textseg_cli.data.prep.la import prep_la  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    ids = None if cases is None else [c for c in cases.split(",") if c.strip()]
    with locked_output(out, "prep la", prep_sources=[src]):  # no concurrent prep/--force in out
        ds = prep_la(src, out, n_val=val, seed=seed, force=force, workers=workers, keep_labeled=keep_labeled,
                     cases=ids, n_test=test, drop_failed=drop_failed)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items())
    console.print(f"prepared [bold]la[/]: {len(ds.case_ids)} cases ({counts}); labeled = first "
                  f"{ds.spec['labeled']['default']} of train by default; patch {ds.patch_size} → {out}")

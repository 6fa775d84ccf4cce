"""`textseg prep synthetic`: the bundled CT-like demo data set (3D; `--dim 2` for the 2D set)."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import prep_app
from textseg_cli.console import console
from textseg_cli.errors import ConfigError


def parse_size(text: str | None, option: str) -> tuple[int, ...] | None:
    """'64,64,48', '64x64x48' or '64 64 48' -> (64, 64, 48); a single number is used for every axis."""
    if text is None:
        return None
    parts = text.lower().replace(",", " ").replace("x", " ").split()
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{option} {text!r}: expected sizes like 64,64,48")
    return values


@prep_app.command("synthetic")
def prep_synthetic_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder for the prepared data set."),
    cases: int = typer.Option(None, "--cases", help="Number of cases in all splits (3D default 20).", min=1),
    size: str = typer.Option(None, "--size", help="Volume size X,Y,Z in voxels (3D default 64,64,48); "
                             "with --dim 2 one square size such as 64."),
    classes: int = typer.Option(1, "--classes", help="Foreground classes: 1 (liver-like organ) or 2 (plus a "
                                "kidney-like organ).", min=1, max=2),
    seed: int = typer.Option(0, "--seed", help="Generator seed; case i depends only on (seed, i)."),
    val: int = typer.Option(None, "--val", help="Validation cases, taken after the training cases (3D default 4).",
                            min=0),
    test: int = typer.Option(None, "--test", help="Test cases, the last ones (3D default 4).", min=0),
    patch: str = typer.Option(None, "--patch", help="Training patch size X,Y,Z written to dataset.json "
                              "(default: the largest multiples of 16 within 3/4 of --size, 48,48,32 for 64,64,48)."),
    dim: int = typer.Option(3, "--dim", help="3: CT-like volumes; 2: the 2D text-guided set.", min=2, max=3),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Generate a deterministic CT-like synthetic data set (organ with texture and noise inside a body with
    spine, aorta and organ-like distractor blobs; HU windowed to [0, 1], then z-scored)."""
    from textseg_cli.data.prep import synthetic as syn  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import discard_on_failure  # lazy: keeps `textseg --help` torch-free
    size_t = parse_size(size, "--size")
    if dim == 2 and patch is not None:
        raise ConfigError("--patch applies to 3D synthetic data only")
    if dim != 2 and size_t is not None and len(size_t) == 1:
        size_t = size_t * 3
    patch_t = parse_size(patch, "--patch")
    # locked: no concurrent prep/--force in out; a failed run leaves nothing that would demand --force
    with discard_on_failure(out, command="prep synthetic"):
        if dim == 2:
            ds = syn.prep_synthetic_2d_given(out, force, size_t, n_cases=cases, seed=seed, n_val=val, n_test=test,
                                             n_classes=classes)
        else:
            ds = syn.prep_synthetic(out, n_cases=20 if cases is None else cases, size=size_t, n_classes=classes,
                                    seed=seed, n_val=4 if val is None else val, n_test=4 if test is None else test,
                                    force=force, patch_size=patch_t)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items())
    shape = "x".join(map(str, ds.spec["cases"][0]["shape"]))
    console.print(f"prepared [bold]{ds.name}[/] ({ds.dim}D, {shape}, classes {', '.join(ds.class_names[1:])}): "
                  f"{counts}; patch {ds.patch_size} → {out}")

"""`textseg prep lvit`: LViT-layout folders (QaTa-COV19, MosMedData+, MoNuSeg) → 2D prepared folder."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import prep_app
from textseg_cli.console import console


@prep_app.command("lvit")
def prep_lvit_cmd(
    src: Path = typer.Option(..., "--src", help="Folder with Train_Folder/, Val_Folder/ and/or Test_Folder/ "
                             "(each: img/, labelcol/, <Split>_text.xlsx)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the prepared data set."),
    allow_missing_text: bool = typer.Option(False, "--allow-missing-text",
                                            help="Warn about and exclude images without text (and ignore text "
                                                 "rows without image) instead of stopping."),
    resize: int = typer.Option(None, "--resize", help="Resize every image and mask to N×N (e.g. 224 or 256); "
                               "recorded in dataset.json. Default: keep the original size."),
    protocol: str = typer.Option("textseg", "--protocol", help="How pixels are read: textseg (antialiased "
                                 "resize, nearest masks, per-image min-max) or lvit (LViT's loader: bilinear "
                                 "resize without antialiasing, /255, masks bilinear then > 0; needs --resize)."),
    name: str = typer.Option(None, "--name", help="Data set name (default: the source folder's name)."),
    modality: str = typer.Option(None, "--modality", help="Imaging modality, e.g. 'chest x-ray', ct, histology "
                                 "(default: known for MoNuSeg, QaTa-COV19, MosMedData+ by name, else 2D)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Prepare an LViT-layout data set: 2D images with masks and one description per image."""
    from textseg_cli.data.prep.lvit import prep_lvit  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import discard_on_failure  # lazy: keeps `textseg --help` torch-free

    # locked: no concurrent prep/--force in out; a failed run leaves nothing that would demand --force
    with discard_on_failure(out, command="prep lvit", prep_sources=[src]):
        ds = prep_lvit(src, out, allow_missing_text=allow_missing_text, resize=resize, force=force, name=name,
                       modality=modality, protocol=protocol)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items())
    n_ex = len(ds.spec["extra"].get("excluded", []))
    console.print(f"prepared [bold]{ds.name}[/] (2D, {ds.in_channels} channel(s)): {counts}"
                  + (f"; {n_ex} exclusion(s) listed in dataset.json" if n_ex else "") + f" → {out}")

"""`textseg predict`: segment new volumes with a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from textseg_cli.cli import app
from textseg_cli.errors import ConfigError


@app.command("predict")
def predict(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR...",
                                          help="Run folder written by `textseg train` (config.yaml + checkpoints/); "
                                               "several (e.g. the folds of a cross-validation): an ensemble that "
                                               "averages their softmax probabilities."),
    images: Path = typer.Option(..., "--images",
                                help="An image file or a folder of them (NIfTI, NRRD, MHA; nnU-Net channel files "
                                     "case_0000, case_0001 form one image), or a prepared folder."),
    out: Path = typer.Option(..., "--out",
                             help="Folder for the masks (<name>.nii.gz, or the input's format; input geometry) "
                                  "and predict.json."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best (best on validation), last, or a .pt path."),
    decoder: str = typer.Option(None, "--decoder",
                                help="Decoder of a multi-decoder method: an index or 'mean' (default: the run's)."),
    inference: str = typer.Option(None, "--inference",
                                  help="paper (default: the literature's windows, raw argmax), best (mirroring TTA, "
                                       "Gaussian windows and the post-processing recorded by `textseg eval RUN "
                                       "--choose-postprocessing`), or the mode: sliding (literature windows) or "
                                       "whole (one pass over the padded volume); default: the run's setting."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", show_default=False,
                                       help="Mirroring test-time augmentation (every flip of the spatial axes); "
                                            "default: on with --inference best."),
    blend: str = typer.Option(None, "--blend", help="Window weights: constant or gaussian (sigma = patch/8); "
                                                    "default: gaussian with --inference best."),
    sw_batch_size: int = typer.Option(None, "--sw-batch-size", help="Windows per forward pass (sliding mode)."),
    buffer_on_cpu: bool = typer.Option(False, "--buffer-on-cpu",
                                       help="Accumulate probabilities on the CPU to save GPU memory on large volumes."),
    precision: str = typer.Option(None, "--precision", help="auto (the run's rule: bf16 on CUDA and on CPUs "
                                                            "with bf16 units unless it trained in fp32), fp32 "
                                                            "or bf16."),
    preprocessed: bool = typer.Option(False, "--preprocessed",
                                      help="Images are already preprocessed like the training data: skip replaying "
                                           "the data set's chain (resample, crop, window, clip, z-score)."),
    normalize: str = typer.Option("none", "--normalize", help="With --preprocessed: none, or zscore (per image)."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities",
                                            help="Also write <name>_probs (float32 softmax, classes on the last "
                                                 "axis) on the input's grid."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    nan_policy: str = typer.Option("refuse", "--nan-policy", help="NaN/Inf voxels in an image: refuse (that "
                                   "file fails, the others are segmented) or zero (replace them by 0, with a warning)."),
) -> None:
    """Segment new images with a trained run: the training data's preprocessing is replayed and the masks are
    mapped back onto each input's own grid (spacing, origin, direction).

    \b
    textseg predict RUN --images DIR --out OUT
    textseg predict RUN_F0 RUN_F1 ... --images DIR --out OUT      (ensemble: mean of the runs' probabilities;
        the runs must share classes, channels and preprocessing; --inference best post-processes only when all
        runs chose the same post-processing)
    """
    from textseg_cli.inference.predict import predict_folder  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    if inference not in (None, "paper", "best", "sliding", "whole"):
        raise ConfigError(f"--inference {inference!r}: expected paper, best, sliding or whole")
    if blend not in (None, "constant", "gaussian"):
        raise ConfigError(f"--blend {blend!r}: expected constant or gaussian")

    with locked_output(out, "predict", inputs=run_dirs, sources=[images]):  # no concurrent writer in out
        predict_folder(run_dirs[0] if len(run_dirs) == 1 else run_dirs, images, out, checkpoint=checkpoint, decoder=decoder, inference=inference, force=force,
                       device=device, normalize=normalize, sw_batch_size=sw_batch_size,
                       out_device="cpu" if buffer_on_cpu else None, precision=precision,
                       preprocessed=preprocessed, save_probabilities=save_probabilities, nan_policy=nan_policy,
                       tta=tta, blend=blend)

"""`textseg bench`: training speed, memory and inference time of a method on random data."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import err_console
from textseg_cli.errors import ConfigError


@app.command("bench")
def bench(
    method: str = typer.Option("mcnet", "--method", help="Registered method to benchmark (see `textseg models`)."),
    patch: str = typer.Option("112,112,80", "--patch", help="Training patch / inference window, e.g. 112,112,80."),
    batch: str = typer.Option("2+2", "--batch", help="Labeled+unlabeled patches per training batch."),
    iterations: int = typer.Option(5, "--iterations", help="Training iterations per timed run."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs; the median is reported."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: CPU, and CUDA when available)."),
    volume: str = typer.Option(None, "--volume", help="Volume size for inference timing; 'none' skips it "
                                                      "(default 140,140,88; with --roofline or --reference monai "
                                                      "1.25x the patch, 140,140,88 for 112,112,80)."),
    stride: str = typer.Option(None, "--stride", help="Sliding-window stride (default: the literature's for LA "
                                                      "112,112,80 → 18,18,4 and 96³ → 16, else half the patch)."),
    sw_batch_size: int = typer.Option(4, "--sw-batch-size", help="Windows per forward pass."),
    train: bool = typer.Option(True, "--train/--no-train", help="Time training iterations."),
    whole: bool = typer.Option(True, "--whole/--no-whole", help="Also time whole-volume inference."),
    precision: str = typer.Option("auto", "--precision", help="Training and inference precision: auto (bf16 on "
                                                              "CUDA and on CPUs with bf16 units, else fp32), fp32 "
                                                              "or bf16."),
    reference: bool = typer.Option(False, "--reference", help="Also time the papers' training step and "
                                                              "sliding-window loop (fp32, one window per pass) in "
                                                              "the same run and print textseg's speed-ups. "
                                                              "`--reference monai` instead compares the sliding "
                                                              "window and Dice/HD95 with MONAI's (needs "
                                                              "textseg-cli[monai])."),
    against: Optional[str] = typer.Argument(None, metavar="[monai]", help="With --reference: `monai` compares "
                                                                           "with MONAI instead of the papers' "
                                                                           "loops."),
    roofline: bool = typer.Option(False, "--roofline", help="Measure this machine's peak FLOP/s (GEMM, the "
                                                            "network's widest and heaviest conv), count the FLOPs "
                                                            "of a training step and a sliding-window pass and "
                                                            "report each phase's fraction of peak (fp32, and bf16 "
                                                            "where the CPU/GPU has bf16 units). --iterations = "
                                                            "timed steps."),
    gemm_size: int = typer.Option(2048, "--gemm-size", help="--roofline: n of the n x n x n GEMM peak."),
    compile_net: bool = typer.Option(False, "--compile", help="--roofline: also time the step with the networks "
                                                              "under torch.compile, in the same run."),
    channels: int = typer.Option(1, "--channels", help="Input channels of the random images (3 for RGB)."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key, e.g. "
                                                                 "method.clip_model=tiny (repeatable)."),
    feature_cache: str = typer.Option("both", "--feature-cache", help="Methods caching frozen-encoder features "
                                                                     "(tgcnet): time with the cache on, off or both."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON line on stdout (no table)."),
    json_out: Path = typer.Option(None, "--out", help="Also write the figures to this JSON file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
) -> None:
    """Measure training it/s, images/s and peak memory, and sliding-window vs whole-volume seconds per volume.

    2D methods take 2D sizes, e.g. tgcnet: --patch 224,224 --volume none --batch 8+0 --channels 3.
    `--roofline`: fractions of this machine's peak FLOP/s per training phase and for a sliding-window pass.
    `--reference monai`: sliding window and Dice/HD95 side by side with MONAI (docs/performance.md).
    """
    from textseg_cli.bench.benchmark import (  # lazy: keeps `textseg --help` torch-free
        print_benchmark,
        print_ratios,
        run_benchmark,
    )
    from textseg_cli.inference.predict import parse_int_list  # lazy: keeps `textseg --help` torch-free

    parts = batch.replace(",", "+").split("+")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) < 1:
        raise ConfigError(f"--batch must look like 2+2 (labeled+unlabeled, labeled >= 1), got {batch!r}")
    if against is not None and (not reference or against.lower() != "monai"):
        raise ConfigError(f"unexpected argument {against!r}: the only reference besides the papers' is "
                          "`--reference monai`")

    def log(msg: str) -> None:
        err_console.print(msg, highlight=False, markup=False)

    if roofline or against is not None:
        if roofline and against is not None:
            raise ConfigError("--roofline and --reference monai are separate runs; give one of them")
        if volume is not None and volume.lower() == "none":
            raise ConfigError("--volume none: --roofline and --reference monai time a sliding window on a volume")
        common = dict(method=method, patch=parse_int_list(patch, "--patch"), device=device,
                      volume=parse_int_list(volume, "--volume"),
                      stride=parse_int_list(stride, "--stride"), sw_batch_size=sw_batch_size, precision=precision,
                      repeats=repeats, in_channels=channels, sets=sets or [], json_out=json_out, force=force,
                      log=log)
        if roofline:
            from textseg_cli.bench.roofline import (  # lazy: keeps `textseg --help` torch-free
                print_roofline,
                run_roofline,
            )
            report = run_roofline(batch=(int(parts[0]), int(parts[1])), steps=iterations, gemm_size=gemm_size,
                                  compile_net=compile_net, **common)
            show = print_roofline
        else:
            from textseg_cli.bench.monai_ref import (  # lazy: keeps `textseg --help` torch-free
                import_monai,
                print_monai,
                run_monai_reference,
            )
            import_monai()  # exit 2 with the install hint before anything is built
            report = run_monai_reference(**common)
            show = print_monai
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            show(report)
        if json_out is not None:
            err_console.print(f"wrote {json_out}")
        return
    volume = volume or "140,140,88"
    report = run_benchmark(
        method=method, patch=parse_int_list(patch, "--patch"), batch=(int(parts[0]), int(parts[1])),
        iterations=iterations, repeats=repeats, device=device,
        volume=None if volume.lower() == "none" else parse_int_list(volume, "--volume"),
        stride=parse_int_list(stride, "--stride"), sw_batch_size=sw_batch_size, train=train,
        inference_modes=("sliding", "whole") if whole else ("sliding",), precision=precision,
        in_channels=channels, sets=sets or [], feature_cache=feature_cache, json_out=json_out,
        force=force, log=log, reference=reference)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        print_ratios(report, err_console)
    else:
        print_benchmark(report)
    if json_out is not None:
        err_console.print(f"wrote {json_out}")

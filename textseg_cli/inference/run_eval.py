"""`textseg eval RUN_DIR`: predict a split with a trained run, write the masks, score them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from textseg_cli.errors import DataError


def _labeled_counts(run) -> tuple[int | None, int | None]:
    """(labeled, unlabeled) training-case counts: RUN/cases.json as the engine wrote it, else the config."""
    import json

    cases = Path(run.run_dir) / "cases.json"
    if cases.exists():
        try:
            data = json.loads(cases.read_text(encoding="utf-8"))
            return len(data.get("labeled") or []), len(data.get("unlabeled") or [])
        except (json.JSONDecodeError, TypeError):
            pass
    data_cfg = run.config.get("data") or {}
    lab = data_cfg.get("labeled")
    return (int(lab) if isinstance(lab, int) or (isinstance(lab, str) and lab.isdigit()) else None), None


def default_eval_dir(run_dir: Path, split: str, checkpoint: str, inference: str, decoder) -> Path:
    ckpt = checkpoint if checkpoint in ("best", "last") else Path(checkpoint).stem
    name = f"{split}-{ckpt}-{inference}" + (f"-dec{decoder}" if decoder is not None else "")
    return run_dir / "eval" / name


def evaluate_run(run_dir: str | Path, split: str = "val", checkpoint: str = "best", decoder: int | str | None = None,
                 inference: str = "sliding", out: str | Path | None = None, lcc: bool = False,
                 spacing_mm: bool = False, empty_policy: str = "nan", table: str | None = None, force: bool = False,
                 device: str | None = None):
    """Predict every case of `split` with the run's `checkpoint` and score the masks.

    Writes `out/predictions/<case>.nii.gz` (argmax of the network, before any post-processing, with
    the image's geometry) and, through `textseg_cli.evaluation.write_evaluation`, `per_case.csv`,
    `summary.csv`, `meta.json` (+ `table`). `out` defaults to `RUN_DIR/eval/<split>-<checkpoint>-<mode>[-decN]`.
    Returns the per-case DataFrame. Evaluating `split="test"` is allowed but flagged loudly: test
    numbers must never choose checkpoints or settings.
    """
    from textseg_cli.console import err_console
    from textseg_cli.engine.runs import load_run
    from textseg_cli.evaluation import evaluate_pairs, write_evaluation
    from textseg_cli.inference.predict import (checkpoint_rule, inference_settings, predict_case, probs_to_mask,
                                               read_input_image, resolve_device, write_mask)
    from textseg_cli.utils import prepare_output_dir

    run_dir = Path(run_dir)
    if split == "test":
        err_console.print("[bold red]WARNING: evaluating on the TEST split.[/] Report these numbers once; they must "
                          "not drive model selection (checkpoint, decoder, post-processing or hyper-parameters) — "
                          "use the validation split for that.", highlight=False)
    dev = resolve_device(device)
    run = load_run(run_dir, checkpoint, device=str(dev))
    inf_cfg = inference_settings(run.config, inference, decoder)
    ds = run.dataset
    ids = ds.split(split)
    if not ids:
        raise DataError(f"split '{split}' of this run has no cases", run_dir)
    unlabeled = [cid for cid in ids if not ds.has_label(cid)]
    if unlabeled:
        raise DataError(f"split '{split}' holds case(s) without a label, cannot score them: {unlabeled[:5]}",
                        ds.root / "dataset.json")
    rule = getattr(run, "checkpoint_rule", checkpoint)  # "best" falls back to "last" when validation was off
    out = Path(out) if out is not None else default_eval_dir(run_dir, split, rule if rule != "file" else checkpoint,
                                                              inf_cfg["mode"], inf_cfg.get("decoder"))
    prepare_output_dir(out, force=force)
    pred_dir = out / "predictions"

    def pairs() -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
        # inference runs lazily as evaluate_pairs (and its progress bar) walks the cases
        for cid in ids:
            case = ds.load_case(cid, with_label=True)
            mask = probs_to_mask(predict_case(run.method, case.image, inf_cfg, dev))
            write_mask(pred_dir / f"{cid}.nii.gz", mask, read_input_image(ds.image_path(cid), ds.dim, name=cid))
            yield cid, mask, case.label, tuple(case.spacing)

    df = evaluate_pairs(pairs(), ds.num_classes, ds.class_names, spacing_mm=spacing_mm, empty_policy=empty_policy,
                        lcc=lcc, total=len(ids))

    n_lab, n_unlab = _labeled_counts(run)
    method_name = run.config.get("method")
    if isinstance(method_name, dict):
        method_name = method_name.get("name")
    meta = {
        "method": method_name or getattr(run.method, "name", None),
        "run_dir": str(run_dir.resolve()),
        "split": split,
        "test_split_warning": split == "test",
        "checkpoint": str(run.checkpoint_path),
        "checkpoint_rule": checkpoint_rule(rule, run.checkpoint_path),
        "iteration": getattr(run, "iteration", None),
        "decoder": inf_cfg.get("decoder"),
        "inference": inf_cfg["mode"],
        "inference_settings": {k: v for k, v in inf_cfg.items() if k != "out_device"},
        "labeled": n_lab,
        "unlabeled": n_unlab,
        "cases": len(ids),
        "predictions": "argmax before post-processing",
        "device": str(dev),
        "dataset": ds.name,
    }
    write_evaluation(df, out, meta, table=table)
    return df


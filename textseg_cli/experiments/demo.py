"""The bundled end-to-end job behind `textseg demo` (README set-up command 1).

prep synthetic → describe (offline bundle) → encode → train → eval → table, all offline, on CPU
in a few minutes. Each stage calls the same Python API as its command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textseg_cli.console import console
from textseg_cli.data.prep.synthetic import prep_synthetic
from textseg_cli.engine.setup import train
from textseg_cli.evaluation.run import evaluate_run
from textseg_cli.methods.registry import list_methods
from textseg_cli.reports.compare import compare_results
from textseg_cli.runtime.precision import check_precision
from textseg_cli.storage.outputs import prepare_output_dir
from textseg_cli.text.describe import describe
from textseg_cli.text.encode import encode


def run_demo(out: str | Path = "runs/demo", force: bool = False, iterations: int = 300,
             methods: tuple[str, ...] = ("mcnet", "vclipseg"), seed: int = 0, device: str | None = None,
             precision: str | None = None) -> dict[str, Any]:
    """Run the whole workflow on the synthetic data set and return the paths it wrote.

    Trains a text-free baseline and a text-guided method on the same split and puts both in one table.
    `precision` (auto, fp32, bf16; default the config's auto) is the training precision; validation and
    the evaluation follow it.
    """

    if precision is not None:
        check_precision(precision, "--precision")  # a typo fails before the folder exists
    out = prepare_output_dir(out, force=force, command="demo")
    paths: dict[str, Any] = {}

    console.rule("[bold]1/6 prep synthetic")
    data = out / "data"
    prep_synthetic(data, seed=seed)
    paths["data"] = data

    console.rule("[bold]2/6 describe (offline bundled descriptions)")
    desc = out / "text" / "descriptions.json"
    describe(dataset="synthetic", llm="offline", out=desc)
    paths["descriptions"] = desc

    console.rule("[bold]3/6 encode (CLIP class prompts, offline weights)")
    emb = out / "text" / "clip_classes.safetensors"
    encode(encoder="clip", dataset="synthetic", pretrained="none", out=emb)
    paths["clip_embeddings"] = emb

    evals = []
    for method in methods:
        console.rule(f"[bold]4/6 train {method} ({iterations} iterations)")
        run_dir = out / "runs" / method
        sets = [f"method.text.embeddings={emb}"] if _reads_embeddings(method) else []
        if precision is not None:
            sets.append(f"train.precision={precision}")
        train(method=method, data=data, out=run_dir, iterations=iterations, labeled="4", seed=seed,
                  device=device, sets=sets)
        paths[f"run_{method}"] = run_dir

        console.rule(f"[bold]5/6 eval {method} (validation split, best-on-val checkpoint)")
        ev = out / "eval" / method
        evaluate_run(run_dir, split="val", out=ev, table="md")
        evals.append(ev)

    console.rule("[bold]6/6 table")
    table = out / "results.md"
    compare_results(evals, table="md", out=table)
    console.print(table.read_text(encoding="utf-8"), soft_wrap=True, markup=False, highlight=False)
    paths["table"] = table
    return paths


def _reads_embeddings(method: str) -> bool:
    return getattr(list_methods()[method], "embedding_encoder", None) == "clip"

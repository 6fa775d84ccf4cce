"""The bundled end-to-end job behind `textseg demo` (README set-up command 1).

prep synthetic → describe (offline bundle) → encode → train → eval → table, all offline, on CPU
in a few minutes. Each stage calls the same Python API as its command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textseg_cli.console import console
from textseg_cli.utils import prepare_output_dir


def run_demo(out: str | Path = "runs/demo", force: bool = False, iterations: int = 300, method: str = "mcnet",
             seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Run the whole workflow on the synthetic data set and return the paths it wrote."""
    from textseg_cli import api

    out = prepare_output_dir(out, force=force)
    paths: dict[str, Any] = {}

    console.rule("[bold]1/6 prep synthetic")
    data = out / "data"
    api.prep_synthetic(data, seed=seed)
    paths["data"] = data

    console.rule("[bold]2/6 describe (offline bundled descriptions)")
    desc = out / "text" / "descriptions.json"
    api.describe(dataset="synthetic", llm="offline", out=desc)
    paths["descriptions"] = desc

    console.rule("[bold]3/6 encode (CLIP class prompts, offline weights)")
    emb = out / "text" / "clip_classes.safetensors"
    api.encode(encoder="clip", dataset="synthetic", pretrained="none", out=emb)
    paths["clip_embeddings"] = emb

    console.rule(f"[bold]4/6 train {method} ({iterations} iterations)")
    run_dir = out / "runs" / method
    api.train(method=method, data=data, out=run_dir, iterations=iterations, labeled="4", seed=seed, device=device)
    paths["run"] = run_dir

    console.rule("[bold]5/6 eval (validation split, best-on-val checkpoint)")
    ev = out / "eval" / method
    api.evaluate_run(run_dir, split="val", out=ev, table="md")
    paths["eval"] = ev

    console.rule("[bold]6/6 table")
    table = out / "results.md"
    api.compare_results([ev], table="md", out=table)
    console.print(table.read_text())
    paths["table"] = table
    return paths

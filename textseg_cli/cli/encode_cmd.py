"""`textseg encode`: BERT embeddings of descriptions or CLIP embeddings of class prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("encode")
def encode_cmd(
    encoder: str = typer.Option(..., "--encoder", "-e",
                                help="'bert' (descriptions → N×D) or 'clip' (class prompts → K×D)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d",
                                          help="Prompt file name or path (class names, CLIP template, bundled "
                                               "descriptions). Default: the --data folder's name, else synthetic."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="BERT: hub name or local folder (default bert-base-uncased). "
                                             "CLIP: open_clip architecture (default ViT-B-32)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained",
                                             help="CLIP weights: open_clip tag (default openai), a checkpoint "
                                                  "file, or 'none' for random weights."),
    descriptions: Optional[Path] = typer.Option(None, "--descriptions",
                                                help="BERT: a `textseg describe` JSON or a text file with one "
                                                     "description per line (default: the bundled ones)."),
    classes: Optional[str] = typer.Option(None, "--classes",
                                          help="CLIP: comma-separated class names, background first "
                                               "(default: the prompt file's)."),
    data: Optional[Path] = typer.Option(None, "--data",
                                        help="CLIP: take the class names from this prepared folder's dataset.json."),
    template: Optional[str] = typer.Option(None, "--template",
                                           help="CLIP prompt template with {class} (default: the prompt file's "
                                                "first, e.g. 'A pixel of a {class}.')."),
    pooling: str = typer.Option("cls", "--pooling", help="BERT sentence embedding: 'cls' or 'mean' (masked)."),
    tokens: bool = typer.Option(False, "--tokens", help="Also store token-level embeddings and their mask."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize",
                                             help="L2-normalise the rows (default: no, raw CLIP "
                                                  "encode_text rows as VCLIPSeg's official script saves them)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Output .safetensors (a .json sidecar goes beside it). Default: "
                                            "text_embeddings/<dataset>_<encoder>_<hash>.safetensors, reused if present."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu', 'cuda' or 'cuda:N'."),
    batch_size: int = typer.Option(16, "--batch-size", help="Texts per forward pass."),
    prompts_dir: Optional[Path] = typer.Option(None, "--prompts-dir",
                                               help="Extra folder of prompt files (searched first)."),
) -> None:
    """Encode texts into embeddings that training loads (no text model needed at train time)."""
    from textseg_cli.text.encode import encode  # lazy: keeps `textseg --help` torch-free

    class_names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    res = encode(encoder, dataset, model=model, pretrained=pretrained, descriptions=descriptions,
                 class_names=class_names, data=data, template=template, pooling=pooling, tokens=tokens,
                 normalize=normalize, out=out, force=force, device=device, batch_size=batch_size,
                 prompts_dir=prompts_dir)
    m = res.meta
    what = f"{m['encoder']} {m['model']}" + (f" ({m['pretrained'] or 'random weights'})" if m["encoder"] == "clip" else "")
    console.print(f"{'reused' if res.reused else 'wrote'} {res.path}: embeddings {tuple(m['shape'])} from {what}, "
                  f"normalised={m['normalized']}", highlight=False)

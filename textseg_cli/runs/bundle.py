"""Self-contained run folders: what inference needs is copied into the run, so it predicts after a move.

At the start of training `snapshot_run_inputs` writes

    RUN/prepared.json        the prepared data set's dataset.json (preprocessing chain, class and channel
                             names, spacing, patch size, splits as this run used them)
    RUN/text/<file>          the text-embedding file(s) (+ sidecar) and auxiliary prompts the method reads

`run_dataset` and `localize_config` make `load_run` use those copies whenever the recorded paths no
longer resolve (run moved, data deleted, another working directory or machine).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from textseg_cli.data.prepared import PreparedDataset, load_prepared, validate_spec
from textseg_cli.errors import DataError
from textseg_cli.storage.files import atomic_write_json, read_json
from textseg_cli.text.embeddings import sidecar_path, tensor_path

SNAPSHOT = "prepared.json"
TEXT_DIR = "text"


def _text_files(cfg: dict[str, Any], ds: PreparedDataset) -> dict[tuple[str, ...], Path]:
    """{config key path: file} of the text inputs the method reads."""
    hp = cfg.get("method") or {}
    out: dict[tuple[str, ...], Path] = {}
    emb = (hp.get("text") or {}).get("embeddings")
    if emb:
        out[("text", "embeddings")] = Path(emb)
    if hp.get("aux_texts"):
        out[("aux_texts",)] = Path(hp["aux_texts"])
    elif (ds.root / "aux_texts.json").is_file():
        out[("aux_texts",)] = ds.root / "aux_texts.json"
    return out


def snapshot_run_inputs(run_dir: Path, cfg: dict[str, Any], ds: PreparedDataset) -> None:
    """Copy the data set's record and the method's text inputs into the run folder."""
    atomic_write_json(run_dir / SNAPSHOT, ds.spec)
    for key, src in _text_files(cfg, ds).items():
        files = [tensor_path(src), sidecar_path(tensor_path(src))] if key[-1] == "embeddings" else [src]
        for f in files:
            if f.is_file():
                (run_dir / TEXT_DIR).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, run_dir / TEXT_DIR / f.name)


def localize_config(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Point the method's text inputs at the run's copies (RUN/text/) where those exist."""
    hp = cfg.get("method") or {}
    text = hp.get("text") or {}
    if text.get("embeddings"):
        copy = run_dir / TEXT_DIR / tensor_path(text["embeddings"]).name
        if copy.is_file():
            text["embeddings"] = str(copy)
    aux = run_dir / TEXT_DIR / (Path(hp["aux_texts"]).name if hp.get("aux_texts") else "aux_texts.json")
    if aux.is_file():
        hp["aux_texts"] = str(aux)
    return cfg


def run_dataset(cfg: dict[str, Any], run_dir: Path, data_root: str | Path | None = None) -> PreparedDataset:
    """The run's prepared data set: the folder when it is there, else RUN/prepared.json (no image files:
    enough to predict new images, not to evaluate a split)."""
    root = data_root or cfg["data"]["root"]
    try:
        return load_prepared(root)
    except DataError as exc:
        snap = run_dir / SNAPSHOT
        if data_root is None and snap.is_file():
            spec_path = Path(root) / "dataset.json"
            if spec_path.is_file():  # present but invalid (e.g. unsafe case IDs): an error, not a reason to fall back
                validate_spec(read_json(spec_path), spec_path)
            return PreparedDataset(Path(root), validate_spec(read_json(snap), snap))
        raise DataError(f"{exc} (the run's prepared data; it moved and the run has no {SNAPSHOT})",
                        run_dir / "config.yaml") from exc

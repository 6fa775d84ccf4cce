"""Predicting with a trained `Method`: one image (`predict_case`) or a folder of volumes (`predict_folder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from textseg_cli.console import console, progress
from textseg_cli.data.io import NAN_POLICIES, apply_nan_policy, read_input_image
from textseg_cli.data.prepared import load_prepared
from textseg_cli.data.preprocessing import zscore
from textseg_cli.errors import ConfigError, DataError, TextsegError
from textseg_cli.inference import replay
from textseg_cli.inference.fusion import fused_for_inference
from textseg_cli.inference.sliding_window import (
    sliding_window_inference,
    whole_volume_inference,
)
from textseg_cli.runs.load import load_run
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.precision import (  # noqa: F401 (re-export)
    PRECISIONS,
    inference_request,
    resolve_precision,
)
from textseg_cli.storage.files import atomic_write_json
from textseg_cli.storage.outputs import prepare_output_dir

INFERENCE_MODES = ("sliding", "whole")


def _spatial_tuple(value: Any, ndim: int, key: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ConfigError(f"inference.{key} must be an integer or a list of {ndim} integers, got {value!r}") from None
    if len(out) != ndim or min(out) < 1:
        raise ConfigError(f"inference.{key} must hold {ndim} positive integers, got {list(out)}")
    return out


def predict_case(method, image: np.ndarray | torch.Tensor, cfg_inference: dict[str, Any],
                 device: str | torch.device | None = None) -> torch.Tensor:
    """Softmax probabilities (K, *spatial), float32, of `method` on one image (C, *spatial).

    `cfg_inference` keys (the run config's `inference` section): `mode` ("sliding" | "whole"),
    `patch_size`, `stride`, `sw_batch_size` (windows per forward pass, default 4), `decoder` (passed to
    `method.predict_proba`), `out_device` (where probabilities accumulate; "cpu" saves GPU memory on
    large volumes; default: the compute device), `max_voxels` and `multiple` (whole-volume mode),
    `precision` ("auto" = bf16 autocast on CUDA and on CPUs with bf16 units, else float32; "fp32"; or
    "bf16" — see `textseg_cli.runtime.precision`; on CPUs with AVX512-BF16/AMX about 2-3x faster, masks differ on
    ~0.01 % of voxels), `channels_last` (default
    True: channels-last(-3d) memory format, faster with cuDNN and oneDNN) and `fuse_bn` (default True:
    predict with a cached copy whose BatchNorms are folded into the preceding convs, ~8 % faster on CPU;
    with False the method itself is used, and converted to channels-last in place).
    The result stays on `out_device`.
    """
    dev = resolve_device(device)
    cfg = dict(cfg_inference or {})
    mode = cfg.get("mode") or "sliding"
    if mode not in INFERENCE_MODES:
        raise ConfigError(f"inference.mode must be one of {list(INFERENCE_MODES)}, got {mode!r}")
    x = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    x = x.to(device=dev, dtype=torch.float32)
    ndim = x.ndim - 1
    if ndim not in (2, 3):
        raise DataError(f"expected an image (C, x, y) or (C, x, y, z), got shape {tuple(x.shape)}")
    if getattr(method, "dim", ndim) != ndim:
        raise DataError(f"image has {ndim} spatial axes; the model is {method.dim}D")
    if getattr(method, "in_channels", x.shape[0]) != x.shape[0]:
        raise DataError(f"image has {x.shape[0]} channel(s); the model expects {method.in_channels}")
    decoder = cfg.get("decoder")
    out_device = cfg.get("out_device") or None
    precision = resolve_precision(cfg.get("precision"), dev, "inference.precision")
    channels_last = cfg.get("channels_last", True) is not False
    memory_format = torch.channels_last_3d if ndim == 3 else torch.channels_last

    method.to(dev)
    was_training = method.training
    method.eval()
    # a cached eval copy with BatchNorm folded into the convs; the method itself is left as it is
    model = fused_for_inference(method) if cfg.get("fuse_bn", True) is not False else method
    if channels_last:
        model.to(memory_format=memory_format)

    def predict_fn(batch: torch.Tensor) -> torch.Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=memory_format)
        with precision.autocast():
            return model.predict_proba(batch, decoder).float().contiguous()

    try:
        with torch.inference_mode():
            if mode == "whole":
                patch = cfg.get("patch_size")
                return whole_volume_inference(
                    predict_fn, x, multiple=int(cfg.get("multiple") or 16), max_voxels=cfg.get("max_voxels"),
                    patch_size=_spatial_tuple(patch, ndim, "patch_size") if patch is not None else None,
                    stride=_spatial_tuple(cfg["stride"], ndim, "stride") if cfg.get("stride") is not None else None,
                    sw_batch_size=int(cfg.get("sw_batch_size") or 1), out_device=out_device)
            if cfg.get("patch_size") is None:
                raise ConfigError("inference.patch_size is required for sliding-window inference")
            patch = _spatial_tuple(cfg["patch_size"], ndim, "patch_size")
            stride = (_spatial_tuple(cfg["stride"], ndim, "stride") if cfg.get("stride") is not None
                      else tuple(max(1, p // 2) for p in patch))
            return sliding_window_inference(predict_fn, x, patch, stride,
                                            sw_batch_size=int(cfg.get("sw_batch_size") or 4), out_device=out_device)
    finally:
        if was_training:
            method.train()


def probs_to_mask(probs: torch.Tensor) -> np.ndarray:
    """Class-index mask (uint8, numpy) from probabilities (K, *spatial)."""
    return probs.argmax(0).to(device="cpu", dtype=torch.uint8).numpy()


# --- geometry-preserving image I/O --------------------------------------------------------------------


def inference_settings(config: dict[str, Any], inference: str | None = None, decoder: int | str | None = None,
                       **overrides: Any) -> dict[str, Any]:
    """The run's `inference` section with command-line choices applied (None keeps the run's value);
    `precision` is the run's inference request (`textseg_cli.runtime.precision.inference_request`)."""
    cfg = dict(config.get("inference") or {})
    cfg["precision"] = inference_request(config, overrides.pop("precision", None))
    if cfg.get("patch_size") is None and (config.get("data") or {}).get("patch_size") is not None:
        cfg["patch_size"] = config["data"]["patch_size"]
    if inference is not None:
        if inference not in INFERENCE_MODES:
            raise ConfigError(f"--inference must be one of {list(INFERENCE_MODES)}, got {inference!r}")
        cfg["mode"] = inference
    cfg.setdefault("mode", "sliding")
    if decoder is not None:
        cfg["decoder"] = _parse_decoder(decoder)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def _parse_decoder(decoder: int | str) -> int | str:
    if isinstance(decoder, str) and decoder.strip().lstrip("-").isdigit():
        return int(decoder)
    return decoder


def predict_folder(run_dir: str | Path, images: str | Path, out: str | Path, checkpoint: str = "best",
                   decoder: int | str | None = None, inference: str | None = None, force: bool = False,
                   device: str | None = None, normalize: str = "none",
                   sw_batch_size: int | None = None, out_device: str | None = None,
                   precision: str | None = None, preprocessed: bool = False,
                   save_probabilities: bool = False, nan_policy: str = "refuse") -> list[Path]:
    """Segment new images (one file, a folder of NIfTI/NRRD/MHA files, or a prepared folder) with a trained run.

    Raw images go through the run's data-set preprocessing chain (`inference/replay.py`: resampling,
    crop, window, clip, z-score as dataset.json records them) and the masks are mapped back onto each
    input's own grid; `preprocessed=True` skips the replay for images already preprocessed like the
    training data (then `normalize="zscore"` z-scores each image). Masks (uint8 class indices) go to
    `out/<name>.nii.gz` (NRRD/MHA inputs keep their format) with the input's geometry;
    `save_probabilities` adds `<name>_probs` (float32, classes as the last axis). `out/predict.json`
    records the run, checkpoint, decoder, preprocessing and inference settings. Returns the mask paths.
    A file that cannot be segmented (unreadable, wrong shape, NaN/Inf voxels under `nan_policy="refuse"`;
    "zero" replaces them by 0) does not stop the others: the good masks and predict.json are written,
    then a DataError lists the failed files.
    """
    images, out = Path(images), Path(out)
    if not images.exists():
        raise DataError("image file or folder not found", images)
    if out.resolve() == images.resolve():
        raise ConfigError("--out must differ from --images (inputs are never overwritten)")
    if normalize not in ("none", "zscore"):
        raise ConfigError(f"normalize must be 'none' or 'zscore', got {normalize!r}")
    dev = resolve_device(device)
    run = load_run(run_dir, checkpoint, device=str(dev))
    inf_cfg = inference_settings(run.config, inference, decoder, sw_batch_size=sw_batch_size, out_device=out_device,
                                 precision=precision)
    dim = int(getattr(run.method, "dim", 3))
    if images.is_dir() and (images / "dataset.json").exists():
        ds = load_prepared(images)
        inputs = [(cid, [ds.image_path(cid)]) for cid in ds.case_ids]
        chain, steps = replay.Processing(normalize="none"), "none (a prepared folder)"
    else:
        inputs = replay.list_raw_inputs(images)
        if preprocessed:
            chain, steps = replay.Processing(normalize="none"), "none (--preprocessed)"
        else:
            recorded = run.dataset.spec.get("preprocessing") or []
            chain = replay.replay_processing(recorded, run.dataset.root / "dataset.json")
            steps = [s for s in recorded if s.get("step") not in replay.SOURCE_STEPS]
    identity = chain == replay.Processing(normalize="none")
    if dim != 3 and not identity:
        raise replay.ReplayError("replaying preprocessing is implemented for 3D data sets; pass --preprocessed "
                                 "with images prepared like the training data", run.dataset.root / "dataset.json")

    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"--nan-policy {nan_policy!r}: expected refuse or zero")
    prepare_output_dir(out, force=force, command="predict", inputs=[run_dir], sources=[images])

    written: list[Path] = []
    failed: dict[str, str] = {}
    with progress() as bar:
        task = bar.add_task("predict", total=len(inputs), info="")
        for name, files in inputs:
            bar.update(task, info=name)
            try:
                if identity and len(files) == 1 and files[0].name.lower().endswith(replay.NIFTI):
                    # nibabel keeps any affine exactly (SimpleITK refuses non-orthonormal ones)
                    arr, raw = read_input_image(files[0], dim, name=name).array, None
                    arr, note = apply_nan_policy(arr, nan_policy, name, files[0])
                    if note:
                        console.print(f"[yellow]warning:[/] {note}", highlight=False)
                else:  # NaN/Inf are handled before the chain, as prep does
                    raw = replay.load_raw(name, files, chain, nan_policy=nan_policy)
                    arr = raw.array
                    for note in raw.warnings:
                        console.print(f"[yellow]warning:[/] {note}", highlight=False)
                if normalize == "zscore":
                    arr = np.stack([zscore(c) for c in arr])
                probs = predict_case(run.method, arr, inf_cfg, dev)
            except TextsegError as exc:  # one bad file must not cost the others
                failed[name] = str(exc)
                bar.advance(task)
                continue
            mask = probs_to_mask(probs)
            target = out / replay.output_name(files[0], name)
            replay.write_like(target, mask if raw is None else raw.restore_mask(mask), files[0])
            if save_probabilities:
                p = probs.to(device="cpu", dtype=torch.float32).numpy()
                replay.write_like(out / replay.output_name(files[0], name, "_probs"),
                                  p if raw is None else raw.restore_probs(p), files[0], channels=True)
            written.append(target)
            bar.advance(task)
    atomic_write_json(out / "predict.json", {
        "run_dir": str(Path(run_dir).resolve()), "checkpoint": str(run.checkpoint_path),
        "checkpoint_rule": checkpoint_rule(getattr(run, "checkpoint_rule", checkpoint), run.checkpoint_path),
        "images": str(images.resolve()), "preprocessing": steps, "normalize": normalize,
        "probabilities": "<name>_probs: float32 softmax, classes on the last axis" if save_probabilities else None,
        "inference": inf_cfg, "device": str(dev), "precision": resolve_precision(inf_cfg["precision"], dev).name,
        "cases": [p.name for p in written], **({"failed": failed} if failed else {})})
    console.print(f"wrote {len(written)} mask(s) to {out}")
    if failed:
        for msg in failed.values():
            console.print(f"[red]failed:[/] {msg}", highlight=False, soft_wrap=True)
        raise DataError(f"{len(failed)} of {len(inputs)} file(s) could not be segmented ({', '.join(list(failed)[:10])}); "
                        f"the {len(written)} others are written and listed in predict.json", images)
    return written


def checkpoint_rule(rule: str | Path, path: str | Path | None = None) -> str:
    """How the checkpoint was chosen, as tables state it: best-on-val, last, or file:<name>."""
    r = str(rule)
    if r in ("best", "last"):
        return {"best": "best-on-val", "last": "last"}[r]
    return f"file:{Path(path if path is not None else r).name}"


def parse_int_list(text: str | Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    """'112,112,80' → (112, 112, 80) for command-line options."""
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"{what} must be positive integers, got {text!r}")
    return vals

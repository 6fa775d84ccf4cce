"""Predicting with a trained `Method`: one image (`predict_case`) or a folder of volumes (`predict_folder`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from textseg_cli.errors import ConfigError, DataError
from textseg_cli.inference.fusion import fused_for_inference
from textseg_cli.inference.sliding_window import sliding_window_inference, whole_volume_inference
from textseg_cli.precision import PRECISIONS, inference_request, resolve_precision  # noqa: F401 (re-export)

INFERENCE_MODES = ("sliding", "whole")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" → CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available")
    return dev


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
    "bf16" — see `textseg_cli.precision`; on CPUs with AVX512-BF16/AMX about 2-3x faster, masks differ on
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


@dataclass
class InputImage:
    name: str  # output file stem
    array: np.ndarray  # float32 (C, *spatial)
    spacing: tuple[float, ...]  # from the affine's column norms, so the input affine is reproduced exactly
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def read_input_image(path: Path, dim: int, name: str | None = None) -> InputImage:
    """Read a NIfTI image (channels last when 4D/3D-for-2D) with the geometry to write its mask back."""
    import nibabel as nib

    from textseg_cli.data.io import read_nifti

    vol = read_nifti(path, dtype=np.float32)
    arr = vol.array
    if arr.ndim == dim:
        arr = arr[None]
    elif arr.ndim == dim + 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(f"image has shape {arr.shape}; expected {dim}D (or {dim}D with channels last)", path)
    aff = np.asarray(nib.load(str(path)).affine, dtype=float)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    spacing[spacing == 0] = 1.0
    direction = aff[:3, :3] / spacing[None, :]
    if name is None:
        name = path.name[:-7] if path.name.endswith(".nii.gz") else path.stem
    return InputImage(name, np.ascontiguousarray(arr, dtype=np.float32), tuple(float(s) for s in spacing),
                      tuple(float(v) for v in aff[:3, 3]), tuple(float(v) for v in direction.ravel()))


def write_mask(path: Path, mask: np.ndarray, like: InputImage) -> None:
    from textseg_cli.data.io import write_nifti

    write_nifti(path, mask.astype(np.uint8, copy=False), like.spacing, like.origin, like.direction)


def _list_inputs(images: Path) -> list[tuple[str, Path]]:
    """(name, path) of the volumes to segment: every case of a prepared folder, else every NIfTI file."""
    if (images / "dataset.json").exists():
        from textseg_cli.data.prepared import load_prepared

        ds = load_prepared(images)
        return [(cid, ds.image_path(cid)) for cid in ds.case_ids]
    files = sorted(p for p in images.iterdir() if p.is_file() and (p.name.endswith(".nii.gz") or p.suffix == ".nii"))
    if not files:
        raise DataError("no NIfTI files (*.nii.gz, *.nii) and no dataset.json here", images)
    return [(p.name[:-7] if p.name.endswith(".nii.gz") else p.stem, p) for p in files]


def inference_settings(config: dict[str, Any], inference: str | None = None, decoder: int | str | None = None,
                       **overrides: Any) -> dict[str, Any]:
    """The run's `inference` section with command-line choices applied (None keeps the run's value);
    `precision` is the run's inference request (`textseg_cli.precision.inference_request`)."""
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
                   precision: str | None = None) -> list[Path]:
    """Segment every volume in `images` (NIfTI files, or a prepared folder) with a trained run.

    Masks (uint8 class indices) go to `out/<name>.nii.gz` with the input's affine (spacing, origin,
    direction); `out/predict.json` records the run, checkpoint, decoder and inference settings.
    Images must be preprocessed like the training data; `normalize="zscore"` z-scores each image first.
    Returns the written mask paths.
    """
    from textseg_cli.console import console, progress
    from textseg_cli.engine.runs import load_run
    from textseg_cli.utils import atomic_write_json, prepare_output_dir

    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError("image folder not found", images)
    if out.resolve() == images.resolve():
        raise ConfigError("--out must differ from --images (inputs are never overwritten)")
    if normalize not in ("none", "zscore"):
        raise ConfigError(f"normalize must be 'none' or 'zscore', got {normalize!r}")
    inputs = _list_inputs(images)
    dev = resolve_device(device)
    run = load_run(run_dir, checkpoint, device=str(dev))
    inf_cfg = inference_settings(run.config, inference, decoder, sw_batch_size=sw_batch_size, out_device=out_device,
                                 precision=precision)
    dim = int(getattr(run.method, "dim", 3))
    prepare_output_dir(out, force=force)

    written: list[Path] = []
    with progress() as bar:
        task = bar.add_task("predict", total=len(inputs), info="")
        for name, path in inputs:
            bar.update(task, info=name)
            img = read_input_image(path, dim, name=name)
            arr = img.array
            if normalize == "zscore":
                from textseg_cli.data.preprocessing import zscore

                arr = np.stack([zscore(c) for c in arr])
            mask = probs_to_mask(predict_case(run.method, arr, inf_cfg, dev))
            target = out / f"{name}.nii.gz"
            write_mask(target, mask, img)
            written.append(target)
            bar.advance(task)
    atomic_write_json(out / "predict.json", {
        "run_dir": str(Path(run_dir).resolve()), "checkpoint": str(run.checkpoint_path),
        "checkpoint_rule": checkpoint_rule(getattr(run, "checkpoint_rule", checkpoint), run.checkpoint_path),
        "images": str(images.resolve()), "normalize": normalize,
        "inference": inf_cfg, "device": str(dev), "precision": resolve_precision(inf_cfg["precision"], dev).name,
        "cases": [p.name for p in written]})
    console.print(f"wrote {len(written)} mask(s) to {out}")
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

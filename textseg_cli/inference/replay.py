"""Replaying a prepared data set's preprocessing on new images, and mapping predictions back.

`textseg predict` on raw files must see what training saw: `replay_processing(spec)` rebuilds the
`Processing` chain from the steps dataset.json records (resample -> crop -> window -> percentile clip ->
z-score, the fixed order of `data/prep/steps.apply_processing`) and refuses steps that cannot be applied to
a new image (a crop around the label, a distributor's h5 preprocessing, unknown steps). `load_raw` reads a
NIfTI/NRRD/MHA image (or its channel files) and runs the chain with the very function `prep` used;
`RawInput.restore_mask` / `restore_probs` undo the crop and resampling onto the input's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from textseg_cli.data.io import nifti_geometry, write_nifti
from textseg_cli.data.prep.custom import EXTENSIONS, _stem, match_cases
from textseg_cli.data.prep.steps import (
    Processing,
    apply_processing,
    load_files,
    sitk_array,
)
from textseg_cli.data.preprocessing import _to_sitk, resampled_shape
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.storage.files import atomic_path

# Steps that say where the data came from; a new image has nothing of them to replay.
SOURCE_STEPS = ("read", "generate")
_ORDER = ("resample", "crop", "window", "clip_percentile", "zscore")
NIFTI = (".nii.gz", ".nii")


class ReplayError(ConfigError):
    """The data set's preprocessing cannot be applied to a new image."""


def replay_processing(steps: Sequence[dict[str, Any]], where: Any = None) -> Processing:
    """The `Processing` that reproduces the recorded `steps` on a new image, or ReplayError naming the step."""
    kw: dict[str, Any] = {"normalize": "none"}
    seen: list[str] = []
    hint = ("; pass --preprocessed if your images are already preprocessed like the training data")
    for s in steps:
        name, p = str(s.get("step")), dict(s.get("params") or {})
        if s.get("applies_to"):
            raise ReplayError(f"preprocessing step '{name}' applies only to '{s['applies_to']}', so the chain of "
                              f"new images is ambiguous{hint}", where)
        if name in SOURCE_STEPS:
            continue
        if name not in _ORDER:
            raise ReplayError(f"preprocessing step '{name}' cannot be replayed on new images{hint}", where)
        if seen and _ORDER.index(name) <= _ORDER.index(seen[-1]):
            raise ReplayError(f"preprocessing step '{name}' after '{seen[-1]}' is not in the order prep applies{hint}",
                              where)
        seen.append(name)
        if name == "resample":
            kw["target_spacing"] = tuple(None if v is None else float(v) for v in p["spacing_mm"])
        elif name == "crop":
            if p.get("around") == "label":
                raise ReplayError("the data set was cropped around the label, which a new image does not have"
                                  + hint, where)
            axes = str(p.get("axes", "xyz"))
            kw.update(crop=p.get("around"), crop_axes=tuple(a in axes for a in "xyz"),
                      crop_min_size=tuple(int(v) for v in p.get("min_size", (0, 0, 0))),
                      crop_margin=tuple(int(v) for v in p.get("margin", (0, 0, 0))),
                      body_threshold=float(p.get("threshold_hu", -500.0)))
        elif name == "window":
            kw.update(window=(float(p["level"]), float(p["width"])), window_name=p.get("preset"))
        elif name == "clip_percentile":
            kw.update(clip=(p.get("lower"), p.get("upper")), clip_over=p.get("over", "all"))
        else:  # zscore
            kw["normalize"] = "zscore-nonzero" if "non-zero" in str(p.get("over", "")) else "zscore"
    return Processing(**kw)


@dataclass
class RawInput:
    """One new image after the replayed chain, with what it takes to map results back to its grid."""
    name: str
    files: list[Path]
    array: np.ndarray  # (C, x, y, z) float32, as the network sees it
    shape: tuple[int, ...]  # the input's own grid
    spacing: tuple[float, ...]
    resampled_shape: tuple[int, ...]  # grid after resampling, before the crop
    resampled_spacing: tuple[float, ...]
    crop_box: list[tuple[int, int]] | None
    warnings: list[str] = field(default_factory=list)  # e.g. NaN/Inf voxels replaced (--nan-policy zero)

    def _uncrop(self, arr: np.ndarray, fill: float) -> np.ndarray:
        if self.crop_box is None:
            return arr
        full = np.full(arr.shape[:-3] + tuple(self.resampled_shape), fill, dtype=arr.dtype)
        full[(Ellipsis,) + tuple(slice(lo, hi) for lo, hi in self.crop_box)] = arr
        return full

    def _to_input_grid(self, arr: np.ndarray, is_label: bool) -> np.ndarray:
        if tuple(arr.shape) == tuple(self.shape) and np.allclose(self.resampled_spacing, self.spacing):
            return arr
        return resample_to_grid(arr, self.resampled_spacing, self.shape, self.spacing, is_label=is_label)

    def restore_mask(self, mask: np.ndarray) -> np.ndarray:
        """Class-index mask on the network grid -> the input's grid (inverse crop, nearest neighbour)."""
        return self._to_input_grid(self._uncrop(np.asarray(mask, dtype=np.uint8), 0), True).astype(np.uint8)

    def restore_probs(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities (K, *grid) -> (K, *input grid); outside the crop the background is certain; linear."""
        probs = np.asarray(probs, dtype=np.float32)
        if self.crop_box is not None:
            full = np.zeros((probs.shape[0],) + tuple(self.resampled_shape), np.float32)
            full[0] = 1.0
            full[(slice(None),) + tuple(slice(lo, hi) for lo, hi in self.crop_box)] = probs
            probs = full
        return np.stack([self._to_input_grid(p, False) for p in probs]).astype(np.float32)


def resample_to_grid(arr: np.ndarray, spacing: Sequence[float], shape: Sequence[int], target_spacing: Sequence[float],
                     *, is_label: bool) -> np.ndarray:
    """Resample an (x, y, z) array between two grids that share the first voxel centre and the axes
    (what `preprocessing.resample` keeps), nearest neighbour for labels, linear for probabilities."""


    src = _to_sitk(arr, spacing)
    ref = sitk.Image([int(s) for s in shape], src.GetPixelID())
    ref.SetSpacing([float(s) for s in target_spacing])
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(ref)
    f.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear)
    f.SetUseNearestNeighborExtrapolator(True)
    return sitk_array(f.Execute(src))


def load_raw(name: str, files: Sequence[Path], proc: Processing, nan_policy: str = "refuse") -> RawInput:
    """Read a new image (several files or a 4D file give channels) and apply the data set's chain."""
    loaded = load_files(name, [str(f) for f in files], None, nan_policy=nan_policy)
    done = apply_processing(name, loaded, proc)
    shape = tuple(int(n) for n in loaded.image.shape[1:])
    if proc.target_spacing is not None:
        rs = tuple(resampled_shape(shape, loaded.spacing, proc.target_spacing))
    else:
        rs = shape
    return RawInput(name, list(files), done.image, shape, tuple(loaded.spacing), rs, tuple(done.spacing),
                    done.crop_box, list(loaded.warnings))


def output_name(path: Path, name: str, suffix: str = "") -> str:
    """`<name><suffix>` with the input's format: NIfTI inputs give .nii.gz, NRRD/MHA keep theirs."""
    low = path.name.lower()
    if low.endswith(NIFTI):
        return f"{name}{suffix}.nii.gz"
    return f"{name}{suffix}{Path(low).suffix.replace('.nhdr', '.nrrd').replace('.mhd', '.mha')}"


def write_like(path: Path, array: np.ndarray, ref_file: Path, channels: bool = False) -> None:
    """Write `array` (a mask, or with `channels` (K, *grid) probabilities, stored channels last) with
    `ref_file`'s geometry.

    NIfTI inputs take their affine through nibabel (exact even for oblique, flipped affines); other
    formats copy SimpleITK's header of the input."""
    if ref_file.name.lower().endswith(NIFTI):
        spacing, origin, direction = nifti_geometry(ref_file)
        out = np.moveaxis(array, 0, -1) if channels else array
        write_nifti(path, np.ascontiguousarray(out), spacing, origin, direction)
        return

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ref_file))
    reader.ReadImageInformation()
    if not channels:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (3, 2, 1, 0))), isVector=True)
    img.SetSpacing(reader.GetSpacing()[:3])
    img.SetOrigin(reader.GetOrigin()[:3])
    d = np.asarray(reader.GetDirection(), dtype=float).reshape(reader.GetDimension(), -1)[:3, :3]
    img.SetDirection(tuple(d.ravel()))
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def list_raw_inputs(images: Path) -> list[tuple[str, list[Path]]]:
    """(name, [channel files]) for a single image file or a folder of NIfTI/NRRD/MHA files (nnU-Net
    channel files `case_0000`, `case_0001` ... form one image)."""
    if images.is_file():
        stem = _stem(images)
        if stem is None:
            raise DataError(f"not an image file (expected {', '.join(EXTENSIONS)})", images)
        return [(stem, [images])]
    groups, _, _ = match_cases(images, None)
    if not groups:
        raise DataError(f"no image files ({', '.join(EXTENSIONS)}) and no dataset.json here", images)
    return sorted(groups.items())

"""Segment a NIfTI image with a model exported by `textseg export`, without textseg.

    python predict.py IMAGE.nii.gz [MORE_CHANNEL_FILES ...] --out MASK.nii.gz [--device cpu|cuda] [--nan-policy zero]

Needs torch, numpy and nibabel; SimpleITK (optional) makes the resampling that of `textseg predict` to the voxel
(without it a trilinear torch resampling stands in and the script says so); scipy (optional) speeds up the body
crop's largest connected component; onnxruntime is needed only for a model.onnx export. Everything it does is
read from export.json beside it: the data set's preprocessing chain (resample -> crop -> window -> percentile
clip -> z-score, replayed as `textseg predict` replays it), the run's sliding windows (patch, stride, windows per
forward pass, constant or Gaussian weights, mirroring test-time augmentation), the argmax, the post-processing
(largest connected component of the recorded classes, if any) and the way back onto the input's own grid; the
mask is written with the input's affine. Computation is float32 (`textseg predict --precision fp32`).

This file is written by `textseg export` (textseg_cli/inference/export_predict_template.py); it imports no
textseg module, so it can be copied anywhere with the exported model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

try:  # optional: the exact resampling of `textseg predict`
    import SimpleITK as sitk
except ImportError:  # pragma: no cover - exercised where SimpleITK is missing
    sitk = None

HERE = Path(__file__).resolve().parent


# --- the model -----------------------------------------------------------------------------------------

def load_model(record: dict, folder: Path, device: torch.device):
    """A callable (B, C, *patch) float32 tensor -> (B, K, *patch) softmax probabilities."""
    path = folder / record["file"]
    if record["format"] == "onnx":
        import onnxruntime as ort  # optional: only for model.onnx

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]).to(x.device)
        return run_onnx
    if record["format"] == "torchscript":
        model = torch.jit.load(str(path), map_location=device).eval()
    else:
        model = torch.export.load(str(path)).module().to(device)
    return model


def fixed_batch(model, batch: int | None):
    """A model traced at one batch size gets its last, smaller group padded with zeros (outputs dropped)."""
    if not batch:
        return model

    def run(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == batch:
            return model(x)
        pad = torch.zeros((batch - n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        return model(torch.cat([x, pad]))[:n]
    return run


# --- preprocessing (the data set's chain, as `textseg prep` applied it) -------------------------------------

def read_image(files: list[Path], nan_policy: str) -> tuple[np.ndarray, tuple[float, ...], nib.Nifti1Image]:
    """(C, x, y, z) float32, spacing from the affine's columns, and the first file's image (for its affine)."""
    chans, first = [], None
    for f in files:
        img = nib.load(str(f))
        first = first or img
        arr = np.asarray(img.dataobj).astype(np.float32)
        if arr.ndim == 4:
            chans += [arr[..., t] for t in range(arr.shape[-1])]
        elif arr.ndim == 3:
            chans.append(arr)
        else:
            sys.exit(f"error: {f}: expected a 3D image (or 4D with channels last), got shape {arr.shape}")
    image = np.stack(chans).astype(np.float32)
    bad = int((~np.isfinite(image)).sum())
    if bad:
        if nan_policy != "zero":
            sys.exit(f"error: {files[0]}: {bad} NaN/Inf voxel(s); pass --nan-policy zero to replace them by 0")
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        print(f"warning: {bad} NaN/Inf voxel(s) replaced by 0", file=sys.stderr)
    spacing = np.linalg.norm(np.asarray(first.affine, dtype=float)[:3, :3], axis=0)
    spacing[spacing == 0] = 1.0
    return image, tuple(float(s) for s in spacing), first


def resampled_shape(shape, spacing, target) -> list[int]:
    return [int(n) if t is None else max(1, round(n * s / float(t))) for n, s, t in zip(shape, spacing, target)]


def _sitk_image(arr: np.ndarray, spacing, origin=None, direction=None):
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    if origin is not None:
        img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    return img


def _torch_resample(arr: np.ndarray, spacing, shape, new_spacing, nearest: bool) -> np.ndarray:
    """Stand-in without SimpleITK: the grids share the first voxel centre; edge values extend outwards."""
    coords = [torch.arange(n, dtype=torch.float64) * t / s for n, s, t in zip(shape, spacing, new_spacing)]
    coords = [c.clamp(0, m - 1) for c, m in zip(coords, arr.shape)]
    if nearest:
        idx = [torch.floor(c + 0.5).long() for c in coords]
        return arr[np.ix_(*[i.numpy() for i in idx])]
    grid = torch.stack(torch.meshgrid(*[2 * c / max(m - 1, 1) - 1 for c, m in zip(coords, arr.shape)],
                                      indexing="ij")[::-1], -1)  # grid_sample wants (z, y, x) order last
    src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    out = F.grid_sample(src, grid[None].float(), mode="bilinear", align_corners=True)
    return out[0, 0].numpy()


_WARNED: list[str] = []


def _warn_no_sitk() -> None:
    if not _WARNED:
        _WARNED.append("x")
        print("warning: SimpleITK is not installed: resampling with torch's trilinear interpolation instead of "
              "SimpleITK's B-spline; masks can differ from `textseg predict` near edges", file=sys.stderr)


def resample_image(arr: np.ndarray, spacing, target, origin, direction) -> tuple[np.ndarray, tuple[float, ...]]:
    """(x, y, z) to `target` spacing (None keeps an axis): 3rd-order B-spline, nearest-edge extrapolation."""
    new_spacing = tuple(float(s) if t is None else float(t) for s, t in zip(spacing, target))
    size = resampled_shape(arr.shape, spacing, target)
    if list(size) == list(arr.shape) and np.allclose(new_spacing, spacing):
        return arr.astype(np.float32), new_spacing
    if sitk is None:
        _warn_no_sitk()
        return _torch_resample(arr, spacing, size, new_spacing, False).astype(np.float32), new_spacing
    src = _sitk_image(arr.astype(np.float32), spacing, origin, direction)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputOrigin(src.GetOrigin())
    f.SetOutputSpacing(new_spacing)
    f.SetOutputDirection(src.GetDirection())
    f.SetInterpolator(sitk.sitkBSpline)
    f.SetOutputPixelType(src.GetPixelID())
    f.SetUseNearestNeighborExtrapolator(True)
    res = np.transpose(sitk.GetArrayFromImage(f.Execute(src)), (2, 1, 0))
    return np.ascontiguousarray(res).astype(np.float32), new_spacing


def mask_to_grid(mask: np.ndarray, spacing, shape, target_spacing) -> np.ndarray:
    """A label map between grids sharing the first voxel centre and the axes: nearest neighbour."""
    if tuple(mask.shape) == tuple(shape) and np.allclose(spacing, target_spacing):
        return mask
    if sitk is None:
        return _torch_resample(mask, spacing, shape, target_spacing, True)
    src = _sitk_image(mask, spacing)
    ref = sitk.Image([int(s) for s in shape], src.GetPixelID())
    ref.SetSpacing([float(s) for s in target_spacing])
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(ref)
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetUseNearestNeighborExtrapolator(True)
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(f.Execute(src)), (2, 1, 0)))


def largest_component(fg: np.ndarray, full: bool = False) -> np.ndarray:
    """The largest connected component of a boolean volume: face neighbours (6 in 3D; the body crop) or, with
    `full`, every neighbour (26 in 3D; the LCC post-processing). A tie keeps the component met first in C order.
    scipy when importable, else label propagation in torch (each component takes its first voxel's index)."""
    fg = np.asarray(fg).astype(bool)
    try:
        from scipy import ndimage  # optional
    except ImportError:
        ndimage = None
    if ndimage is not None:
        labels, n = ndimage.label(fg, structure=ndimage.generate_binary_structure(fg.ndim, fg.ndim if full else 1))
    else:
        t = torch.from_numpy(np.ascontiguousarray(fg))[None, None]
        big = float(fg.size + 1)
        lab = torch.where(t, torch.arange(1, fg.size + 1, dtype=torch.float64).reshape(t.shape), big)
        pool = F.max_pool3d if fg.ndim == 3 else F.max_pool2d
        kernels = [(3,) * fg.ndim] if full else [tuple(3 if a == b else 1 for b in range(fg.ndim)) for a in range(fg.ndim)]
        while True:  # every foreground voxel takes the smallest index among its neighbours
            grown = lab
            for k in kernels:
                grown = torch.minimum(grown, -pool(-lab, k, 1, tuple(v // 2 for v in k)))
            grown = torch.where(t, grown, big)
            if torch.equal(grown, lab):
                break
            lab = grown
        # ascending first-voxel indices number the components 1..n in C order (the background's `big` comes last)
        values, labels = np.unique(lab[0, 0].numpy(), return_inverse=True)
        labels = labels.reshape(fg.shape) + 1
        labels[~fg] = 0
        n = int((values < big).sum())
    if n <= 1:
        return fg.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def crop_box(chain: dict, image: np.ndarray) -> list[tuple[int, int]]:
    shape = image.shape[1:]
    if chain["crop"] == "nonzero":
        mask = (image != 0).any(axis=0)
    else:  # body: the largest component above the HU threshold, on the first channel
        mask = largest_component(image[0] > chain["body_threshold"])
    if not mask.any():
        sys.exit(f"error: nothing to crop to ({chain['crop']} mask is empty)")
    idx = np.nonzero(mask)
    box = []
    for ax, i in enumerate(idx):
        lo, hi = int(i.min()), int(i.max()) + 1
        need = chain["crop_min_size"][ax]
        if need and hi - lo < need:
            extra = need - (hi - lo)
            lo, hi = lo - extra // 2, hi + extra - extra // 2
        lo, hi = lo - chain["crop_margin"][ax], hi + chain["crop_margin"][ax]
        box.append((max(0, lo), min(shape[ax], hi)))
    return [b if on else (0, n) for b, on, n in zip(box, chain["crop_axes"], shape)]


def zscore(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    vals = img[mask.astype(bool)] if mask is not None else img
    mean, std = float(vals.mean()), float(vals.std())
    return ((img - mean) / max(std, 1e-8)).astype(np.float32)


def preprocess(chain: dict, image: np.ndarray, spacing, origin, direction):
    """The replayed chain: (network input, what it takes to go back)."""
    shape = image.shape[1:]
    back = {"shape": shape, "spacing": spacing, "resampled_shape": shape, "resampled_spacing": spacing, "box": None}
    if chain["target_spacing"] is not None:
        outs = [resample_image(c, spacing, chain["target_spacing"], origin, direction) for c in image]
        image = np.stack([o[0] for o in outs])
        back["resampled_shape"], back["resampled_spacing"] = image.shape[1:], outs[0][1]
    if chain["crop"] != "none":
        box = crop_box(chain, image)
        image = np.ascontiguousarray(image[(slice(None),) + tuple(slice(lo, hi) for lo, hi in box)])
        back["box"] = box
    channels = []
    for ch in image:
        if chain["window"] is not None:
            level, width = chain["window"]
            ch = np.clip((np.asarray(ch, dtype=np.float32) - (level - width / 2.0)) / float(width), 0.0, 1.0)
            ch = ch.astype(np.float32)
        if chain["clip"] is not None:
            lower, upper = chain["clip"]
            vals = ch[ch != 0] if chain["clip_over"] == "nonzero" else ch.ravel()
            if vals.size:
                lo = float(np.percentile(vals, lower)) if lower is not None else None
                hi = float(np.percentile(vals, upper)) if upper is not None else None
                ch = np.clip(ch, lo, hi).astype(np.float32)
        channels.append(ch)
    image = np.stack(channels).astype(np.float32)
    if chain["normalize"] == "zscore":
        image = np.stack([zscore(c) for c in image])
    elif chain["normalize"] == "zscore-nonzero":
        image = np.stack([c.astype(np.float32) if not (c != 0).any() else (zscore(c, c != 0) * (c != 0)).astype(np.float32)
                          for c in image])
    return image, back


def restore(mask: np.ndarray, back: dict) -> np.ndarray:
    """Network-grid mask -> the input's grid: undo the crop (background outside), then the resampling."""
    if back["box"] is not None:
        full = np.zeros(tuple(back["resampled_shape"]), np.uint8)
        full[tuple(slice(lo, hi) for lo, hi in back["box"])] = mask
        mask = full
    return mask_to_grid(mask, back["resampled_spacing"], back["shape"], back["spacing"]).astype(np.uint8)


# --- sliding windows (the literature's placement, as `textseg predict`) ------------------------------------

def window_starts(size: int, patch: int, stride: int) -> list[int]:
    if size <= patch:
        return [0]
    return [min(stride * i, size - patch) for i in range(math.ceil((size - patch) / stride) + 1)]


def gaussian_importance(patch, sigma_scale: float = 0.125) -> torch.Tensor:
    weights = None
    for i, p in enumerate(int(v) for v in patch):
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32)
        g = torch.exp(x ** 2 / (-2 * (p * float(sigma_scale)) ** 2))
        weights = g if weights is None else weights.unsqueeze(-1) * g[(None,) * i]
    return torch.clamp_(weights, min=max(float(weights.min()), 1e-3))


def mirrored(fn, ndim: int, max_batch: int):
    combos = [()] + [c for k in range(1, ndim + 1) for c in itertools.combinations(range(ndim), k)]

    def run(batch: torch.Tensor) -> torch.Tensor:
        b = batch.shape[0]
        flipped = torch.cat([torch.flip(batch, [a + 2 for a in c]) if c else batch for c in combos])
        step = max(b, int(max_batch or b))
        probs = torch.cat([fn(flipped[i:i + step]) for i in range(0, flipped.shape[0], step)])
        total = None
        for k, c in enumerate(combos):
            p = probs[k * b:(k + 1) * b]
            p = torch.flip(p, [a + 2 for a in c]) if c else p
            total = p.clone() if total is None else total.add_(p)
        return total.div_(len(combos))
    return run


def _pad(image: torch.Tensor, target) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    pads = [((t - s) // 2, (t - s) - (t - s) // 2) if t > s else (0, 0) for s, t in zip(image.shape[1:], target)]
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]
    return (F.pad(image, flat, mode="constant", value=0.0) if any(flat) else image), pads


def sliding_window(fn, image: torch.Tensor, patch, stride, sw_batch: int, blend: str) -> torch.Tensor:
    spatial = tuple(image.shape[1:])
    padded, pads = _pad(image, patch)
    shape = tuple(padded.shape[1:])
    starts = list(itertools.product(*(window_starts(s, p, st) for s, p, st in zip(shape, patch, stride))))
    scores = None
    counts = torch.zeros((1,) + shape, dtype=torch.float32, device=image.device)
    weight = gaussian_importance(patch).to(image.device)[None] if blend == "gaussian" else None
    for i in range(0, len(starts), sw_batch):
        group = starts[i:i + sw_batch]
        slices = [(slice(None),) + tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in group]
        probs = fn(torch.stack([padded[sl] for sl in slices])).to(torch.float32)
        if scores is None:
            scores = torch.zeros((probs.shape[1],) + shape, dtype=torch.float32, device=image.device)
        if weight is not None:
            probs = probs * weight
        for sl, p in zip(slices, probs):
            scores[sl] += p
            counts[sl] += 1.0 if weight is None else weight
    scores /= counts
    return scores[(slice(None),) + tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial))]


def whole_volume(fn, image: torch.Tensor, multiple: int) -> torch.Tensor:
    spatial = tuple(image.shape[1:])
    padded, pads = _pad(image, [int(math.ceil(s / multiple) * multiple) for s in spatial])
    probs = fn(padded[None])[0].to(torch.float32)
    return probs[(slice(None),) + tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial))]


def keep_largest(mask: np.ndarray, classes) -> np.ndarray:
    """The recorded post-processing: for each listed class, only its largest connected component stays."""
    out = mask.copy()
    for c in classes or []:
        fg = mask == int(c)
        if fg.any():
            out[fg & ~largest_component(fg)] = 0
    return out


# --- the command ---------------------------------------------------------------------------------------

def predict(files: list[Path], out: Path, record: dict, folder: Path = HERE, device: str = "cpu",
            nan_policy: str = "refuse") -> np.ndarray:
    """Segment one image (its channel files) and write the mask with the first file's affine; returns the mask."""
    dev = torch.device(device)
    inf, chain = record["inference"], record["replay"]
    if chain is None or record.get("replay_error"):
        sys.exit(f"error: the run's preprocessing cannot be replayed on a new image: {record.get('replay_error')}")
    image, spacing, ref = read_image(files, nan_policy)
    if image.shape[0] != record["in_channels"]:
        sys.exit(f"error: the image has {image.shape[0]} channel(s); the model expects {record['in_channels']}")
    origin = direction = None
    if sitk is not None and chain["target_spacing"] is not None:  # the geometry SimpleITK resamples with
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(files[0]))
        reader.ReadImageInformation()
        origin = reader.GetOrigin()[:3]
        direction = tuple(np.asarray(reader.GetDirection(), dtype=float).reshape(reader.GetDimension(), -1)[:3, :3].ravel())
    x, back = preprocess(chain, image, spacing, origin, direction)
    model = load_model(record, folder, dev)
    fn = fixed_batch(model, None if record["dynamic"]["batch"] else record["input"][0])
    sw_batch = int(inf["sw_batch_size"])
    net = mirrored(fn, x.ndim - 1, sw_batch) if inf["tta"] else fn
    with torch.inference_mode():
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev, torch.float32)
        if inf["mode"] == "whole" and record["dynamic"]["spatial"]:
            probs = whole_volume(net, xt, int(record["dynamic"]["multiple"]))
        else:
            probs = sliding_window(net, xt, tuple(inf["patch_size"]), tuple(inf["stride"]), sw_batch, inf["blend"])
    mask = probs.argmax(0).to(device="cpu", dtype=torch.uint8).numpy()
    mask = keep_largest(mask, inf.get("lcc_classes"))
    mask = restore(mask, back)
    hdr = ref.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(mask, ref.affine, hdr)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out))
    return mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", type=Path, help="the image (NIfTI), or its channel files in order")
    ap.add_argument("--out", required=True, type=Path, help="the mask to write (.nii.gz)")
    ap.add_argument("--export", type=Path, default=HERE, help="the export folder (default: this file's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--nan-policy", default="refuse", choices=("refuse", "zero"))
    args = ap.parse_args(argv)
    record = json.loads((args.export / "export.json").read_text(encoding="utf-8"))
    predict(args.images, args.out, record, args.export, args.device, args.nan_policy)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

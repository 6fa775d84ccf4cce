"""Overlay PNGs for a visual check: the image with the reference contour (green) and the prediction
contour (red), the case's text printed underneath.

- 2D cases (`render_2d`): one panel; arrays are shown as stored, rows = first array axis (so an LViT
  picture appears upright).
- 3D cases (`render_3d`): two panels, the middle axial slice (z = Z // 2) and the axial slice where
  the reference (else the prediction) has the largest area. Given the image's NIfTI affine (`prep overlays`),
  slices are shown in the radiological convention whatever the array order: the volume is reoriented to RAS
  and each axial slice drawn with the patient's right on the image's left and anterior at the top. Without an
  affine a slice is shown as stored, `volume[:, :, z]` (rows = first array axis).

Contours are the one-pixel inner boundary of each mask (mask minus its 4-connected erosion) drawn at
display resolution; small images are enlarged by an integer factor (nearest) so that they stay
readable. Used by `textseg eval --overlays N` and `textseg prep overlays DIR`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from textseg_cli.console import progress
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError
from textseg_cli.metrics import dice
from textseg_cli.storage.files import atomic_path, child_path
from textseg_cli.storage.outputs import guard_output_file

REFERENCE_COLOUR = (0, 255, 0)
PREDICTION_COLOUR = (255, 0, 0)
TEXT_COLOUR = (255, 255, 255)
TARGET_PIXELS = 256  # small images are enlarged to about this size
MAX_SCALE = 8
PAD = 4


def _font(size: int = 12):

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def auto_scale(shape: Sequence[int]) -> int:
    """Integer enlargement that brings the larger side to about TARGET_PIXELS (1 … MAX_SCALE)."""
    return int(min(MAX_SCALE, max(1, TARGET_PIXELS // max(1, max(shape)))))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (C, H, W) → uint8 (H, W, 3); each channel scaled from its 1st to 99th percentile."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected an image (H, W) or (C, H, W), got shape {arr.shape}")
    arr = arr if arr.shape[0] == 3 else np.repeat(arr[:1], 3, axis=0)
    out = np.empty(arr.shape[1:] + (3,), np.uint8)
    for c in range(3):
        lo, hi = np.percentile(arr[c], [1, 99])
        if hi <= lo:
            lo, hi = float(arr[c].min()), float(arr[c].max())
        scaled = (arr[c] - lo) / (hi - lo) if hi > lo else np.zeros_like(arr[c])
        out[..., c] = np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return out


def contour(mask: np.ndarray) -> np.ndarray:
    """One-pixel inner boundary of a binary mask (pixels outside the image count as background)."""

    m = np.asarray(mask).astype(bool)
    return m & ~binary_erosion(m, border_value=0)


def _enlarge(arr: np.ndarray, scale: int) -> np.ndarray:
    return arr if scale == 1 else np.repeat(np.repeat(arr, scale, axis=0), scale, axis=1)


def panel(image: np.ndarray | None, reference: np.ndarray | None = None, prediction: np.ndarray | None = None,
          scale: int | None = None) -> np.ndarray:
    """uint8 (H·s, W·s, 3) picture of one 2D slice with its contours (prediction drawn over reference).

    `image` None draws the contours on black (e.g. evaluating plain mask folders). Masks are
    foreground > 0.
    """
    shape = next(np.shape(a)[-2:] for a in (image, reference, prediction) if a is not None)
    scale = auto_scale(shape) if scale is None else int(scale)
    rgb = np.zeros(tuple(shape) + (3,), np.uint8) if image is None else to_rgb(image)
    if rgb.shape[:2] != tuple(shape):
        raise ValueError(f"image {rgb.shape[:2]} and mask {tuple(shape)} sizes differ")
    rgb = _enlarge(rgb, scale)
    for mask, colour in ((reference, REFERENCE_COLOUR), (prediction, PREDICTION_COLOUR)):
        if mask is not None:
            if np.shape(mask) != tuple(shape):
                raise ValueError(f"mask {np.shape(mask)} and image {tuple(shape)} sizes differ")
            rgb[contour(_enlarge(np.asarray(mask) > 0, scale))] = colour
    return rgb


def _text_lines(draw, font, text: str, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        words, line = paragraph.split(), ""
        for word in words:
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def legend_for(reference, prediction) -> str:
    parts = (["green: reference"] if reference is not None else []) + (["red: prediction"] if prediction is not None
                                                                         else [])
    return "   ".join(parts)


def compose(panels: Sequence[np.ndarray], captions: Sequence[str] | None = None, title: str | None = None,
            text: str | None = None, legend: str = ""):
    """Panels side by side (captions above each), a title line above, the text wrapped underneath.

    Returns a PIL image. The picture area is the panels themselves, so pixel (PAD + row,
    x0 + col) of the figure shows pixel (row, col) of a panel (x0 = its left edge).
    """

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(np.ceil(probe.textbbox((0, 0), "Ag", font=font)[3])) + 2
    width = sum(p.shape[1] for p in panels) + PAD * (len(panels) + 1)
    width = max(width, 160)
    head = [title] if title else []
    caption_h = line_h if captions else 0
    body = _text_lines(probe, font, text, width - 2 * PAD) if text else []
    legend_lines = _text_lines(probe, font, legend, width - 2 * PAD) if legend else [""]
    top = PAD + line_h * len(head) + caption_h
    height = top + max(p.shape[0] for p in panels) + PAD + line_h * (len(body) + len(legend_lines)) + PAD
    fig = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(fig)
    y = PAD
    for line in head:
        draw.text((PAD, y), line, fill=TEXT_COLOUR, font=font)
        y += line_h
    x = PAD
    for i, p in enumerate(panels):
        if captions:
            draw.text((x, y), captions[i], fill=TEXT_COLOUR, font=font)
        fig.paste(Image.fromarray(p), (x, top))
        x += p.shape[1] + PAD
    y = top + max(p.shape[0] for p in panels) + PAD
    for line in body:
        draw.text((PAD, y), line, fill=TEXT_COLOUR, font=font)
        y += line_h
    for line in legend_lines:
        draw.text((PAD, y), line, fill=(160, 160, 160), font=font)
        y += line_h
    return fig


def panel_origin(title: bool, captions: bool) -> tuple[int, int]:
    """(row, column) of the first panel's top-left pixel in a `compose` figure."""

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(np.ceil(probe.textbbox((0, 0), "Ag", font=font)[3])) + 2
    return PAD + line_h * int(title) + line_h * int(captions), PAD


def render_2d(image: np.ndarray | None, reference: np.ndarray | None = None, prediction: np.ndarray | None = None,
              text: str | None = None, title: str | None = None, scale: int | None = None):
    """PIL image of a 2D case: image (H, W) or (C, H, W) with contours, `title` above, `text` below."""
    return compose([panel(image, reference, prediction, scale)], None, title, text, legend_for(reference, prediction))


def slices_to_show(reference: np.ndarray | None, prediction: np.ndarray | None, depth: int) -> list[tuple[int, str]]:
    """[(z, caption)]: the middle slice and the slice of largest label area (reference, else prediction)."""
    mid = depth // 2
    shown = [(mid, f"z={mid} (middle)")]
    for mask, what in ((reference, "reference"), (prediction, "prediction")):
        if mask is not None and np.any(mask):
            area = np.count_nonzero(np.asarray(mask) > 0, axis=(0, 1))
            z = int(np.argmax(area))
            if z != mid:
                shown.append((z, f"z={z} (largest {what})"))
            else:
                shown[0] = (mid, f"z={mid} (middle = largest {what})")
            break
    return shown


RADIOLOGICAL = "axial, radiological view: patient's right on the left, anterior at the top"


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The last three axes of `array` (x, y, z as stored) reordered and flipped so that they run along the
    patient's Right, Anterior, Superior axes (the NIfTI affine's RAS world), plus (the stored axis that became
    the S axis, +1 / -1 for its direction) to name slices by their stored index."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    arr = np.asarray(array)
    lead = arr.ndim - 3
    ras = nib.orientations.apply_orientation(np.moveaxis(arr, range(lead), range(-lead, 0)) if lead else arr, ornt)
    ras = np.moveaxis(ras, range(-lead, 0), range(lead)) if lead else ras
    s_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return np.ascontiguousarray(ras), (s_axis, int(ornt[s_axis, 1]))


def radiological(slice_ra: np.ndarray) -> np.ndarray:
    """An axial slice indexed (..., R, A) as displayed: rows from anterior (top) to posterior, columns from the
    patient's right (image left) to left."""
    return np.ascontiguousarray(np.flip(np.swapaxes(slice_ra, -1, -2), (-2, -1)))


def render_3d(image: np.ndarray | None, reference: np.ndarray | None = None, prediction: np.ndarray | None = None,
              text: str | None = None, title: str | None = None, scale: int | None = None,
              affine: np.ndarray | None = None):
    """PIL image of a 3D case (image (x, y, z) or (C, x, y, z)): middle and largest-label axial slices.

    affine: the image's NIfTI (RAS) affine; given, slices are shown in the radiological convention (module
    docstring), else as stored."""
    vol = None if image is None else np.asarray(image)
    if vol is not None and vol.ndim == 3:
        vol = vol[None]
    stored_axis = None
    if affine is not None:
        vol = None if vol is None else to_ras(vol, affine)[0]
        reference = None if reference is None else to_ras(reference, affine)[0]
        prediction = None if prediction is None else to_ras(prediction, affine)[0]
        stored_axis = to_ras(np.zeros((1, 1, 1)), affine)[1]
    show = radiological if affine is not None else (lambda a: a)
    depth = next(np.shape(a)[-1] for a in (vol, reference, prediction) if a is not None)
    panels, captions = [], []
    for z, caption in slices_to_show(reference, prediction, depth):
        panels.append(panel(None if vol is None else show(vol[..., z]),
                            None if reference is None else show(reference[..., z]),
                            None if prediction is None else show(prediction[..., z]), scale))
        if stored_axis is not None:  # name the slice by its index in the stored array
            axis, sign = stored_axis
            caption = caption.replace(f"z={z}", f"{'xyz'[axis]}={z if sign > 0 else depth - 1 - z}", 1)
        captions.append(caption)
    legend = legend_for(reference, prediction)
    if affine is not None:
        legend = f"{legend}\n{RADIOLOGICAL}" if legend else RADIOLOGICAL
    return compose(panels, captions, title, text, legend)


def render_case(image, reference=None, prediction=None, text=None, title=None, dim: int | None = None,
                scale: int | None = None, affine: np.ndarray | None = None):
    """`render_2d` or `render_3d` by `dim` (default: from the mask's number of axes); `affine` (3D): radiological
    display (`render_3d`)."""
    if dim is None:
        ref = reference if reference is not None else prediction
        dim = np.ndim(ref) if ref is not None else (np.ndim(image) - (1 if np.ndim(image) == 4 else 0))
    if dim == 2:
        return render_2d(image, reference, prediction, text, title, scale)
    return render_3d(image, reference, prediction, text, title, scale, affine=affine)


def save_png(picture, path: str | Path, force: bool = False) -> Path:
    """Write a PIL image atomically (refused if it exists, unless force)."""
    path = guard_output_file(path, force)
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")
    return path


def overlay_tap(pairs: Iterable[tuple], n: int, out_dir: str | Path, image_of: Callable[[str], tuple] | None = None,
                force: bool = False, written: list[Path] | None = None) -> Iterator[tuple]:
    """Pass `(case, pred, ref, spacing)` pairs through unchanged, writing an overlay PNG for the first `n`.

    `image_of(case) -> (image, text)` supplies the picture and the case's text (None: contours on
    black). PNGs go to `out_dir/<case>.png`, titled with the case id and its Dice; their paths are
    appended to `written`.
    """

    count = 0
    for item in pairs:
        if count < n:
            cid, pred, ref = item[0], item[1], item[2]
            image, text = image_of(cid) if image_of is not None else (None, None)
            d = dice(np.asarray(pred) > 0, np.asarray(ref) > 0)
            pic = render_case(image, ref, pred, text, f"{cid}   Dice {100 * d:.2f}%", dim=np.ndim(ref))
            path = save_png(pic, child_path(out_dir, cid, ".png"), force)
            if written is not None:
                written.append(path)
            count += 1
        yield item


def spread(ids: Sequence[str], n: int) -> list[str]:
    """`n` ids spread evenly over the list (first and last included), in list order."""
    ids = list(ids)
    if n >= len(ids):
        return ids
    if n <= 0:
        return []
    if n == 1:
        return ids[:1]
    picks = sorted({round(i * (len(ids) - 1) / (n - 1)) for i in range(n)})
    return [ids[i] for i in picks]


def prepared_overlays(data: str | Path, out: str | Path | None = None, n: int = 6, split: str | None = None,
                      force: bool = False, case_ids: Sequence[str] | None = None) -> list[Path]:
    """Overlay PNGs (image, label contour, text) of `n` cases of a prepared folder for a visual check
    of preprocessing. Cases are spread evenly over the list (all cases, or one split, or `case_ids`);
    PNGs go to `out` (default `<data>/overlays/`), one `<case>.png` each. Returns their paths."""
    if n < 1:
        raise ConfigError(f"--n {n}: expected at least 1 case")
    ds = load_prepared(data)
    ids = list(case_ids) if case_ids is not None else (ds.split(split) if split else ds.case_ids)
    chosen = spread(ids, n)
    out_dir = Path(out) if out is not None else Path(data) / "overlays"
    for cid in chosen:  # fail before drawing anything
        guard_output_file(child_path(out_dir, cid, ".png"), force)
    paths = []
    with progress() as bar:
        task = bar.add_task("overlays", total=len(chosen), info="")
        for cid in chosen:
            case = ds.load_case(cid, with_label=ds.has_label(cid))
            title = f"{ds.name} / {cid}" + ("" if case.label is not None else " (no label)")
            affine = nib.load(str(ds.image_path(cid))).affine if ds.dim == 3 else None  # header only
            pic = render_case(case.image, case.label, None, case.text, title, dim=ds.dim, affine=affine)
            paths.append(save_png(pic, child_path(out_dir, cid, ".png"), force))
            bar.update(task, advance=1, info=cid)
    return paths

"""A deterministic CT-like 3D phantom for demos and tests.

Each case is an abdomen-like slab in Hounsfield units: air around a body ellipse with a fat rim and
textured soft tissue, a bright spine and aorta, a soft-edged irregular organ ("liver": a perturbed
ellipsoid with internal vessels), a smaller second organ ("kidney", labelled only with two classes),
and distractor blobs whose intensity overlaps the organ's. A smooth bias field and correlated noise
finish the image. Contrast between organ and tissue is modest and the distractors have the organ's
intensity, so a global intensity threshold scores poorly while a network that sees shape, texture and
context can do well.

Case `i` of seed `s` depends only on (s, i): adding cases never changes earlier ones.
Geometry is expressed in fractions of the volume size, so any size from 16 voxels per axis works.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

GENERATOR_VERSION = 1
SPACING = (1.5, 1.5, 2.0)  # mm; nominal, only recorded in the NIfTI headers
HU_AIR, HU_FAT, HU_TISSUE = -1000.0, -90.0, 35.0
HU_ORGAN, HU_KIDNEY, HU_AORTA, HU_BONE = 95.0, 140.0, 180.0, 450.0
CLASS_NAMES = {1: ["background", "liver"], 2: ["background", "liver", "kidney"]}


def case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), GENERATOR_VERSION]))


def smooth_noise(rng: np.random.Generator, shape, cells) -> np.ndarray:
    """Low-frequency noise of unit std: a coarse random grid interpolated with Gaussian weights.

    Separable (one small matrix per axis), so it costs a few milliseconds even for large volumes.
    """
    cells = [max(2, int(c)) for c in cells]
    field = rng.standard_normal(cells)
    for axis, (n, c) in enumerate(zip(shape, cells)):
        pos = (np.arange(n) + 0.5) / n * c - 0.5  # voxel centres in cell units
        w = np.exp(-0.5 * ((pos[:, None] - np.arange(c)[None, :]) / 0.75) ** 2)
        w /= w.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(w, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    field = field.astype(np.float32)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _grid(size):
    """Voxel-centre coordinates as fractions of the size, centred on 0 (range about -0.5..0.5)."""
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n - 0.5 for n in size]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid_distance(coords, centre, semi_axes, angle, size, surface=None):
    """Approximate signed distance in voxels to a z-rotated ellipsoid surface (> 0 inside).

    `surface` perturbs the normalised radius (1 + surface), giving an irregular outline.
    """
    x, y, z = (c - o for c, o in zip(coords, centre))
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * x + sa * y, -sa * x + ca * y
    r = np.sqrt((u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 + (z / semi_axes[2]) ** 2)
    radius = 1.0 if surface is None else 1.0 + surface
    mean_axis_vox = float(np.mean([a * n for a, n in zip(semi_axes, size)]))
    return (radius - r) * mean_axis_vox


def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def generate_case(seed: int, index: int, size=(64, 64, 48), n_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: (image in HU float32 (x, y, z), label uint8 with 0..n_classes)."""
    if n_classes not in (1, 2):
        raise ValueError("n_classes must be 1 or 2")
    size = tuple(int(s) for s in size)
    rng = case_rng(seed, index)
    x, y, z = _grid(size)
    hu = np.full(size, HU_AIR, dtype=np.float32)

    # body: an ellipse in x-y with a wobbly outline and a subcutaneous fat rim
    ax, ay = 0.44 * rng.uniform(0.94, 1.04), 0.36 * rng.uniform(0.94, 1.04)
    wobble = 0.03 * smooth_noise(rng, size, (4, 4, 3))
    body_r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2) * (1 + wobble)
    body = body_r < 1.0
    hu[body] = HU_FAT
    inner = body_r < 1.0 - rng.uniform(0.1, 0.16)
    tissue = HU_TISSUE + 9.0 * smooth_noise(rng, size, (7, 7, 5))
    hu[inner] = tissue[inner]

    # spine (posterior, +y) and aorta in front of it, running along z with a slight drift
    drift = 0.015 * np.sin(2 * np.pi * (z + rng.uniform(0, 1)))
    spine_d = np.sqrt(((x - drift) / 0.075) ** 2 + ((y - 0.25 * ay / 0.36) / 0.065) ** 2)
    hu[spine_d < 1.0] = HU_BONE
    hu[(spine_d >= 1.0) & (spine_d < 1.3)] = 250.0  # cortical-ish shell blends into tissue below
    aorta_c = (0.04 + rng.uniform(-0.015, 0.015), 0.12)
    aorta = np.sqrt((x - aorta_c[0] - drift) ** 2 + (y - aorta_c[1]) ** 2) < 0.042
    hu[aorta] = HU_AORTA

    # organ 1: perturbed ellipsoid on the -x side, soft edge, internal texture and darker vessels
    organ_c = (-0.17 + rng.uniform(-0.03, 0.03), -0.04 + rng.uniform(-0.03, 0.03), rng.uniform(-0.04, 0.04))
    organ_ax = (0.16 * rng.uniform(0.85, 1.15), 0.19 * rng.uniform(0.85, 1.15), 0.30 * rng.uniform(0.85, 1.1))
    organ_sd = _ellipsoid_distance((x, y, z), organ_c, organ_ax, rng.uniform(-0.45, 0.45), size,
                                   surface=0.16 * smooth_noise(rng, size, (5, 5, 4)))
    organ = (organ_sd > 0) & inner
    vessels = np.abs(smooth_noise(rng, size, (6, 6, 5))) < 0.12
    organ_hu = HU_ORGAN + 9.0 * smooth_noise(rng, size, (10, 10, 8)) - 28.0 * vessels
    weight = _sigmoid(organ_sd / 0.7) * inner
    hu = hu * (1 - weight) + organ_hu * weight

    # organ 2 ("kidney"): always drawn, labelled only when two classes are requested
    kid_c = (0.2 + rng.uniform(-0.025, 0.025), 0.1 + rng.uniform(-0.025, 0.025), rng.uniform(-0.05, 0.05))
    kid_ax = (0.075 * rng.uniform(0.85, 1.15), 0.1 * rng.uniform(0.85, 1.15), 0.2 * rng.uniform(0.85, 1.1))
    kid_sd = _ellipsoid_distance((x, y, z), kid_c, kid_ax, rng.uniform(-0.6, 0.6), size,
                                 surface=0.1 * smooth_noise(rng, size, (4, 4, 3)))
    kidney = (kid_sd > 0) & inner & ~organ
    kid_hu = HU_KIDNEY + 10.0 * smooth_noise(rng, size, (8, 8, 6)) - 35.0 * (kid_sd > 0.45 * kid_ax[0] * size[0])
    weight = _sigmoid(kid_sd / 0.7) * inner * ~organ
    hu = hu * (1 - weight) + kid_hu * weight

    # distractors with the organ's intensity: a "spleen" opposite the organ, then smaller blobs of other
    # shapes and places (bowel, lymph nodes); together about as large as the organ, so thresholding fails
    spl_c = (0.2 + rng.uniform(-0.025, 0.025), -0.13 + rng.uniform(-0.025, 0.025), rng.uniform(-0.05, 0.05))
    spl_ax = (0.09 * rng.uniform(0.85, 1.15), 0.1 * rng.uniform(0.85, 1.15), 0.27 * rng.uniform(0.85, 1.1))
    spl_sd = _ellipsoid_distance((x, y, z), spl_c, spl_ax, rng.uniform(-0.6, 0.6), size,
                                 surface=0.12 * smooth_noise(rng, size, (4, 4, 3)))
    spleen = (spl_sd > 0) & inner & ~organ & ~kidney
    weight = _sigmoid(spl_sd / 0.7) * inner * ~organ * ~kidney
    spl_hu = HU_ORGAN + rng.uniform(-10, 10) + 8.0 * smooth_noise(rng, size, (8, 8, 6))
    hu = hu * (1 - weight) + spl_hu * weight
    occupied = ndimage.binary_dilation(organ | kidney | spleen | (spine_d < 1.3) | aorta, iterations=2)
    blob_surface = 0.2 * smooth_noise(rng, size, (5, 5, 4))
    coarse = (slice(None, None, 2),) * 3  # rejection tests on every other voxel: 8x cheaper, same decisions
    coarse_grid, coarse_inner = (x[coarse], y[coarse], z[coarse]), inner[coarse]
    for _ in range(int(rng.integers(4, 7))):
        for _attempt in range(20):  # rejection sampling on the unperturbed, slightly enlarged ellipsoid
            c = (rng.uniform(-0.3, 0.3), rng.uniform(-0.25, 0.2), rng.uniform(-0.3, 0.3))
            axes_ = (rng.uniform(0.05, 0.11), rng.uniform(0.04, 0.09), rng.uniform(0.08, 0.35))
            angle = rng.uniform(0, np.pi)
            candidate = (_ellipsoid_distance(coarse_grid, c, [1.25 * a for a in axes_], angle, size) > 0) & coarse_inner
            if candidate.sum() > 3 and not (candidate & occupied[coarse]).any():
                break
        else:
            continue
        sd = _ellipsoid_distance((x, y, z), c, axes_, angle, size, surface=blob_surface)
        blob = (sd > 0) & inner
        blob_hu = HU_ORGAN + rng.uniform(-12, 12) + 8.0 * smooth_noise(rng, size, (9, 9, 7))
        weight = _sigmoid(sd / 0.7) * inner * ~occupied
        hu = hu * (1 - weight) + blob_hu * weight
        occupied |= ndimage.binary_dilation(blob, iterations=2)

    # acquisition: bias field, partial-volume blur, correlated noise
    hu = hu + 12.0 * smooth_noise(rng, size, (3, 3, 3)) * body
    hu = ndimage.gaussian_filter(hu, 0.6)
    noise = ndimage.gaussian_filter(rng.standard_normal(size).astype(np.float32), 0.7)
    hu = hu + 14.0 * noise / max(float(noise.std()), 1e-6)

    label = organ.astype(np.uint8)
    if n_classes == 2:
        label[kidney] = 2
    return hu.astype(np.float32), label

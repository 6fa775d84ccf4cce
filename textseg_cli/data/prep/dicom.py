"""Reading a CT DICOM series in slice order (SimpleITK/GDCM) with checks that no slice is silently lost.

GDCM skips files it cannot parse and sorts the rest by position, so a corrupt or missing slice would
otherwise yield a shorter volume with a jump in anatomy. We therefore check that every DICOM file in the
folder belongs to the series and that slice positions are evenly spaced along the slice normal.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from textseg_cli.errors import DataError

_NON_DICOM = {".txt", ".xml", ".json", ".csv", ".md", ".html", ".jpg", ".png"}


def dicom_folders(root: str | Path) -> list[Path]:
    """Folders under `root` (itself included) that hold DICOM files."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        if any(_looks_dicom(f) for f in files):
            out.append(Path(dirpath))
    return sorted(out)


def _looks_dicom(name: str) -> bool:
    if name.startswith("."):
        return False
    suffix = Path(name).suffix.lower()
    if suffix in _NON_DICOM or name.upper() == "DICOMDIR":
        return False
    return suffix in (".dcm", ".ima", "") or suffix[1:].isdigit()  # scanners also write 1.2.840...123 names


def read_dicom_series(folder: str | Path, case_id: str):
    """Read the one image series in `folder` into a SimpleITK image in Hounsfield units (rescale applied).

    Raises DataError naming the case for: no series, several series, unreadable files, duplicate or missing
    slice positions, or a reader failure (e.g. truncated pixel data).
    """

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"case '{case_id}': no readable DICOM series", folder)
    if len(series) > 1:
        sizes = {s: len(reader.GetGDCMSeriesFileNames(str(folder), s)) for s in series}
        raise DataError(f"case '{case_id}': {len(series)} DICOM series in one folder ({sizes}); keep only the CT "
                        "series to prepare", folder)
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    all_files = {p.name for p in folder.iterdir() if p.is_file() and _looks_dicom(p.name)}
    stray = sorted(all_files - {Path(f).name for f in files})
    if stray:
        raise DataError(f"case '{case_id}': {len(stray)} DICOM file(s) are not readable as part of the series "
                        f"(corrupt or from another series): {stray[:5]}", folder)
    _check_positions(files, case_id, folder)
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except Exception as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"case '{case_id}': DICOM series could not be read ({last})", folder) from exc
    if img.GetDimension() != 3 or img.GetSize()[2] != len(files):
        raise DataError(f"case '{case_id}': read {img.GetSize()} from {len(files)} slices", folder)
    return sitk.Cast(img, sitk.sitkFloat32)


def _check_positions(files: list[str], case_id: str, folder: Path) -> None:

    positions, orient = [], None
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ipp = [float(v) for v in ds.ImagePositionPatient]
            if orient is None:
                orient = [float(v) for v in ds.ImageOrientationPatient]
        except Exception as exc:
            raise DataError(f"case '{case_id}': slice without a readable position ({type(exc).__name__}: {exc})",
                            f) from exc
        positions.append(ipp)
    if len(files) < 2:
        return
    normal = np.cross(orient[:3], orient[3:])
    z = np.sort(np.asarray(positions) @ normal)
    gaps = np.diff(z)
    step = float(np.median(gaps))
    if np.any(gaps < 1e-3):
        raise DataError(f"case '{case_id}': duplicate slice positions in the series", folder)
    bad = np.nonzero(np.abs(gaps - step) > max(0.01, 0.05 * step))[0]
    if bad.size:
        i = int(bad[0])
        raise DataError(f"case '{case_id}': uneven slice spacing (gap of {gaps[i]:.3g} mm between positions "
                        f"{z[i]:.4g} and {z[i + 1]:.4g}, usual {step:.3g} mm): a slice is missing or unreadable", folder)

"""`textseg prep slices`: a prepared 3D folder → a prepared 2D folder of slices with organ prompts.

Each slice `<volume>_s<index>` is `volume[:, :, index]` (axial; coronal: `[:, index, :]`, sagittal:
`[index, :, :]`), stored as a 2D case with the two in-plane spacings. Every slice of a volume goes to
the split of its volume, so no volume is ever shared between splits. The case text is one organ
prompt built from the class names (the same for every slice, never from the slice's label, so a
test slice's text does not reveal whether the organ is visible). Each case records
`source_volume`, `slice_index` and `slice_axis`; `extra.slices.volumes` records per volume the
slice count, the 3D spacing and any skipped slices, so that `restack_pairs` can rebuild volumes
from per-slice predictions (`textseg eval ... --per-volume`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from textseg_cli.console import progress
from textseg_cli.data.prep.writer import PreparedWriter
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError, DataError

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
DEFAULT_TEMPLATE = "A {modality} slice showing the {classes}."
MODALITY_WORDS = {"CT": "computed tomography", "MR": "magnetic resonance", "MRI": "magnetic resonance",
                  "PET": "positron emission tomography", "US": "ultrasound"}


def join_names(names: Sequence[str]) -> str:
    """'spleen' · 'liver and spleen' · 'liver, kidney and spleen'."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def organ_prompt(classes: Sequence[str], modality: str, template: str | None = None) -> str:
    """The slice text, e.g. "A computed tomography slice showing the spleen." (placeholders
    {modality}: the modality spelled out where known, {classes}: the class names joined)."""
    template = DEFAULT_TEMPLATE if template is None else template
    if "{classes}" not in template:
        raise ConfigError(f"--template {template!r} has no '{{classes}}' placeholder")
    word = MODALITY_WORDS.get(str(modality).upper(), str(modality))
    try:
        return template.format(modality=word, classes=join_names(classes))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"--template {template!r}: allowed placeholders are {{modality}} and {{classes}} "
                          f"({type(exc).__name__}: {exc})") from None


def select_classes(class_names: Sequence[str], wanted: Sequence[str] | str | None) -> list[int]:
    """Source class indices to keep (in the order given); None keeps every foreground class."""
    if wanted is None:
        return list(range(1, len(class_names)))
    if isinstance(wanted, str):
        wanted = [w.strip() for w in wanted.split(",") if w.strip()]
    lookup = {n.lower(): i for i, n in enumerate(class_names) if i > 0}
    chosen = []
    for name in wanted:
        if name.lower() not in lookup:
            raise ConfigError(f"--classes: no class {name!r}; this data set has {list(class_names[1:])}")
        if lookup[name.lower()] not in chosen:
            chosen.append(lookup[name.lower()])
    if not chosen:
        raise ConfigError("--classes names no class")
    return chosen


def remap(label: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Kept classes become 1..len(keep) in the order given; every other class becomes background."""
    lut = np.zeros(max(int(label.max()) + 1, max(keep) + 1), np.uint8)
    for new, old in enumerate(keep, start=1):
        lut[old] = new
    return lut[label]


def _volume_split(spec: dict[str, Any]) -> dict[str, str]:
    where: dict[str, str] = {}
    for split, members in spec["splits"].items():
        for cid in members if isinstance(members, list) else []:
            if cid in where and where[cid] != split:
                raise DataError(f"volume '{cid}' is in two splits ({where[cid]} and {split})")
            where[cid] = split
    return where


def _skipped(label: np.ndarray | None, axis: int, ratio: float, rng: np.random.Generator) -> list[int]:
    """Indices of the empty slices dropped: round(ratio × number of empty slices), seeded."""
    if label is None or ratio <= 0:
        return []
    other = tuple(a for a in range(3) if a != axis)
    empty = np.flatnonzero(~np.any(label > 0, axis=other))
    k = int(round(ratio * empty.size))
    return sorted(int(i) for i in rng.choice(empty, size=k, replace=False)) if k else []


def prep_slices(src: str | Path, out: str | Path, *, axis: str = "axial", classes: Sequence[str] | str | None = None,
                skip_empty_ratio: float = 0.0, template: str | None = None, seed: int = 0, force: bool = False,
                name: str | None = None):
    """Turn the prepared 3D folder `src` into a prepared 2D folder of slices at `out` (see module doc).

    classes: class names to keep (others become background; default all). skip_empty_ratio R drops
    round(R × n) of the n slices without any kept class, seeded, in TRAINING volumes only (validation
    and test volumes keep every slice, so they can be re-stacked and scored per volume). template: the
    text template ({modality}, {classes}). Returns the `PreparedDataset`.
    """
    if axis not in AXES:
        raise ConfigError(f"--axis {axis!r}: expected one of {', '.join(AXES)}")
    if not 0.0 <= float(skip_empty_ratio) <= 1.0:
        raise ConfigError(f"--skip-empty-ratio {skip_empty_ratio}: expected a fraction between 0 and 1")
    ds = load_prepared(src)
    if ds.dim != 3:
        raise DataError(f"expected a prepared 3D folder (dim 3), found dim {ds.dim}", Path(src) / "dataset.json")
    ax = AXES[axis]
    keep = select_classes(ds.class_names, classes)
    kept_names = [ds.class_names[i] for i in keep]
    text = organ_prompt(kept_names, ds.spec.get("modality", ""), template)
    split_of = _volume_split(ds.spec)
    w = PreparedWriter(out, name=name or f"{ds.name}_{axis}", dim=2, modality=ds.spec.get("modality", ""),
                       channel_names=ds.spec["channel_names"], class_names=["background", *kept_names], force=force,
                       src=src)
    volumes: dict[str, dict[str, Any]] = {}
    slice_ids: dict[str, list[str]] = {}
    with progress() as bar:
        task = bar.add_task(f"prep slices ({axis})", total=len(ds.case_ids), info="")
        for vi, vid in enumerate(ds.case_ids):
            case = ds.load_case(vid, with_label=ds.has_label(vid))
            label = None if case.label is None else remap(case.label, keep)
            n = case.image.shape[1 + ax]
            rng = np.random.default_rng([seed, vi])
            skipped = _skipped(label, ax, float(skip_empty_ratio), rng) if split_of.get(vid) == "train" else []
            width = max(3, len(str(n - 1)))
            in_plane = [s for a, s in enumerate(case.spacing) if a != ax]
            ids = []
            for k in range(n):
                if k in skipped:
                    continue
                sid = f"{vid}_s{k:0{width}d}"
                img = np.take(case.image, k, axis=1 + ax)  # (C, a, b)
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
                lab = None if label is None else np.take(label, k, axis=ax)
                w.add_case(sid, img, lab, in_plane, text=text, source_volume=vid, slice_index=k, slice_axis=axis)
                ids.append(sid)
            slice_ids[vid] = ids
            volumes[vid] = {"n_slices": int(n), "shape": list(case.image.shape[1:]),
                            "spacing": [float(s) for s in case.spacing], "skipped": skipped,
                            "split": split_of.get(vid)}
            bar.update(task, advance=1, info=vid)

    splits = {s: [sid for vid in members for sid in slice_ids[vid]]
              for s, members in ds.spec["splits"].items() if isinstance(members, list)}
    splits.setdefault("train", [])
    src_patch = ds.patch_size
    patch = [p for a, p in enumerate(src_patch) if a != ax] if src_patch and len(src_patch) == 3 else None
    labeled = {"rule": "first_n_of_train",
               "doc": "the first N cases of splits.train in its order are labeled; slices are listed volume by "
                      "volume in the source's train order, so N = the slice count of the first volumes keeps "
                      "whole volumes labeled (extra.slices.volumes gives the counts)"}
    default_vols = (ds.spec.get("labeled") or {}).get("default")
    if isinstance(default_vols, int):
        train_vols = [v for v in ds.spec["splits"].get("train", [])]
        labeled["default"] = sum(len(slice_ids[v]) for v in train_vols[:default_vols]) or None
        labeled["default_volumes"] = default_vols
    preprocessing = list(ds.spec.get("preprocessing") or []) + [
        {"step": "slice", "params": {"axis": axis, "array_axis": ax, "classes": kept_names,
                                     "class_indices_in_source": keep, "text_template": template or DEFAULT_TEMPLATE,
                                     "text": text, "skip_empty_ratio": float(skip_empty_ratio),
                                     "skip_empty_applies_to": "train split only", "seed": seed}}]
    extra = {"slices": {"source": str(Path(src).resolve()), "source_name": ds.name, "axis": axis, "array_axis": ax,
                        "volumes": volumes}}
    return w.finish(splits=splits, preprocessing=preprocessing,
                    source={"layout": "slices", "paths": [str(Path(src).resolve())]}, patch_size=patch,
                    labeled=labeled, seed=seed, extra=extra)


# --- re-stacking ----------------------------------------------------------------------------------
def slice_info(ds) -> dict[str, Any] | None:
    """`extra.slices` of a slices folder (None for any other prepared folder)."""
    info = (ds.spec.get("extra") or {}).get("slices")
    return info if isinstance(info, dict) and "volumes" in info else None


def _slice_map(ds) -> dict[str, tuple[str, int]]:
    out = {}
    for entry in ds.spec["cases"]:
        if "source_volume" in entry:
            out[entry["id"]] = (entry["source_volume"], int(entry["slice_index"]))
    return out


def restack_pairs(pairs: Iterable[tuple], ds) -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Per-slice `(case, pred, ref, spacing)` → per-volume `(volume, pred3d, ref3d, spacing3d)`.

    A volume is yielded as soon as all its slices have passed; a volume with skipped slices, or
    with slices missing at the end, is a DataError naming them (per-volume scores need every slice).
    """
    info = slice_info(ds)
    if info is None:
        raise DataError("--per-volume needs a slices folder made by `textseg prep slices` (extra.slices missing)",
                        ds.root / "dataset.json")
    axis = int(info["array_axis"])
    volumes = info["volumes"]
    where = _slice_map(ds)
    pending: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for cid, pred, ref, _ in pairs:
        if cid not in where:
            raise DataError(f"case '{cid}' records no source_volume/slice_index", ds.root / "dataset.json")
        vid, k = where[cid]
        vol = volumes[vid]
        if vol.get("skipped"):
            raise DataError(f"volume '{vid}': slices {vol['skipped'][:8]} were skipped at preparation "
                            "(--skip-empty-ratio), so it cannot be re-stacked", ds.root / "dataset.json")
        got = pending.setdefault(vid, {})
        got[k] = (np.asarray(pred), np.asarray(ref))
        if len(got) == vol["n_slices"]:
            del pending[vid]
            order = range(vol["n_slices"])
            yield (vid, np.stack([got[i][0] for i in order], axis=axis), np.stack([got[i][1] for i in order], axis=axis),
                   tuple(float(s) for s in vol["spacing"]))
    for vid, got in pending.items():
        missing = [i for i in range(volumes[vid]["n_slices"]) if i not in got]
        raise DataError(f"volume '{vid}': {len(missing)} slice(s) have no prediction/reference "
                        f"(slice indices {missing[:8]}{'...' if len(missing) > 8 else ''}); per-volume scores need "
                        "every slice", ds.root / "dataset.json")


def restack_labels(ds, volume: str) -> np.ndarray:
    """The label volume rebuilt from a slices folder's slice labels (a check of the slicing)."""
    info = slice_info(ds)
    if info is None:
        raise DataError("not a slices folder (extra.slices missing)", ds.root / "dataset.json")
    ids = [cid for cid, (vid, _) in sorted(_slice_map(ds).items(), key=lambda kv: kv[1][1]) if vid == volume]
    labels = [ds.load_case(cid, with_label=True).label for cid in ids]
    pairs = ((cid, lab, lab, None) for cid, lab in zip(ids, labels))
    for _, stacked, _, _ in restack_pairs(pairs, ds):
        return stacked
    raise DataError(f"no slices of volume '{volume}'", ds.root / "dataset.json")

"""Predicting with a trained `Method`: one image (`predict_case`) or a folder of volumes (`predict_folder`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from textseg_cli.console import console, err_console, progress
from textseg_cli.data.io import NAN_POLICIES, apply_nan_policy, read_input_image
from textseg_cli.data.prep.custom import looks_like_label
from textseg_cli.data.prepared import load_prepared
from textseg_cli.data.preprocessing import zscore
from textseg_cli.errors import ConfigError, DataError, TextsegError
from textseg_cli.inference import replay
from textseg_cli.inference.fusion import fused_for_inference
from textseg_cli.inference.postprocessing import apply_lcc, read_postprocessing
from textseg_cli.inference.settings import NO_RECORD, InferenceSettings, resolve_preset
from textseg_cli.inference.sliding_window import (
    mirrored,
    sliding_window_inference,
    whole_volume_inference,
)
from textseg_cli.runs.load import load_run
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.precision import Precision, resolve_precision
from textseg_cli.storage.files import atomic_write_json, child_path
from textseg_cli.storage.outputs import prepare_output_dir


def predict_case(method, image: np.ndarray | torch.Tensor, settings: InferenceSettings | Mapping[str, Any] | None,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """Softmax probabilities (K, *spatial), float32, of `method` on one image (C, *spatial).

    `settings`: the command's `InferenceSettings`, built once (`InferenceSettings.from_config`) and passed to
    every case, with its precision already resolved; a plain `inference` dict is read with
    `InferenceSettings.from_section` (then a precision request is resolved here, per call). They set the
    mode (sliding windows or one whole-volume pass), windows, decoder, precision ("auto" = bf16 autocast on
    CUDA and on CPUs with bf16 units, else float32 — `textseg_cli.runtime.precision`; on CPUs with
    AVX512-BF16/AMX about 2-3x faster, masks differ on ~0.01 % of voxels), `channels_last` (channels-last(-3d)
    memory, faster with cuDNN and oneDNN), `fuse_bn` (predict with a cached copy whose BatchNorms are folded
    into the preceding convs, ~8 % faster on CPU; off, the method itself is used and converted to
    channels-last in place) and `out_device` (where probabilities accumulate; default the compute device).
    `tta` averages the probabilities of every flip of the spatial axes (each window's flips share its forward
    passes) and `blend` weights the windows (constant, or gaussian). The result stays on `out_device`.
    """
    dev = resolve_device(device)
    s = settings if isinstance(settings, InferenceSettings) else InferenceSettings.from_section(settings)
    x = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    x = x.to(device=dev, dtype=torch.float32)
    ndim = x.ndim - 1
    if ndim not in (2, 3):
        raise DataError(f"expected an image (C, x, y) or (C, x, y, z), got shape {tuple(x.shape)}")
    if getattr(method, "dim", ndim) != ndim:
        raise DataError(f"image has {ndim} spatial axes; the model is {method.dim}D")
    if getattr(method, "in_channels", x.shape[0]) != x.shape[0]:
        raise DataError(f"image has {x.shape[0]} channel(s); the model expects {method.in_channels}")
    precision = (s.precision if isinstance(s.precision, Precision)
                 else resolve_precision(s.precision, dev, "inference.precision"))
    channels_last = s.channels_last
    memory_format = torch.channels_last_3d if ndim == 3 else torch.channels_last

    method.to(dev)
    was_training = method.training
    method.eval()
    # a cached eval copy with BatchNorm folded into the convs; the method itself is left as it is
    model = fused_for_inference(method) if s.fuse_bn else method
    if channels_last:
        model.to(memory_format=memory_format)

    def network_fn(batch: torch.Tensor) -> torch.Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=memory_format)
        with precision.autocast():
            return model.predict_proba(batch, s.decoder).float().contiguous()

    sw_batch = s.sw_batch_size or (1 if s.mode == "whole" else 4)
    predict_fn = mirrored(network_fn, ndim, max_batch=sw_batch) if s.tta else network_fn
    try:
        with torch.inference_mode():
            if s.mode == "whole":
                return whole_volume_inference(
                    predict_fn, x, multiple=s.multiple, max_voxels=s.max_voxels, patch_size=s.patch_size,
                    stride=s.stride, sw_batch_size=sw_batch, out_device=s.out_device, blend=s.blend)
            if s.patch_size is None:
                raise ConfigError("inference.patch_size is required for sliding-window inference")
            return sliding_window_inference(predict_fn, x, s.patch_size, s.stride,
                                            sw_batch_size=sw_batch, out_device=s.out_device, blend=s.blend)
    finally:
        if was_training:
            method.train()


@dataclass(frozen=True)
class Member:
    """One trained run as `textseg predict` uses it: the loaded run and its inference settings, built once."""
    run: Any  # runs.load.LoadedRun
    settings: InferenceSettings


def load_member(run_dir: str | Path, checkpoint: str, device: torch.device, *, inference: str | None = None,
                decoder: int | str | None = None, precision: str | None = None, sw_batch_size: int | None = None,
                out_device: str | None = None, tta: bool | None = None, blend: str | None = None) -> Member:
    """Load a run and build its settings (`--inference best` reads RUN/postprocessing.json; without one it
    says so in one line on stderr and applies none)."""
    run = load_run(run_dir, checkpoint, device=str(device))
    dim = int(getattr(run.method, "dim", 3))
    record = read_postprocessing(run_dir) if resolve_preset(run.config, inference) == "best" else None
    settings = InferenceSettings.from_config(run.config, device=device, mode=inference, decoder=decoder,
                                             precision=precision, sw_batch_size=sw_batch_size, out_device=out_device,
                                             ndim=dim, tta=tta, blend=blend, postprocessing=record)
    if settings.lcc_source == NO_RECORD:
        err_console.print(f"note: {NO_RECORD}", highlight=False, markup=False, soft_wrap=True)
    return Member(run, settings)


def check_members(members: Sequence[Member]) -> None:
    """Refuse an ensemble whose runs do not predict the same thing from the same input: each member must share the
    first's dimensionality, image channels, classes (names included) and recorded preprocessing (dataset.json
    `preprocessing`, the chain `textseg predict` replays). The ConfigError names the run that differs."""
    def facts(m: Member) -> dict[str, Any]:
        ds = m.run.dataset
        return {"dimensionality": int(getattr(m.run.method, "dim", ds.dim)),
                "image channels": list(ds.spec.get("channel_names") or []) or ds.in_channels,
                "classes": ds.class_names,
                "preprocessing": [s for s in ds.spec.get("preprocessing") or []
                                  if not (isinstance(s, dict) and s.get("step") in replay.SOURCE_STEPS)]}
    first = facts(members[0])
    for m in members[1:]:
        for key, value in facts(m).items():
            if value != first[key]:
                raise ConfigError(f"ensemble: run {m.run.run_dir} has {key} {_short(value)} but run "
                                  f"{members[0].run.run_dir} has {_short(first[key])}; an ensemble averages runs "
                                  "trained on the same classes, channels and preprocessing")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ensemble_lcc_classes(members: Sequence[Member]) -> tuple[tuple[int, ...] | None, str]:
    """The post-processing of an ensemble's averaged prediction and why: a member's chosen LCC classes
    (`--inference best`) apply only when every member made the same choice; otherwise none is applied (a choice
    made on one fold's validation cases says nothing about the average of others)."""
    choices = {m.settings.lcc_classes for m in members}
    if len(choices) == 1:
        classes = next(iter(choices))
        return classes, ("all members agree" if len(members) > 1 else members[0].settings.lcc_source)
    return None, ("none: the members' post-processing differs (" + "; ".join(
        f"{Path(m.run.run_dir).name}: {'LCC ' + ','.join(map(str, m.settings.lcc_classes)) if m.settings.lcc_classes else 'none'}"
        for m in members) + ")")


def ensemble_probs(members: Sequence[Member], image: np.ndarray, device: torch.device) -> torch.Tensor:
    """Probabilities (K, *spatial) of `image`: `predict_case` of each member with its own settings, averaged
    (summed in the members' order, then divided by their number)."""
    total: torch.Tensor | None = None
    for m in members:
        p = predict_case(m.run.method, image, m.settings, device)
        # out of place: predict_case returns inference tensors, which refuse in-place updates outside inference mode
        total = p if total is None else total + p.to(total.device)
    assert total is not None
    return total if len(members) == 1 else total / len(members)


def probs_to_mask(probs: torch.Tensor) -> np.ndarray:
    """Class-index mask (uint8, numpy) from probabilities (K, *spatial)."""
    return probs.argmax(0).to(device="cpu", dtype=torch.uint8).numpy()


# --- geometry-preserving image I/O --------------------------------------------------------------------

SPACING_FAR = 2.0  # an input axis whose spacing is over 2x (or under 1/2) the training spacing is "far"


def spacing_warning(file: str | Path, spacing: Sequence[float], training: Sequence[float] | None,
                    resampled: bool) -> dict[str, Any] | None:
    """A record (and its one-line message) when an input's spacing is far from the training spacing: some
    axis ratio input/training outside [1/SPACING_FAR, SPACING_FAR]. The model learnt structures at the training
    scale; resampling to it does not remove the shift either (a 3x upsampled image is blurred, a 3x
    downsampled one has lost detail). None when the spacings are close or the training spacing is unknown."""
    if not training:
        return None
    sp = [float(s) for s in spacing][: len(training)]
    tr = [float(t) for t in training][: len(sp)]
    ratios = [s / t if s > 0 and t > 0 else 1.0 for s, t in zip(sp, tr)]
    if all(1 / SPACING_FAR <= r <= SPACING_FAR for r in ratios):
        return None

    def fmt(v: Sequence[float]) -> str:
        return "x".join(f"{x:.3g}" for x in v)

    how = ("predict resamples it to the training spacing, itself a domain shift" if resampled
           else "it is not resampled, so the model sees structures at another scale")
    msg = (f"{Path(file).name}: spacing {fmt(sp)} mm is far from the training spacing {fmt(tr)} mm (ratio "
           f"{fmt(ratios)}; far = some axis outside x{1 / SPACING_FAR:g}..x{SPACING_FAR:g}); {how}")
    return {"file": str(file), "spacing": sp, "training_spacing": tr, "ratio": [round(r, 4) for r in ratios],
            "resampled": resampled, "warning": msg}


def predict_folder(run_dir: str | Path | Sequence[str | Path], images: str | Path, out: str | Path,
                   checkpoint: str = "best",
                   decoder: int | str | None = None, inference: str | None = None, force: bool = False,
                   device: str | None = None, normalize: str = "none",
                   sw_batch_size: int | None = None, out_device: str | None = None,
                   precision: str | None = None, preprocessed: bool = False,
                   save_probabilities: bool = False, nan_policy: str = "refuse", tta: bool | None = None,
                   blend: str | None = None) -> list[Path]:
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
    then a DataError lists the failed files. An input whose spacing is far from the training spacing
    (`spacing_warning`) is segmented with a one-line warning on stderr, recorded in predict.json
    `spacing_warnings`.
    `inference` "paper" (default) or "best" (mirroring, Gaussian windows and the run's recorded
    post-processing applied to the masks), or a mode (sliding | whole); `tta`/`blend` override the preset.
    `run_dir` may list several runs (an ensemble, e.g. the folds of a cross-validation): each is a `Member` with
    the same command options, `check_members` refuses runs that differ in classes, channels or preprocessing,
    `ensemble_probs` averages their softmax probabilities, and the post-processing applies only when every member
    chose the same (`ensemble_lcc_classes`). predict.json `members` lists each run, checkpoint and settings.
    """
    images, out = Path(images), Path(out)
    if not images.exists():
        raise DataError("image file or folder not found", images)
    if out.resolve() == images.resolve():
        raise ConfigError("--out must differ from --images (inputs are never overwritten)")
    if normalize not in ("none", "zscore"):
        raise ConfigError(f"normalize must be 'none' or 'zscore', got {normalize!r}")
    dev = resolve_device(device)
    run_dirs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(r) for r in run_dir]
    if not run_dirs:
        raise ConfigError("give at least one run folder")
    if len({r.resolve() for r in run_dirs}) != len(run_dirs):
        raise ConfigError("the same run is given twice; an ensemble lists each run once")
    members = [load_member(r, checkpoint, dev, inference=inference, decoder=decoder, precision=precision,
                           sw_batch_size=sw_batch_size, out_device=out_device, tta=tta, blend=blend) for r in run_dirs]
    check_members(members)
    run, settings = members[0].run, members[0].settings
    post_classes, post_source = ensemble_lcc_classes(members)
    if len(members) > 1 and any(m.settings.lcc_classes for m in members):
        err_console.print(f"note: ensemble post-processing: {post_source}", highlight=False, markup=False,
                          soft_wrap=True)
    dim = int(getattr(run.method, "dim", 3))
    skipped: list[str] = []  # label-looking files of an --images folder, not segmented
    if images.is_dir() and (images / "dataset.json").exists():
        ds = load_prepared(images)
        inputs = [(cid, [ds.image_path(cid)]) for cid in ds.case_ids]
        chain, steps = replay.Processing(normalize="none"), "none (a prepared folder)"
    else:
        inputs = replay.list_raw_inputs(images)
        if images.is_dir():  # reference masks kept beside their images (case_gt.nii.gz, case_seg.nrrd) are not images
            skipped = [files[0].name for _, files in inputs if len(files) == 1 and looks_like_label(files[0])]
            if skipped and len(skipped) == len(inputs):
                raise DataError(f"every file here is named like a label ({', '.join(skipped[:5])}: _seg, _label, "
                                "_labels, _mask or _gt); pass one of them as --images FILE to segment it anyway", images)
            if skipped:
                inputs = [(n, fs) for n, fs in inputs if fs[0].name not in skipped]
                console.print(f"note: skipped {len(skipped)} file(s) named like labels, not images: "
                              f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}", highlight=False,
                              markup=False, soft_wrap=True)
        if preprocessed:
            chain, steps = replay.Processing(normalize="none"), "none (--preprocessed)"
        else:
            recorded = run.dataset.spec.get("preprocessing") or []
            chain = replay.replay_processing(recorded, run.dataset.root / "dataset.json")
            steps = [s for s in recorded if s.get("step") not in replay.SOURCE_STEPS]
    identity = chain == replay.Processing(normalize="none")
    training_spacing = run.dataset.spec.get("spacing")  # the prepared cases' typical (median) spacing
    if dim != 3 and not identity:
        raise replay.ReplayError("replaying preprocessing is implemented for 3D data sets; pass --preprocessed "
                                 "with images prepared like the training data", run.dataset.root / "dataset.json")

    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"--nan-policy {nan_policy!r}: expected refuse or zero")
    prepare_output_dir(out, force=force, command="predict", inputs=run_dirs, sources=[images])

    written: list[Path] = []
    failed: dict[str, str] = {}
    far: dict[str, dict[str, Any]] = {}  # predict.json `spacing_warnings`, per output file
    with progress() as bar:
        task = bar.add_task("predict", total=len(inputs), info="")
        for name, files in inputs:
            bar.update(task, info=name)
            try:
                if identity and len(files) == 1 and files[0].name.lower().endswith(replay.NIFTI):
                    # nibabel keeps any affine exactly (SimpleITK refuses non-orthonormal ones)
                    inp, raw = read_input_image(files[0], dim, name=name), None
                    arr, in_spacing = inp.array, inp.spacing
                    arr, note = apply_nan_policy(arr, nan_policy, name, files[0])
                    if note:
                        console.print(f"[yellow]warning:[/] {note}", highlight=False)
                else:  # NaN/Inf are handled before the chain, as prep does
                    raw = replay.load_raw(name, files, chain, nan_policy=nan_policy)
                    arr, in_spacing = raw.array, raw.spacing
                    for note in raw.warnings:
                        console.print(f"[yellow]warning:[/] {note}", highlight=False)
                if normalize == "zscore":
                    arr = np.stack([zscore(c) for c in arr])
                probs = ensemble_probs(members, arr, dev)
            except TextsegError as exc:  # one bad file must not cost the others
                failed[name] = str(exc)
                bar.advance(task)
                continue
            mask = apply_lcc(probs_to_mask(probs), post_classes)
            target = child_path(out, replay.output_name(files[0], name))
            shift = spacing_warning(files[0], in_spacing, training_spacing, chain.target_spacing is not None)
            if shift is not None:
                err_console.print(f"warning: {shift['warning']}", highlight=False, markup=False, soft_wrap=True)
                far[target.name] = shift
            replay.write_like(target, mask if raw is None else raw.restore_mask(mask), files[0])
            if save_probabilities:
                p = probs.to(device="cpu", dtype=torch.float32).numpy()
                replay.write_like(child_path(out, replay.output_name(files[0], name, "_probs")),
                                  p if raw is None else raw.restore_probs(p), files[0], channels=True)
            written.append(target)
            bar.advance(task)
    listed = [{"run_dir": str(Path(m.run.run_dir).resolve()), "checkpoint": str(m.run.checkpoint_path),
               "checkpoint_rule": checkpoint_rule(getattr(m.run, "checkpoint_rule", checkpoint), m.run.checkpoint_path),
               "inference": m.settings.record()} for m in members]
    one = len(members) == 1
    atomic_write_json(out / "predict.json", {
        "run_dir": listed[0]["run_dir"] if one else [m["run_dir"] for m in listed],
        "checkpoint": listed[0]["checkpoint"] if one else [m["checkpoint"] for m in listed],
        "checkpoint_rule": listed[0]["checkpoint_rule"] if one else [m["checkpoint_rule"] for m in listed],
        "ensemble": None if one else {"members": len(members), "combine": "mean of the members' softmax probabilities",
                                      "postprocessing": {"lcc_classes": None if post_classes is None
                                                         else list(post_classes), "source": post_source}},
        "members": listed,
        "images": str(images.resolve()), "preprocessing": steps, "normalize": normalize,
        "probabilities": "<name>_probs: float32 softmax, classes on the last axis" if save_probabilities else None,
        "inference": settings.record(), "device": str(dev), "precision": settings.precision.name,
        "cases": [p.name for p in written], **({"spacing_warnings": far} if far else {}),
        **({"failed": failed} if failed else {}), **({"skipped_label_files": skipped} if skipped else {})})
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

"""Value checks a type system does not make: devices, learning rates, numeric method settings, patch sizes.

Each failure is a ConfigError naming the option or config key and what is allowed, raised before a run
folder is created (issue 14.11).
"""

from __future__ import annotations

from typing import Any

from textseg_cli.errors import ConfigError

MIN_PATCH = 16  # the 3D/2D backbones downsample 4 times; a smaller side cannot pass the bottleneck
MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 64 bits; numpy's generators any non-negative integer

# What a patch side must be a multiple of, per network (issue 25.5). The V-Net family (vnet, vnet_multi, MCF's
# resvnet34) and LViT's U-Net halve every side 4 times and add the skip connections without padding: a side that
# is not a multiple of 2**4 fails at the first skip ("The size of tensor a (2) must match ..."). The 2D U-Net and
# the 3D U-Net (URPC; LLM-SegNet's backbone_model unet3d) pad odd sizes on the way up, and TGC-Net resizes for
# CLIP: any side of at least MIN_PATCH.
PATCH_MULTIPLE = {"vnet": 16, "vnet_multi": 16, "resvnet34": 16, "lvit-unet": 16, "unet2d": 1, "unet3d": 1,
                  "tgcnet": 1}
_METHOD_NETWORK = {"urpc": "unet3d", "tgcnet": "tgcnet"}  # methods that build a fixed non-V-Net network


def network_of(cfg: dict[str, Any]) -> str:
    """The network a run trains, as its config names it (`method.model`, `method.backbone_model`), else the
    method's fixed one; the V-Net family by default (every other method)."""
    m = cfg.get("method") or {}
    return str(m.get("model") or m.get("backbone_model") or _METHOD_NETWORK.get(str(m.get("name"))) or "vnet")


def patch_multiple(cfg: dict[str, Any]) -> int:
    """What each patch side of this run's network must be a multiple of (16 for an unknown network)."""
    return PATCH_MULTIPLE.get(network_of(cfg), 16)


def check_run_config(cfg: dict[str, Any], reference: dict[str, Any]) -> None:
    """Refuse values of the right type but impossible, and numeric settings given as words.

    reference: the same method's config without the user's overrides (its types are the expected ones).
    """
    optim = cfg.get("optim", {})
    if not optim.get("lr", 1) > 0:
        raise ConfigError(f"optim.lr {optim.get('lr')!r}: expected a positive number")
    if optim.get("weight_decay", 0) < 0:
        raise ConfigError(f"optim.weight_decay {optim.get('weight_decay')!r}: expected ≥ 0")
    if not 0 <= optim.get("momentum", 0) < 1:
        raise ConfigError(f"optim.momentum {optim.get('momentum')!r}: expected 0 ≤ momentum < 1")
    _same_types(cfg.get("method", {}), reference.get("method", {}), "method")
    check_seed(cfg.get("seed"))
    for section in ("data", "inference"):
        patch = (cfg.get(section) or {}).get("patch_size") or []
        given = patch != ((reference.get(section) or {}).get("patch_size") or [])
        check_patch(patch, cfg, f"{section}.patch_size" if given or section == "inference"
                    else "the data set's patch_size (dataset.json; override with --set data.patch_size=...)")
    _check_batchnorm_bottleneck(cfg)


def _check_batchnorm_bottleneck(cfg: dict[str, Any]) -> None:
    """A V-Net with BatchNorm halves each side 4 times: a 16-voxel patch leaves one voxel per channel at the
    bottleneck, and with one image in a forward pass BatchNorm has a single value per channel and fails mid-run
    ("Expected more than 1 value per channel when training"). A batch of one image in all is refused before a run
    folder exists; a method that also forwards a single stream alone (a teacher on one unlabeled image) fails at
    its first step, which the engine reports the same way (engine/loop.py)."""
    m = cfg.get("method") or {}
    norm = str((m.get("backbone") or {}).get("normalization") or "")
    patch = (cfg.get("data") or {}).get("patch_size") or []
    tr = cfg.get("train") or {}
    if norm != "batchnorm" or patch_multiple(cfg) != 16 or not patch or any(v // 16 != 1 for v in patch):
        return
    if int(tr.get("batch_labeled") or 0) + int(tr.get("batch_unlabeled") or 0) == 1:  # one image per forward
        raise ConfigError(f"data.patch_size {list(patch)} leaves one voxel per channel at the {network_of(cfg)} "
                          "bottleneck, and BatchNorm cannot train on a single value per channel with a batch of 1 "
                          "(train.batch_labeled/batch_unlabeled); use a larger patch (e.g. a side of 32) or batches "
                          "of at least 2")


def check_seed(seed: Any, option: str = "--seed") -> None:
    """A seed is a whole number from 0 to 2**63-1 (numpy and torch refuse negative seeds mid-run)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{option} {seed!r}: expected a whole number from 0 to 2**63-1")


def check_patch(patch: Any, cfg: dict[str, Any], where: str = "data.patch_size") -> None:
    """Each side at least MIN_PATCH and a multiple of what the run's network needs (`patch_multiple`)."""
    if not patch:
        return
    sides = list(patch) if isinstance(patch, (list, tuple)) else [patch]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sides):
        raise ConfigError(f"{where} {sides!r}: expected whole numbers of voxels")
    net, k = network_of(cfg), patch_multiple(cfg)
    if min(sides) < MIN_PATCH:
        raise ConfigError(f"{where} {sides}: each side must be at least {MIN_PATCH} voxels "
                          "(the network downsamples 4 times)")
    bad = [v for v in sides if v % k]
    if bad:
        fix = [max(k, v // k * k) for v in sides]
        raise ConfigError(f"{where} {sides}: each side must be a multiple of {k} for {net} (it halves every side "
                          f"4 times), {', '.join(map(str, bad))} is not; e.g. {fix}")


def check_run_length(cfg: dict[str, Any], flag: int | None = None, option: str = "--iterations") -> None:
    """Refuse a run of no (or negative) length before a run folder exists (issue 25.6): 0 iterations would
    train nothing and still write an untrained model as checkpoints/last.pt.

    flag: the value of `option` (`--iterations`, an experiment file's `iterations:`) when given; it turns
    `train.epochs` off. Otherwise train.epochs when the config sets it, else train.iterations.
    """
    tr = cfg.get("train") or {}
    if flag is not None:
        key, value = option, flag
    elif tr.get("epochs") is not None:
        key, value = "train.epochs", tr["epochs"]
    else:
        key, value = "train.iterations", tr.get("iterations")
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise ConfigError(f"{key} {value!r}: expected a whole number of at least 1 (a run with no training step "
                          "would save an untrained model as checkpoints/last.pt)")


def _same_types(node: Any, ref: Any, where: str) -> None:
    if isinstance(ref, dict) and isinstance(node, dict):
        for k, v in node.items():
            if k in ref:
                _same_types(v, ref[k], f"{where}.{k}")
        return
    if isinstance(ref, bool) or ref is None:
        if isinstance(ref, bool) and not isinstance(node, bool):
            raise ConfigError(f"{where} {node!r}: expected true or false")
        return
    if isinstance(ref, (int, float)) and not (isinstance(node, (int, float)) and not isinstance(node, bool)):
        raise ConfigError(f"{where} {node!r}: expected {'an integer' if isinstance(ref, int) else 'a number'}")

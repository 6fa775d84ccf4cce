"""Text sources shared by the text-guided methods, and the "+Text" add-on (`textseg train --text tmr+csa`).

Text reaches training in one of two ways (config `method.text`):

- an embedding file written by `textseg encode` (`method.text.embeddings`, flag `--text-embeddings FILE`),
  loaded with `load_embeddings` and kept frozen; no text model is needed at train time;
- learnable CoOp prompts (Text-SemiSeg): 4 context vectors per class before the class name, over a
  frozen open_clip text tower run in fp32 (`method.text.clip_pretrained`, flag `--clip-pretrained`).

The add-on wraps any method whose networks have the V-Net encoder (UA-MT, DTC, MC-Net, ...) with
Text-SemiSeg's TMR (on the bottleneck, between encoder and decoder; EMA teachers get an EMA copy) and
CSA (a projection head on the fused bottleneck, pulled to the text features by the predictions). Its defaults
are the text-DTC network the official repository ships (taozh2017/Text-SemiSeg@18ceced model/MC_CLIP.py:583-609,
`VNet_DTC`: TMR on the bottleneck, a 256→512 1×1×1 projection head on the fused bottleneck) with the published
CSA (trainer.py:122-138) and L2-normalised F_t (model/CoOp.py:199); TMR keeps the paper's mechanism unless
`--tmr official`, as for Text-SemiSeg itself (docs/fidelity.md, "+Text").
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.text_losses import ProjectionHead, csa_loss
from textseg_cli.models.text_fusion import TMR, RepeatTextFusion, TMROfficial
from textseg_cli.models.vnet import VNetEncoder
from textseg_cli.models.vnet_fp import PerturbedVNet
from textseg_cli.text.coop import CoOpTextEncoder
from textseg_cli.text.embeddings import load_embeddings
from textseg_cli.text.encoders import load_open_clip
from textseg_cli.text.prompts import load_prompts

ENCODE_HINTS = {
    "clip": "textseg encode --encoder clip --dataset {dataset} --data PREPARED_DIR",
    "bert": "textseg describe ... && textseg encode --encoder bert --dataset {dataset} --descriptions FILE",
}

_CLIP_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}


def text_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    return dict(hp.get("text") or {})


def method_embeddings_and_meta(hp: dict[str, Any], method_label: str, encoder: str, dataset: str | None,
                               rows: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(frozen embedding matrix named by `method.text.embeddings`, its metadata); a clear error when it is missing."""

    path = text_hparams(hp).get("embeddings")
    if not path:
        what = "CLIP class-prompt embeddings (K×512)" if encoder == "clip" else "BERT description embeddings (N×D)"
        cmd = ENCODE_HINTS[encoder].format(dataset=dataset or "DATASET")
        raise ConfigError(f"{method_label} needs {what}: pass --text-embeddings FILE "
                          f"(or --set method.text.embeddings=FILE), produced by `{cmd}`")
    emb, meta = load_embeddings(path, encoder=encoder, rows=rows)
    return emb.float(), meta


def load_method_embeddings(hp: dict[str, Any], method_label: str, encoder: str, dataset: str | None,
                           rows: int | None = None) -> torch.Tensor:
    """The frozen embedding matrix named by `method.text.embeddings`; a clear error when it is missing."""
    return method_embeddings_and_meta(hp, method_label, encoder, dataset, rows)[0]


def cached_clip(model: str, pretrained: str | None):
    """(open_clip model, tokenizer), loaded once per process: the tower is frozen, so CoOp encoders may share it."""
    key = (model, str(pretrained))
    if key not in _CLIP_CACHE:
        clip, tokenizer, _ = load_open_clip(model, pretrained, "cpu")
        _CLIP_CACHE[key] = (clip, tokenizer)
    return _CLIP_CACHE[key]


def prompt_class_names(context: dict[str, Any], num_classes: int) -> list[str]:
    """Class names for prompts: the data set's prompt file ("left atrium"), else dataset.json's names."""
    names = None
    if context.get("dataset_name"):
        try:
            names = load_prompts(str(context["dataset_name"]).lower()).class_names
        except ConfigError:
            names = None
    if not names or len(names) != num_classes:
        names = [str(n).replace("_", " ") for n in (context.get("class_names") or [])]
    if len(names) != num_classes:
        names = ["background"] + [f"class {i}" for i in range(1, num_classes)]
    return names


class TextSource(nn.Module):
    """Text features F_t (K, D): learnable CoOp prompts (`coop`) or a frozen embedding matrix (`file`).

    Features are computed once per training step (call `reset()` at the start of the step; every network
    of the step reuses them) and cached in eval mode, where they do not change.
    """

    def __init__(self, kind: str, embeddings: torch.Tensor | None = None, class_names: list[str] | None = None,
                 clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai", n_ctx: int = 4,
                 init_std: float = 0.02, normalize: bool = False):
        super().__init__()
        self.kind = kind
        self.normalize = normalize  # L2 per row (Text-SemiSeg's PromptMaker, model/CoOp.py:199)
        self._cache: torch.Tensor | None = None
        if kind == "file":
            if embeddings is None:
                raise ConfigError("text source 'file' needs an embedding matrix")
            self.register_buffer("embeddings", embeddings.float().clone())
        elif kind == "coop":
            clip, tokenizer = cached_clip(clip_model, clip_pretrained)
            self.coop = CoOpTextEncoder(clip, tokenizer, list(class_names or []), n_ctx=n_ctx, init_std=init_std)
        else:
            raise ConfigError(f"method.text.source {kind!r}: expected coop, file or auto")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[-1]) if self.kind == "file" else int(self.coop.embed_dim)

    def reset(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def forward(self) -> torch.Tensor:
        if self.kind == "file":
            return F.normalize(self.embeddings, dim=-1) if self.normalize else self.embeddings
        if self._cache is None or (self.training and torch.is_grad_enabled() and not self._cache.requires_grad):
            out = self.coop().float()
            self._cache = F.normalize(out, dim=-1) if self.normalize else out
        return self._cache


def build_text_source(hp: dict[str, Any], context: dict[str, Any], num_classes: int, method_label: str,
                      default: str = "auto") -> TextSource:
    """`method.text.source`: coop (learnable prompts), file (`method.text.embeddings`) or auto (file when
    an embedding file is given, else coop)."""
    t = text_hparams(hp)
    kind = str(t.get("source") or default)
    normalize = bool(t.get("normalize", True))  # F_t / ||F_t|| per class as the official PromptMaker (CoOp.py:199)
    if kind == "auto":
        kind = "file" if t.get("embeddings") else "coop"
    if kind == "file":
        emb = load_method_embeddings(hp, method_label, "clip", context.get("dataset_name"), rows=num_classes)
        return TextSource("file", embeddings=emb, normalize=normalize)
    pretrained = t.get("clip_pretrained", "openai")
    return TextSource("coop", class_names=prompt_class_names(context, num_classes),
                      clip_model=str(t.get("clip_model", "ViT-B-32")),
                      clip_pretrained=None if pretrained in (None, "none", "None") else str(pretrained),
                      n_ctx=int(t.get("n_ctx", 4)), init_std=float(t.get("init_std", 0.02)), normalize=normalize)


def bottleneck_grid(patch_size: Any, levels: int = 4) -> tuple[int, ...]:
    """The V-Net bottleneck grid of a training patch (4 stride-2 stages: patch / 16)."""
    if not patch_size:
        raise ConfigError("--tmr official needs data.patch_size (its layer is sized to the bottleneck grid)")
    grid = tuple(int(p) // 2 ** levels for p in patch_size)
    if any(g < 1 for g in grid) or any(int(p) % 2 ** levels for p in patch_size):
        raise ConfigError(f"--tmr official: data.patch_size {list(patch_size)} must be multiples of {2 ** levels}")
    return grid


def build_fusion(kind: str, channels: int, text_dim: int, num_classes: int, tmr_mode: str = "paper",
                 heads: int = 8, patch_size: Any = None) -> nn.Module:
    """A bottleneck text-fusion module: Text-SemiSeg's TMR (the paper's reading, or the published layer with
    `tmr_mode="official"`) or VCLIPSeg-style replication ("repeat")."""
    if kind == "tmr" and tmr_mode == "official":
        return TMROfficial(channels, bottleneck_grid(patch_size), text_dim=text_dim, heads=heads)
    if kind == "tmr":
        return TMR(channels, text_dim, heads=heads)
    if kind == "repeat":
        return RepeatTextFusion(channels, text_dim, num_texts=num_classes)
    raise ConfigError(f"method.text_fusion {kind!r}: expected tmr or repeat")


def tmr_setting(hp: dict[str, Any]) -> str | None:
    """`method.tmr`: paper (default), official, or false/off (no bottleneck text fusion)."""
    v = hp.get("tmr", "paper")
    if v in (False, None, "false", "off", "none", "no"):
        return None
    if v is True:
        return "paper"
    if v not in ("paper", "official"):
        raise ConfigError(f"method.tmr {v!r}: expected paper, official or false")
    return str(v)


def logits_to_probs(out: Any, num_classes: int, activation: str = "softmax") -> list[torch.Tensor]:
    """A network output as a list of class-probability maps: a list (one per decoder), a (seg, aux) tuple
    (DTC) or one logits tensor. activation="softmax" over the K channels; "sigmoid" of each channel (the published
    CSA, trainer.py:118-119). K−1 channels (DTC's sigmoid head) become K classes as softmax([0, z]), which is
    [1 − σ(z), σ(z)] for two classes, with either activation."""
    if isinstance(out, tuple):  # (seg, aux) or (per-decoder logits, per-decoder features)
        outs = list(out[0]) if isinstance(out[0], list) else [out[0]]
    elif isinstance(out, list):
        outs = list(out)
    else:
        outs = [out]
    probs = []
    for o in outs:
        o = o.float()
        if o.shape[1] == num_classes - 1:
            o = torch.cat([torch.zeros_like(o[:, :1]), o], dim=1)
            probs.append(torch.softmax(o, dim=1))
        else:
            probs.append(torch.sigmoid(o) if activation == "sigmoid" else torch.softmax(o, dim=1))
    return probs


# The published CSA (Text-SemiSeg trainer.py:122-138) is the add-on's default; every key is `method.csa.KEY`.
# The add-on's former reading is activation=softmax, resize=avgpool, class_reduction=sum, feature_norm=none
# together with method.text.normalize=false.
CSA_DEFAULTS: dict[str, Any] = {"weight": 1.0, "activation": "sigmoid", "resize": "trilinear", "pool": "mean",
                                "channel_reduction": "mean", "class_reduction": "mean", "feature_norm": "official"}
CSA_CHOICES = {"activation": ("sigmoid", "softmax"), "resize": ("trilinear", "avgpool"), "pool": ("mean", "masked"),
               "channel_reduction": ("mean", "sum"), "class_reduction": ("mean", "sum"),
               "feature_norm": ("official", "channel", "none")}


def csa_settings(hp: dict[str, Any]) -> dict[str, Any]:
    """`method.csa` of a method wrapped by the add-on, over CSA_DEFAULTS; a ConfigError names a bad value."""
    given = hp.get("csa")
    out = {**CSA_DEFAULTS, **(given if isinstance(given, dict) else {})}
    for key, choices in CSA_CHOICES.items():
        if out[key] not in choices:
            raise ConfigError(f"method.csa.{key} {out[key]!r}: expected one of {', '.join(choices)}")
    out["weight"] = float(out["weight"])
    return out


def csa_feature_norm(feats: torch.Tensor, mode: str) -> torch.Tensor:
    """The projected features before CSA: "official" divides by their norm over dim −1, the LAST SPATIAL axis, as
    the published code does (trainer.py:123); "channel" L2-normalises the D channels; "none" leaves them."""
    if mode == "official":
        return feats / feats.norm(dim=-1, keepdim=True)
    if mode == "channel":
        return F.normalize(feats, dim=1)
    return feats


# ---------------------------------------------------------------------------------------------------
# "+Text": TMR + CSA for methods with a V-Net encoder

ADDON_PARTS = ("tmr", "csa")


def parse_addon(spec: str) -> set[str]:
    parts = {p.strip().lower() for p in str(spec).replace(",", "+").split("+") if p.strip()}
    bad = parts - set(ADDON_PARTS)
    if not parts or bad:
        raise ConfigError(f"--text {spec!r}: expected a '+'-separated subset of {', '.join(ADDON_PARTS)}, "
                          "e.g. tmr+csa")
    return parts


class TextEncoder(nn.Module):
    """A V-Net encoder whose bottleneck passes a text-fusion module; records the fused bottleneck of
    gradient-carrying forwards while `recording` (for CSA)."""
    def __init__(self, inner: nn.Module, fusion: nn.Module | None, text_fn: Callable[[], torch.Tensor]):
        super().__init__()
        self.inner = inner
        self.fusion = fusion
        self.channels = getattr(inner, "channels", None)
        self._text_fn = [text_fn]  # a list: the text source belongs to the method, not to this module
        self.recording = False
        self.record_here = True  # False: the add-on records the bottleneck where the decoder reads it
        self.records: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = list(self.inner(x))
        x5 = feats[-1]
        if self.fusion is not None:
            x5 = self.fusion(x5, self._text_fn[0]())
        if self.recording and self.record_here and torch.is_grad_enabled():
            self.records.append(x5)
        return [*feats[:-1], x5]


def _vnet_networks(method: Method) -> tuple[list[nn.Module], list[nn.Module]]:
    """(students, teachers): the method's child networks with a V-Net encoder; teachers take no gradient."""
    students, teachers = [], []
    for _, child in method.named_children():
        enc = getattr(child, "encoder", None)
        if isinstance(enc, VNetEncoder):
            (students if any(p.requires_grad for p in child.parameters()) else teachers).append(child)
    return students, teachers


class TextAddon(Method):
    """Wraps a built method: TMR on each V-Net bottleneck and/or CSA added to its loss (`--text tmr+csa`)."""

    official_code = "taozh2017/Text-SemiSeg (model/MC_CLIP.py:583-609 VNet_DTC, trainer.py:122-138 CSA)"
    official_commit = "18ceced"
    ledger = "docs/fidelity.md#text-add-on-text_addon"

    def __init__(self, base: Method, spec: str):
        super().__init__(base.cfg, base.in_channels, base.num_classes, base.dim, **base.context)
        self.parts = parse_addon(spec)
        name = (base.cfg.get("method") or {}).get("name", type(base).__name__)
        if base.dim != 3:
            raise ConfigError(f"--text {spec}: the text add-on needs 3D data (TMR works on volumes)")
        students, teachers = _vnet_networks(base)
        if not students:
            raise ConfigError(f"--text {spec}: method '{name}' has no V-Net encoder to enhance "
                              "(supported: methods built on the V-Net, e.g. uamt, dtc, mcnet)")
        if teachers and len(teachers) != len(students) and len(students) != 1:  # one student: every teacher
            raise ConfigError(f"--text {spec}: cannot pair the {len(teachers)} teacher(s) of '{name}' with its "
                              f"{len(students)} student network(s)")
        self.needs_unlabeled = base.needs_unlabeled
        self.paper = f"{base.paper} + Text (TMR/CSA of Text-SemiSeg)"
        hp = base.hparams
        self.base = base
        self.text = build_text_source(hp, base.context, base.num_classes, f"--text {spec}", default="auto")
        channels = int(students[0].encoder.channels[-1])
        mode = tmr_setting(hp) or "paper"
        self.students = students
        for i, s in enumerate(students):
            fusion = build_fusion("tmr", channels, self.text.dim, base.num_classes, mode,
                                  patch_size=base.patch_size()) if "tmr" in self.parts else None
            s.encoder = TextEncoder(s.encoder, fusion, self.text)
            for t in (teachers if len(students) == 1 else teachers[i:i + 1]):  # AD-MT: two teachers of one student
                t_fusion = copy.deepcopy(fusion)
                if t_fusion is not None:
                    t_fusion.requires_grad_(False)
                t.encoder = TextEncoder(t.encoder, t_fusion, self._frozen_text)
        self.csa_heads = nn.ModuleList(ProjectionHead(channels, self.text.dim) for _ in students) \
            if "csa" in self.parts else None
        self.csa = csa_settings(hp) if self.csa_heads is not None else None
        self._outputs: list[list[Any]] = [[] for _ in students]
        for i, s in enumerate(students):
            if isinstance(s, PerturbedVNet):
                # CrossMatch's `net([x, u], need_fp=True)` decodes the bottlenecks [x, u, weak(u), strong(u)] (dropout
                # copies made after the encoder) and returns a tuple of logits: CSA pairs what the decoder reads with
                # what it writes, on the plain and on the feature-perturbed forwards alike
                s.encoder.record_here = False
                s.decoder.register_forward_pre_hook(self._make_decoder_input_hook(s))
                s.decoder.register_forward_hook(self._make_hook(i, s))
            else:
                s.register_forward_hook(self._make_hook(i, s))

    def _frozen_text(self) -> torch.Tensor:
        return self.text().detach()

    def _make_hook(self, i: int, net: nn.Module):
        def hook(module, inputs, output):
            if net.encoder.recording and torch.is_grad_enabled():
                self._outputs[i].append(output)
        return hook

    @staticmethod
    def _make_decoder_input_hook(net: nn.Module):
        def hook(module, inputs):
            if net.encoder.recording and torch.is_grad_enabled():
                net.encoder.records.append(inputs[0][-1])  # the (fused, maybe perturbed) bottleneck it decodes
        return hook

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        self.text.reset()
        for i, s in enumerate(self.students):
            s.encoder.records.clear()
            self._outputs[i].clear()
            s.encoder.recording = self.csa_heads is not None
        try:
            out = self.base.training_step(batch, ctx)
        finally:
            for s in self.students:
                s.encoder.recording = False
        if self.csa_heads is not None:
            c = self.csa
            text = self.text()
            total = None
            for i, s in enumerate(self.students):
                for x5, o in zip(s.encoder.records, self._outputs[i]):
                    feats = csa_feature_norm(self.csa_heads[i](x5.float()), c["feature_norm"])
                    term = csa_loss(feats, logits_to_probs(o, self.num_classes, c["activation"]), text,
                                    pool=c["pool"], channel_reduction=c["channel_reduction"],
                                    class_reduction=c["class_reduction"], resize=c["resize"])
                    total = term if total is None else total + term
                s.encoder.records.clear()
                self._outputs[i].clear()
            if total is not None:
                out["loss"] = out["loss"] + c["weight"] * total
                out["loss_csa"] = total.detach()
        return out

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        self.base.on_after_optimizer_step(ctx)

    def label_targets(self, label: Any) -> dict[str, Any] | None:
        return self.base.label_targets(label)

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        return self.base.predict_logits(x, decoder)

    def predict_proba(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        return self.base.predict_proba(x, decoder)

    def networks(self) -> dict[str, nn.Module]:
        nets = dict(self.base.networks())
        if self.csa_heads is not None:
            nets["csa_heads"] = self.csa_heads
        nets["text"] = self.text
        return nets


def with_text_addon(method: Method, spec: str | None) -> Method:
    """`method` wrapped by the text add-on when `spec` (config `method.text_addon`) is set."""
    if not spec or str(spec).lower() in ("none", "false", "off"):
        return method
    if isinstance(method, TextAddon) or getattr(method, "has_text", False):
        raise ConfigError(f"--text {spec}: method '{method.name}' is already text-guided")
    return TextAddon(method, str(spec))

"""Trajectory parity (issue 26) of the text-guided methods VCLIPSeg and Text-SemiSeg: textseg's real training loop
(the engine's `Trainer`, built from the config `textseg train --method M` resolves on LA, run by `Trainer.run`)
against the official training script's own loop (its source executed, see _trajectory.py), fed the same batches,
the same frozen text features and the same noise/dropout draws, in float64 on CPU, compared after EVERY iteration:
every weight and buffer, the SGD momentum buffers, the lr and the logged loss terms, within rtol 1e-9 / atol 1e-12,
in lock step (`_trajectory.lockstep`; why, see test_trajectory_parity.py's docstring).

Set identically on both sides, and only these: patch 16×16×16, batch 2 + 2, the number of iterations, the V-Net
width n_filters 4, and the lengths named below (each asserted unscaled against the official source and the
shipped config). The official networks hard-code the published width in a few layers (VCLIPSeg's VWPM: 256 =
16 · n_filters channels; Text-SemiSeg's `attn_x5`/`projection_head`: 256 channels and a 6³ bottleneck grid); those
literals are edited to 16 · 4 channels and the 1³ grid of a 16³ patch (`module_edits`, each required to occur).
The text: one seeded random tensor shaped as the official input, on both sides (VCLIPSeg: the raw, un-normalised
CLIP rows of `clip_embedding/la_txt_encoding.pth`, K × 512; Text-SemiSeg: its default text source's output, the
L2-normalised K × 512 rows CoOp.py:199 returns, textseg reading the same rows from a frozen embedding file and the
official PromptMaker replaced by a stand-in returning them; the CLIP tower is never loaded).

Presets (experiments/presets.py): `train.precision=fp32` (PRESET_SETS, also in RUN_SETS) for both, and for
Text-SemiSeg `method.tmr=official`, the published TMR layer the paper-table presets use (textseg's default TMR is a
documented interpretation with no official counterpart). Everything else comes from each side's own defaults.

- VCLIPSeg (code/train_3d.py with train.sh's `--scale_factor 0.0625 --sim_w 0.5`), VC_K = 50 iterations: the
  ramp divisor 150 is scaled to VC_PER = 1 on both sides (ramp of length 40 complete at iteration 40). At a
  16×16×32 patch the VTCM grid is 1×1×2 voxels per sample, so most steps have a class with no agreeing voxel: the official prototype of
  that class is NaN (its loss value is NaN) but its gradient is finite, 1/K of each present class's; the test
  counts such steps, requires both kinds (all classes present / one absent) to occur, and compares the official
  value with the absent class counted as cosine 0 (textseg's `vtcm_absent: official`, docs/fidelity.md).
- Text-SemiSeg (train.py + trainer.py, default data set /Pancreas: the script trains no LA), TS_K = 40: the ramp
  divisor 150 scaled to TS_PER = 1 (t = 0..39 climbs the ramp) and the DCA start 6,000 scaled to TS_DCA = 20 on
  both sides, so iterations 1..21 run without DCA and 22..40 with it (the switch is at 0-based t > TS_DCA); the
  linear lr decays over TS_K on both sides.

Written against VCLIPSeg@fe50145, Text-SemiSeg@18ceced.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _trajectory import _module, _Null, lockstep, make_batches, shipped_config, tiny_dataset
from parity_helpers import official_commit
from test_text_semiseg_parity import official_to_textseg as semiseg_name
from test_vclipseg_parity import official_to_textseg as vclipseg_name
from textseg_cli.data.batch import Batch
from textseg_cli.text.embeddings import save_embeddings

PATCH = (16, 16, 16)
WIDTH = 4
RTOL, ATOL = 1e-9, 1e-12
SEED = 7  # of the shared noise/dropout generators
P = "{}, {}, {}".format(*PATCH)
GRID = [p // 16 for p in PATCH]  # the V-Net bottleneck of the patch

VC_K = 50
VC_PATCH = (16, 16, 32)  # a 1 × 1 × 2 bottleneck: VTCM's L2 over the last axis of length 1 would have no gradient
VC_PER = 1  # the scaled ramp divisor (both sides; unscaled 150): the ramp of length 40 is complete at iteration 40
TS_K = 40  # no EMA; K covers each phase: 21 steps before the DCA switch, 19 after, the lr decay and ramp throughout
TS_PER = 1  # the scaled ramp divisor (both sides; unscaled 150)
TS_DCA = 20  # the scaled DCA start (both sides; unscaled 6,000)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _sets(patch: tuple[int, int, int]) -> list[str]:
    return ["data.patch_size={},{},{}".format(*patch), "train.batch_labeled=2", "train.batch_unlabeled=2",
            f"method.backbone.n_filters={WIDTH}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("trajectory_text") / "prepared", PATCH)


@pytest.fixture(scope="module")
def vc_data_dir(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("trajectory_vclipseg") / "prepared", VC_PATCH)


def _argparse_default(src: str, flag: str) -> str:
    start = src.index(f"'--{flag}'")
    tail = src[start:src.index(")", start)]
    return tail.split("default=")[1].split(",")[0].strip()


class _Nets(nn.Module):
    """textseg's trained modules of a method under their own names, without its frozen text buffer (the official
    networks keep the text outside their state dict)."""

    def __init__(self, method: nn.Module, names: tuple[str, ...]):
        super().__init__()
        for n in names:
            setattr(self, n, getattr(method, n))


class _OfficialNames:
    """textseg's modules `names` of a method seen under the official state-dict names, in the official order, for
    lockstep (its state_dict / named_parameters / load_state_dict): the official names map to textseg's through the
    documented mapping of the one-step parity test (`to_textseg`), and loading is strict, so every textseg entry
    has exactly one official counterpart (Text-SemiSeg renames leaves, e.g. positional_encoding_Axial → pos.axial,
    which lockstep's pairing by order and leaf name would refuse)."""

    def __init__(self, method: nn.Module, names: tuple[str, ...], official_keys: list[str], to_textseg):
        self.w = _Nets(method, names)
        self.keys = {k: to_textseg(k) for k in official_keys}

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.w.state_dict()
        return {k: sd[t] for k, t in self.keys.items()}

    def named_parameters(self):
        params = dict(self.w.named_parameters())
        return [(k, params[t]) for k, t in self.keys.items() if t in params]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.w.load_state_dict({self.keys[k]: v for k, v in state.items()}, strict=True)


def _textseg_side(names: tuple[str, ...], to_textseg, skip: tuple[str, ...]):
    """(note_official, textseg_nets) for lockstep: note_official(official network) records its state-dict names
    (less the `skip` prefixes) when official_parts first sees it, textseg_nets then shows textseg's modules under
    those names (`_OfficialNames`)."""
    keys: list[str] = []

    def note_official(net: nn.Module) -> nn.Module:
        if not keys:
            keys.extend(k for k in net.state_dict() if not k.startswith(skip))
        return net

    def nets(method):
        return {"net": _OfficialNames(method, names, keys, to_textseg)}

    return note_official, nets


def _run(repo: str, official_dir: Path, tmp_path: Path, data_dir: Path, record_property, batches: list[Batch],
         **kw) -> None:
    record_property("commit", official_commit(official_dir, repo))
    t0, c0 = time.perf_counter(), time.process_time()
    bad, trainer = lockstep(cwd=tmp_path / "code", data_dir=data_dir, run_dir=tmp_path / "run", batches=batches,
                            seed=SEED, rtol=RTOL, atol=ATOL, **kw)
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("cpu_seconds", round(time.process_time() - c0, 1))
    print(f"{kw['method']}: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU")
    assert trainer.iteration == len(batches)
    assert not bad, f"{len(bad)} mismatches, first:\n" + "\n".join(bad[:20])


# --- VCLIPSeg -------------------------------------------------------------------------------------------------


def _vclip_check_unscaled(src: str) -> None:
    """The ramp this test scales (the literal iter_num//150, the --consistency_rampup default) and the weights
    train.sh sets, against the shipped config."""
    m = shipped_config("vclipseg")["method"]
    assert "get_current_consistency_weight(iter_num//150)" in src and m["consistency"]["per"] == 150
    assert float(_argparse_default(src, "consistency_rampup")) == m["consistency"]["rampup"]
    assert float(_argparse_default(src, "consistency")) == m["consistency"]["weight"]
    assert float(_argparse_default(src, "lamda")) == m["sup_weight"]


def _vtcm_batches(n: int) -> list[Batch]:
    """`make_batches` of VC_PATCH whose labeled foreground is the slab z ≥ z0, z0 drawn in [1, 16]: the two VTCM
    grid voxels of a labeled sample read its label at z = 0 (background) and z = 16 (foreground), so both classes
    are on the grid and whether each has an agreeing voxel is up to the decoders."""
    out = make_batches(n, VC_PATCH, 2, 2)
    g = torch.Generator().manual_seed(1)
    for b in out:
        b.label_l.zero_()
        for i in range(b.label_l.shape[0]):
            b.label_l[i, :, :, int(torch.randint(1, 17, (1,), generator=g)):] = 1
        b.image_l.copy_(b.label_l[:, None].double() + 0.5 * torch.randn(b.image_l.shape, generator=g,
                                                                         dtype=torch.float64))
    return out


def test_vclipseg_trajectory(official_dir, vc_data_dir, tmp_path, float64, record_property):
    """VCLIPSeg: VWPM on the bottleneck, two decoders, DLB hard pseudo-labels on the whole batch with CE + Dice,
    0.5 · Σ foreground Dice on the labeled half, the VTCM regulariser 0.5 · (1 − mean_k cos) with ONE prototype
    per class from both heads, the ramped weight, constant lr."""
    script = official_dir / "VCLIPSeg" / "code" / "train_3d.py"
    src = script.read_text(encoding="utf-8")
    _vclip_check_unscaled(src)
    train_sh = (official_dir / "VCLIPSeg" / "train.sh").read_text(encoding="utf-8")
    assert "--sim_w 0.5 --scale_factor 0.0625" in train_sh
    assert shipped_config("vclipseg")["method"]["reg_weight"] == 0.5
    code = tmp_path / "code"
    (code / "clip_embedding").mkdir(parents=True)
    emb = torch.randn(2, 512, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.4  # raw rows
    torch.save(emb, code / "clip_embedding" / "la_txt_encoding.pth")
    path = save_embeddings(tmp_path / "clip.safetensors", {"embeddings": emb},
                           {"encoder": "clip", "normalized": False,
                            "texts": ["A pixel of a Background.", "A pixel of a Left Atrial."]})
    absent: dict[int, int] = {}  # iteration → classes without an agreeing voxel (official prototype NaN)

    def parts(g):
        terms = {n: g[n] for n in ("loss", "loss_seg_dice", "loss_consist", "loss_sim", "consistency_weight")
                 if n in g}
        if "loss_sim" in g:
            cos = F.cosine_similarity(torch.cat(g["fea_mean"]), g["txt_emb"])
            missing = torch.isnan(cos)
            absent[g["iter_num"]] = int(missing.sum())
            if missing.any():  # the official value is NaN; its gradient counts each present class 1/K
                assert math.isnan(float(g["loss_sim"]))
                terms["loss_sim"] = 1 - cos[~missing].sum() / cos.numel()
                args = g["args"]
                terms["loss"] = (args.lamda * g["loss_seg_dice"] + g["consistency_weight"] * g["loss_consist"]
                                 + args.sim_w * terms["loss_sim"])
        return {"net": note(g["model"])}, g["optimizer"], terms

    def multi_epochs_loader(*a, **k):  # the script's MultiEpochsDataLoader: its (stubbed) DataLoader
        return sys._getframe(1).f_globals["DataLoader"](*a, **k)

    stubs = {"dataloaders.dataset": _module("dataloaders.dataset", LAHeart=_Null, Pancreas=_Null,
                                            RandomRotFlip=_Null, RandomCrop=_Null, ToTensor=_Null,
                                            TwoStreamBatchSampler=_Null, MultiEpochsDataLoader=multi_epochs_loader)}
    skip = ("decoder1.proj_header.mlp2.", "decoder2.proj_header.mlp2.")  # an alias of proj_header.proj
    note, nets = _textseg_side(("net", "vwpm", "vtcm_heads"), vclipseg_name, skip)
    n16 = WIDTH * 16
    _run("VCLIPSeg", official_dir, tmp_path, vc_data_dir, record_property, _vtcm_batches(VC_K), script=script,
         method="vclipseg",
         argv=["--max_iteration", str(VC_K), "--model", "vclipseg", "--temperature", "0.1", "--sim_w", "0.5",
               "--scale_factor", "0.0625"],
         sets=[*_sets(VC_PATCH), f"method.consistency.per={VC_PER}", f"method.vtcm_hidden={n16}",
               f"method.text.embeddings={path}"],
         official_parts=parts, textseg_nets=nets, skip=skip,
         term_map={"loss": "loss", "loss_seg_dice": "loss_dice", "loss_consist": "loss_unsup",
                   "loss_sim": "loss_vtcm", "consistency_weight": "consistency_weight"},
         stubs=stubs,
         module_edits={"networks.VNet_clip": [
             ("n_filters=16, normalization='none', has_dropout=False, has_residual=False, txt_emb=None):",
              f"n_filters={WIDTH}, normalization='none', has_dropout=False, has_residual=False, txt_emb=None):"),
             ("self.txt2vis = nn.Linear(512, 256)", f"self.txt2vis = nn.Linear(512, {n16})"),
             ("self.en_fea_conv = Conv_BN_Block(256, 64)", f"self.en_fea_conv = Conv_BN_Block({n16}, 64)"),
             ("self.fusion_conv = Conv_BN_Block(512, 256)", f"self.fusion_conv = Conv_BN_Block({2 * n16}, {n16})")]},
         edits=[("patch_size = (112, 112, 80)", "patch_size = ({}, {}, {})".format(*VC_PATCH)),
                ("get_current_consistency_weight(iter_num//150)",
                 f"get_current_consistency_weight(iter_num//{VC_PER})")])
    counts = [absent[i] for i in range(1, VC_K + 1)]
    print(f"vclipseg: steps with 0/1/2 classes absent from the VTCM: {[counts.count(n) for n in range(3)]}")
    assert 0 in counts and 1 in counts, "both cases (all classes present, one absent) must occur"


# --- Text-SemiSeg ---------------------------------------------------------------------------------------------


def _semiseg_check_unscaled(train_src: str, trainer_src: str) -> None:
    """What this test scales, unscaled: the ramp (the literal iter_num // 150, --consistency_rampup, --consistency)
    and the DCA start (--mixed_iterations, `iter_num > mixed_iterations`) against the shipped config; the 0-based
    linear lr against the shipped schedule."""
    m = shipped_config("text-semiseg")
    hp = m["method"]
    assert "self.get_current_consistency_weight(iter_num // 150)" in trainer_src and hp["consistency"]["per"] == 150
    assert float(_argparse_default(train_src, "consistency_rampup")) == hp["consistency"]["rampup"]
    assert float(_argparse_default(train_src, "consistency")) == hp["consistency"]["weight"]
    assert "if iter_num > self.args.mixed_iterations:" in trainer_src
    assert int(_argparse_default(train_src, "mixed_iterations")) == hp["dca_start"] == 6000
    assert int(_argparse_default(train_src, "max_iterations")) == m["train"]["iterations"]
    assert "lr_ = self.args.base_lr * (1.0 - iter_num / self.args.max_iterations)" in trainer_src
    assert m["optim"]["schedule"] == "linear" and m["optim"]["step_offset"] == 1


class _PromptStandIn(nn.Module):
    """The official PromptMaker (model/CoOp.py), standing in: the frozen rows its forward returns (L2-normalised
    per class, CoOp.py:199) instead of learnable prompts through the CLIP tower."""

    rows: torch.Tensor

    def __init__(self, *a, **k):
        super().__init__()

    def forward(self):
        return F.normalize(self.rows, dim=-1)


def test_text_semiseg_trajectory(official_dir, data_dir, tmp_path, float64, record_property, monkeypatch):
    """Text-SemiSeg with the published TMR (`method.tmr=official`): MC-Net's two decoders with one TMR layer and
    one CSA projection head each, CE + Dice on sigmoid(logits) on the labeled half, the CSA loss of both decoders,
    the cross pseudo-supervision (softmax ≥ 0.5 + largest component) with the ramped weight, then (t > TS_DCA) the
    DCA copy-paste with the better decoder's pseudo-labels training the other decoder and CSA on the mixed batch;
    SGD with the linear lr. The official loss terms are the locals of its Trainer.train at `loss.backward()`."""
    repo = official_dir / "Text-SemiSeg"
    train_src = (repo / "train.py").read_text(encoding="utf-8")
    trainer_src = (repo / "trainer.py").read_text(encoding="utf-8")
    _semiseg_check_unscaled(train_src, trainer_src)
    (tmp_path / "code").mkdir()
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 512, generator=g, dtype=torch.float64)
    _PromptStandIn.rows = raw
    path = save_embeddings(tmp_path / "clip.safetensors", {"embeddings": raw},
                           {"encoder": "clip", "texts": ["background", "pancreas"]})

    terms: dict[str, torch.Tensor] = {}
    trainer_file = str(repo / "trainer.py")
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):  # the official step's loss terms, read from its frame
        frame = sys._getframe(1)
        if frame.f_code.co_filename == trainer_file and frame.f_code.co_name == "train":
            terms.clear()
            terms.update({n: frame.f_locals[n] for n in ("loss", "sup_loss", "cog_loss", "cons_loss",
                                                         "consistency_weight", "mixed_sup_loss", "mixed_cog_loss")
                          if n in frame.f_locals})
        return orig_backward(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    # what trainer.py imports from the outside world (it is imported by the script, so the script's stubs do not
    # reach it): OpenCV (unused), the test-time metrics, the CLIP loader and the prompt learner
    for name, mod in {"cv2": _module("cv2"), "prediction": _module("prediction", test_calculate_metric=_Null()),
                      "model.CLIP.clip": _module("model.CLIP.clip", clip=_module("clip", load=lambda *a, **k: (None,
                                                                                                             None))),
                      "model.CoOp": _module("model.CoOp", PromptMaker=_PromptStandIn)}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    def parts(ns):
        t = ns["trainer"]
        return {"net": note(t.model)}, t.optimizer, dict(terms)

    def term_map(k):
        m = {"loss": "loss", "sup_loss": "loss_sup", "cog_loss": "loss_csa", "cons_loss": "loss_consistency",
             "consistency_weight": "consistency_weight"}
        if k - 1 > TS_DCA:  # step k has 0-based iteration k − 1
            m.update(mixed_sup_loss="loss_dca", mixed_cog_loss="loss_csa_mixed")
        return m

    stubs = {"dataloader.dataset": _module("dataloader.dataset", build_Dataset=lambda *a, **k: [None] * 4),
             "dataloader.TwoStreamBatchSampler": _module("dataloader.TwoStreamBatchSampler",
                                                         TwoStreamBatchSampler=_Null),
             "utils.utils": _module("utils.utils", patients_to_slices=lambda *a, **k: 2),
             "utils.transforms": _module("utils.transforms", RandomRotFlip=_Null, RandomCrop=_Null, ToTensor=_Null),
             "shutil": _module("shutil", copyfile=_Null(), copytree=_Null(), rmtree=_Null())}
    n16 = WIDTH * 16
    # attn_x5.conv and the CA temperature: never called in the official forward, no textseg counterpart
    unused = tuple(f"decoder{d}.attn_x5.{n}" for d in (1, 2) for n in ("conv.", "img_txt_attn.temperature"))
    note, nets = _textseg_side(("net", "fusions", "csa_heads"), semiseg_name, unused)
    _run("Text-SemiSeg", official_dir, tmp_path, data_dir, record_property, make_batches(TS_K, PATCH, 2, 2),
         script=repo / "train.py",
         method="text-semiseg",
         argv=["--max_iterations", str(TS_K), "--mixed_iterations", str(TS_DCA), "--device", "cpu"],
         sets=[*_sets(PATCH), "method.tmr=official", f"method.consistency.per={TS_PER}", f"method.dca_start={TS_DCA}",
               f"method.text.embeddings={path}"],
         official_parts=parts, textseg_nets=nets, term_map=term_map, skip=unused,
         stubs=stubs,
         module_edits={
             "model.MC_CLIP": [
                 ("def __init__(self, args, n_channels=1, n_classes=2, n_filters=16, normalization='batchnorm', "
                  "has_dropout=True, has_residual=False):\n        super(MC_Clip_3D",
                  f"def __init__(self, args, n_channels=1, n_classes=2, n_filters={WIDTH}, normalization='batchnorm', "
                  "has_dropout=True, has_residual=False):\n        super(MC_Clip_3D"),
                 ("CA_TransformerDecoderLayer(input_size=[6, 6, 6], in_channels=256, d_model=512, "
                  "patch_size=[6, 6, 6])",
                  f"CA_TransformerDecoderLayer(input_size={GRID}, in_channels={n16}, d_model=512, patch_size={GRID})"),
                 ("self.projection_head = nn.Conv3d(in_channels=256, out_channels=512",
                  f"self.projection_head = nn.Conv3d(in_channels={n16}, out_channels=512")],
             "trainer": [("self.get_current_consistency_weight(iter_num // 150)",
                          f"self.get_current_consistency_weight(iter_num // {TS_PER})")]})

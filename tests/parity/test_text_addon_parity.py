"""The "+Text" add-on (`--text tmr+csa`) on DTC against the text-DTC network the official Text-SemiSeg ships.

Written against taozh2017/Text-SemiSeg@18ceced684b84b1ac2d5f0b6905951292a81e71a (`model/MC_CLIP.py:583-609`,
`VNet_DTC`: the MC_CLIP encoder, `Decoder_DTC` with the TMR layer `attn_x5` on the bottleneck and a 256→512 1×1×1
`projection_head` on the fused bottleneck, heads `out_conv` (tanh, the SDF) and `out_conv2` (segmentation)) and
HiLab-git/DTC@2525b9c (its training step). Run with `TEXTSEG_OFFICIAL=DIR pytest -m parity
tests/parity/test_text_addon_parity.py`.

The repository has no training script for `VNet_DTC`, so the official step is DTC's own (train_la_dtc.py:172-189,
restated as in test_loss_parity.py, with DTC's `utils.losses`/`utils.util`/`utils.ramps`) plus the CSA term of
Text-SemiSeg's trainer (trainer.py:122-138, restated below) with `cog_weight` 1 and
the L2-normalised text of its PromptMaker (model/CoOp.py:199). DTC has one sigmoid channel (`n_classes=1`, as DTC's
own network); the two class maps CSA needs are [1 − σ(z), σ(z)] (the sigmoid of the two-channel MC-Net output in the
trainer; textseg's reading for DTC, docs/fidelity.md "+Text").

Name mapping official → textseg: `encoder.B.conv.i.*` → `base.net.encoder.inner.B.i.*`, `decoder.B.conv.i.*` →
`base.net.decoder.B.i.*`, `out_conv2` → `base.net.decoder.out_conv`, `out_conv` → `base.net.sdf_head`,
`decoder.projection_head` → `csa_heads.0.net`, `decoder.attn_x5.*` → `base.net.encoder.fusion.*` (`--tmr official`;
names in TMR_NAMES). Unused by the official forward and not mapped: `decoder.out_conv`,
`attn_x5.conv`, `img_txt_attn.temperature`. With `--tmr paper` (textseg's default) the official `attn_x5` is replaced
by textseg's TMR minus the residual the decoder adds back, so everything around the TMR is compared.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _text_helpers import (assert_close, assert_grads_close, keep_float64, load_mapped, official_imports,
                           official_repo, vnet_key)
from parity_helpers import official_module

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method
from textseg_cli.methods.text_addon import TextAddon
from textseg_cli.runs.config import build_config
from textseg_cli.text.embeddings import save_embeddings

pytestmark = pytest.mark.parity

COMMIT = "18ceced684b84b1ac2d5f0b6905951292a81e71a"
N = 32  # patch 32³: bottleneck 2³, the official TMR layer built for it as MC_CLIP.py:264-267 builds it for 6³
IT = 2999  # DTC ramp index 19 of 40
DROP = [r"^decoder\.out_conv\.", r"attn_x5\.conv\.", r"img_txt_attn\.temperature"]
VIEWS = ("Axial", "Sagittal", "Coronal")
TMR_NAMES = {"img_attn.q_proj": "self_q", "img_attn.k_proj": "self_k", "img_attn.v_proj": "self_v",
             "img_attn.proj": "self_out", "img_txt_attn.w_q": "txt_q", "img_txt_attn.w_k": "txt_k",
             "img_txt_attn.w_v": "txt_v", "img_txt_attn.to_out.0": "txt_out",
             **{f"to_patch_embedding_{v}.1": f"embed.{v.lower()}" for v in VIEWS},
             **{f"positional_encoding_{v}": f"pos.{v.lower()}" for v in VIEWS},
             **{f"to_out_{v}.0": f"unembed.{v.lower()}" for v in VIEWS}}


class _PaperTMRInOfficial(nn.Module):
    """textseg's paper TMR in the official decoder's place; the decoder adds x5 back (MC_CLIP.py:284)."""

    def __init__(self, tmr):
        super().__init__()
        self.tmr = tmr

    def forward(self, x5, txt):
        return self.tmr(x5, txt) - x5


def _cog(outputs_sig, feats, txt, normalise):
    """trainer.py:122-130, :138 (one decoder's half): feats / ||feats||_{dim=-1} where the code normalises."""
    if normalise:
        feats = feats / feats.norm(dim=-1, keepdim=True)
    pred = F.interpolate(outputs_sig, size=tuple(feats.shape[-3:]), mode="trilinear", align_corners=False)
    vf = torch.stack([pred[:, c].unsqueeze(1) * feats for c in range(outputs_sig.shape[1])], 1).mean(dim=(-3, -2, -1))
    return torch.mean((vf - txt.repeat(outputs_sig.shape[0], 1, 1)) ** 2)


def official_to_textseg(key: str) -> str:
    if key.startswith("encoder."):
        return "base.net.encoder.inner." + vnet_key(key[len("encoder."):])
    if key.startswith("out_conv2."):
        return "base.net.decoder.out_conv." + key.split(".", 1)[1]
    if key.startswith("out_conv."):
        return "base.net.sdf_head." + key.split(".", 1)[1]
    if key.startswith("decoder.projection_head."):
        return "csa_heads.0.net." + key.rsplit(".", 1)[1]
    if key.startswith("decoder.attn_x5."):
        r = key[len("decoder.attn_x5."):]
        for a, b in TMR_NAMES.items():
            if r == a or r.startswith(a + "."):
                return f"base.net.encoder.fusion.{b}{r[len(a):]}"
        return f"base.net.encoder.fusion.{r}"
    return "base.net.decoder." + vnet_key(key[len("decoder."):])


@pytest.fixture(scope="module")
def repo():
    return official_repo("Text-SemiSeg", COMMIT)


def _pair(repo, tmp_path, mode):
    """(official VNet_DTC, textseg dtc + `--text tmr+csa` with the official weights, raw text rows)."""
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 512, generator=g) * 0.4  # raw CLIP rows (norm ~9), as `textseg encode` writes them
    path = save_embeddings(tmp_path / "clip.safetensors", {"embeddings": raw},
                           {"encoder": "clip", "texts": ["A pixel of a background.", "A pixel of a pancreas."],
                            "normalized": False})
    with official_imports(repo) as imp:
        mc = imp("model.MC_CLIP")
        torch.manual_seed(0)
        off = mc.VNet_DTC(SimpleNamespace(dataset="/Pancreas"), n_channels=1, n_classes=1,
                          normalization="batchnorm", has_dropout=True)
        grid = [N // 16] * 3
        off.decoder.attn_x5 = mc.CA_TransformerDecoderLayer(input_size=grid, in_channels=256, d_model=512,
                                                            patch_size=grid)
    # sdf_sharpness pinned to train_la_dtc.py:185 (DTC's own defaults are test_loss_parity.py's business)
    cfg = build_config("dtc", "pancreas", 3, [N] * 3,
                       sets=[f"method.text.embeddings={path}", "method.text_addon=tmr+csa", f"method.tmr={mode}",
                             "method.sdf_sharpness=1500"])
    torch.manual_seed(1)
    ours = build_method("dtc", cfg, 1, 2, 3, class_names=["background", "pancreas"], dataset_name="pancreas",
                        data_root=None, patch_size=[N] * 3)
    assert isinstance(ours, TextAddon)
    drop = DROP + ([r"attn_x5\."] if mode == "paper" else [])
    missing, _ = load_mapped(ours, off.state_dict(), official_to_textseg, drop=drop)
    missing = [k for k in missing if k != "text.embeddings"]  # the text is an input, not a weight
    if mode == "paper":
        assert missing and all(k.startswith("base.net.encoder.fusion.") for k in missing)
        off.decoder.attn_x5 = _PaperTMRInOfficial(copy.deepcopy(ours.base.net.encoder.fusion))
    else:
        assert not missing
    return off, ours, raw


def _ours_forward(ours, x):
    """(seg logits, SDF, CSA projection) of textseg's network."""
    fused = []
    hook = ours.base.net.encoder.register_forward_hook(lambda m, i, o: fused.append(o[-1]))
    try:
        seg, sdf = ours.base.net(x)
    finally:
        hook.remove()
    return seg, sdf, ours.csa_heads[0](fused[0])


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_text_dtc_network_parity_train_and_eval(repo, tmp_path, mode):
    off, ours, raw = _pair(repo, tmp_path, mode)
    txt = ours.text()
    assert torch.allclose(txt, F.normalize(raw, dim=-1))  # F_t / ||F_t|| (CoOp.py:199), not the raw rows
    x = torch.randn(2, 1, N, N, N, generator=torch.Generator().manual_seed(5))
    for train in (True, False):  # train: batch statistics and the same dropout draws in the same order
        off.train(train)
        ours.train(train)
        with torch.no_grad():
            torch.manual_seed(7)
            (out_tanh, out_seg), feats = off(x, txt[None])
            torch.manual_seed(7)
            seg, sdf, proj = _ours_forward(ours, x)
        assert_close(seg, out_seg, what=f"{mode} train={train} segmentation logits")
        assert_close(sdf, out_tanh, what=f"{mode} train={train} SDF")
        assert_close(proj, feats, what=f"{mode} train={train} projection")


def official_step(model, dtc, txt, volume, label, lbs, cog_weight=1.0):
    """DTC's train_la_dtc.py:172-189 with the text-DTC network, plus Text-SemiSeg's CSA (trainer.py:122-138)."""
    (outputs_tanh, outputs), feats = model(volume, txt)                                          # MC_CLIP.py:596-609
    outputs_soft = torch.sigmoid(outputs)                                                        # :173
    # `.float()` (:179) is float32 in the script (keep_float64 leaves float64 tensors alone, so it is spelled out)
    gt_dis = torch.from_numpy(dtc["util"].compute_sdf(label[:].cpu().numpy(),
                                                      outputs[:lbs, 0, ...].shape)).to(torch.float32)  # :176-179
    loss_sdf = nn.MSELoss()(outputs_tanh[:lbs, 0, ...], gt_dis)                                  # :180
    loss_seg = nn.BCEWithLogitsLoss()(outputs[:lbs, 0, ...], label[:lbs].float())                # :181-182
    loss_seg_dice = dtc["losses"].dice_loss(outputs_soft[:lbs, 0, :, :, :], label[:lbs] == 1)    # :183-184
    dis_to_mask = torch.sigmoid(-1500 * outputs_tanh)                                            # :185
    consistency_loss = torch.mean((dis_to_mask - outputs_soft) ** 2)                             # :187
    supervised_loss = loss_seg_dice + 0.3 * loss_sdf                                             # :188
    consistency_weight = 1.0 * dtc["ramps"].sigmoid_rampup(IT // 150, 40.0)                      # :189, :143-145
    # trainer.py:118-138 on the two class maps of the one sigmoid channel; decoder-1 features normalised (:123)
    two_class = torch.cat([1 - outputs_soft, outputs_soft], dim=1)
    cog = _cog(two_class, feats, txt, True)
    loss = supervised_loss + consistency_weight * consistency_loss + cog_weight * cog
    return {"loss_sdf": loss_sdf, "loss_ce": loss_seg, "loss_dice": loss_seg_dice,
            "loss_consistency": consistency_loss, "consistency_weight": torch.tensor(consistency_weight),
            "loss_csa": cog, "loss": loss}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_text_dtc_loss_terms_and_gradients_parity(repo, tmp_path, monkeypatch, official_dir, mode):
    """One training step of both in float64 (weights, batch, text and dropout draws equal): every term, the total
    (the CSA term included) and the gradients of every official weight."""
    off, ours, _ = _pair(repo, tmp_path, mode)
    dtc = {m: official_module(official_dir, "DTC", f"utils.{m}") for m in ("losses", "util", "ramps")}
    keep_float64(monkeypatch)
    off.double(), ours.double()
    txt = ours.text().detach()[None]
    g = torch.Generator().manual_seed(11)
    label = torch.zeros(2, N, N, N, dtype=torch.long)
    label[0, 8:22, 6:20, 10:26] = 1
    label[1, 12:28, 10:24, 4:18] = 1
    volume = (torch.randn(4, 1, N, N, N, generator=g) + 1.5 * torch.cat([label, label]).unsqueeze(1)).double()
    off.train()
    ours.train()
    torch.manual_seed(21)
    ref = official_step(off, dtc, txt, volume, label, 2)
    ref["loss"].backward()
    ref = {k: v.detach() for k, v in ref.items()}
    torch.manual_seed(21)
    got = ours.training_step(Batch(volume[:2], label, volume[2:]), StepContext(IT, 6000, torch.device("cpu")))
    for k in ref:
        assert_close(got[k].detach().reshape(()), ref[k].reshape(()).double(), atol=1e-10, what=k)
    got["loss"].backward()
    own = dict(ours.named_parameters())
    pairs = []
    for k, p in off.named_parameters():
        if any(re.search(d, k) for d in DROP) or (mode == "paper" and "attn_x5" in k):
            continue
        pairs.append((k, own[official_to_textseg(k)].grad, p.grad))
    assert_grads_close(pairs, rel=1e-8)

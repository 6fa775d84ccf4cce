"""Loss parity: one fixed batch, the same weights (textseg's networks, whose outputs equal the official networks',
test_network_parity.py), the ramp at a mid-schedule iteration. The official total is computed with the repository's
own loss and ramp modules and the training script's lines restated below (file:line); each term and the total equal
textseg's `training_step` (≤1e-5) and the gradients after one backward agree (≤1e-4 relative).
Networks run in eval mode (no dropout draws; BatchNorm on running statistics) so both passes see the same outputs.
Written against MC-Net@fee453c, UA-MT@88ed29a, DTC@2525b9c, MCF@ad20659, MLRP@5ca2d87."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from parity_helpers import official_commit, official_module
from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method

IT, TOTAL = 2999, 6000  # ramp index (t // 150) 19, or 20 where the script increments first
PATCH = (16, 16, 16)


def _batch() -> Batch:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, *PATCH, generator=g)
    y = torch.zeros(2, *PATCH, dtype=torch.long)
    y[0, 3:11, 4:12, 2:9] = 1
    y[1, 6:14, 2:10, 5:15] = 1
    return Batch(x[:2], y, x[2:])


def _method(name: str):
    torch.manual_seed(0)
    cfg = {"method": {"backbone": {"n_filters": 4}}, "train": {"iterations": TOTAL}}
    return build_method(name, cfg, 1, 2, dim=3).eval()


def _grads(loss: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]


def _assert_grads(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in b) ** 0.5
    assert num <= 1e-4 * max(den, 1e-12), (num, den)


def _close(a, b, atol=1e-5):
    value = lambda t: float(t.detach()) if isinstance(t, torch.Tensor) else float(t)  # noqa: E731
    assert value(a) == pytest.approx(value(b), abs=atol, rel=1e-5)

def _check_step(m, b, loss: torch.Tensor, terms: dict) -> None:
    """The official `loss` (built on `m`'s weights) against `m.training_step` on batch `b`: each logged term, the
    total, and the gradients after one backward."""
    g_official = _grads(loss, m)
    out = m.training_step(b, StepContext(IT, TOTAL, torch.device("cpu")))
    for key, value in terms.items():
        _close(out[key], value)
    _close(out["loss"], loss)
    _assert_grads(_grads(out["loss"], m), g_official)



def test_uamt(official_dir, record_property):
    record_property("commit", official_commit(official_dir, "UA-MT"))
    losses = official_module(official_dir, "UA-MT", "utils.losses")
    ramps = official_module(official_dir, "UA-MT", "utils.ramps")
    m, b = _method("uamt"), _batch()
    model, ema_model, lb = m.student, m.teacher, 2
    torch.manual_seed(5)
    # train_LA_meanteacher_certainty_unlabel.py:141-182 (uncertainty shapes restated for this patch)
    volume_batch, label_batch = torch.cat([b.image_l, b.image_u]), b.label_l
    unlabeled = volume_batch[lb:]
    outputs = model(volume_batch)
    with torch.no_grad():
        ema_output = ema_model(unlabeled + torch.clamp(torch.randn_like(unlabeled) * 0.1, -0.2, 0.2))
    T = 8
    volume_batch_r = unlabeled.repeat(2, 1, 1, 1, 1)
    stride = volume_batch_r.shape[0] // 2
    preds = torch.zeros([stride * T, 2, *PATCH])
    for i in range(T // 2):
        ema_inputs = volume_batch_r + torch.clamp(torch.randn_like(volume_batch_r) * 0.1, -0.2, 0.2)
        with torch.no_grad():
            preds[2 * stride * i:2 * stride * (i + 1)] = ema_model(ema_inputs)
    preds = F.softmax(preds, dim=1).reshape(T, stride, 2, *PATCH).mean(0)
    uncertainty = -1.0 * torch.sum(preds * torch.log(preds + 1e-6), dim=1, keepdim=True)
    loss_seg = F.cross_entropy(outputs[:lb], label_batch[:lb])
    outputs_soft = F.softmax(outputs, dim=1)
    loss_seg_dice = losses.dice_loss(outputs_soft[:lb, 1], label_batch[:lb] == 1)
    supervised_loss = 0.5 * (loss_seg + loss_seg_dice)
    consistency_weight = 0.1 * ramps.sigmoid_rampup(IT // 150, 40.0)
    consistency_dist = losses.softmax_mse_loss(outputs[lb:], ema_output)
    threshold = (0.75 + 0.25 * ramps.sigmoid_rampup(IT, TOTAL)) * np.log(2)
    mask = (uncertainty < threshold).float()
    consistency_dist = torch.sum(mask * consistency_dist) / (2 * torch.sum(mask) + 1e-16)
    loss = supervised_loss + consistency_weight * consistency_dist
    g_official = _grads(loss, m)

    torch.manual_seed(5)
    out = m.training_step(b, StepContext(IT, TOTAL, torch.device("cpu")))
    _close(out["loss_ce"], loss_seg)
    _close(out["loss_dice"], loss_seg_dice)
    _close(out["loss_consistency"], consistency_dist)
    _close(out["consistency_weight"], consistency_weight)
    _close(out["uncertainty_threshold"], threshold)
    _close(out["loss"], loss)
    _assert_grads(_grads(out["loss"], m), g_official)


@pytest.mark.parametrize("name,n_out", [("mcnet", 2), ("mcnet+", 3)])
def test_mcnet(official_dir, name, n_out, record_property):
    record_property("commit", official_commit(official_dir, "MC-Net"))
    losses = official_module(official_dir, "MC-Net", "utils.losses")
    ramps = official_module(official_dir, "MC-Net", "utils.ramps")
    m, b = _method(name), _batch()
    lb = 2
    volume_batch, label_batch = torch.cat([b.image_l, b.image_u]), b.label_l
    outputs = m.net(volume_batch)

    def sharpening(P):  # train_mcnet_3d.py:27-30, temperature 0.1 (:48)
        T = 1 / 0.1
        return P ** T / (P ** T + (1 - P) ** T)

    # train_mcnet_3d.py:140-163
    loss_seg_dice, y_ori, y_pseudo = 0, [], []
    for idx in range(n_out):
        y_prob = F.softmax(outputs[idx][:lb], dim=1)
        loss_seg_dice += losses.Binary_dice_loss(y_prob[:, 1, ...], label_batch[:lb, ...] == 1)
        y_prob_all = F.softmax(outputs[idx], dim=1)
        y_ori.append(y_prob_all)
        y_pseudo.append(sharpening(y_prob_all))
    loss_consist = 0
    for i in range(n_out):
        for j in range(n_out):
            if i != j:
                loss_consist += losses.mse_loss(y_ori[i], y_pseudo[j])
    iter_num = IT + 1
    consistency_weight = 1.0 * ramps.sigmoid_rampup(iter_num // 150, 40.0)
    loss = 0.5 * loss_seg_dice + consistency_weight * loss_consist
    _check_step(m, b, loss, {"loss_dice": loss_seg_dice, "loss_consistency": loss_consist,
                             "consistency_weight": consistency_weight})


def test_dtc(official_dir, record_property):
    record_property("commit", official_commit(official_dir, "DTC"))
    losses = official_module(official_dir, "DTC", "utils.losses")
    util = official_module(official_dir, "DTC", "utils.util")
    ramps = official_module(official_dir, "DTC", "utils.ramps")
    m, b = _method("dtc"), _batch()
    lb = 2
    volume_batch, label_batch = torch.cat([b.image_l, b.image_u]), b.label_l
    # train_la_dtc.py:172-194 (ce_loss = BCEWithLogitsLoss, mse_loss = MSELoss; beta 0.3, consistency 1.0, rampup 40)
    outputs, outputs_tanh = m.net(volume_batch)
    outputs_soft = torch.sigmoid(outputs)
    gt_dis = torch.from_numpy(util.compute_sdf(label_batch[:].cpu().numpy(), outputs[:lb, 0, ...].shape)).float()
    loss_sdf = nn.MSELoss()(outputs_tanh[:lb, 0, ...], gt_dis)
    loss_seg = nn.BCEWithLogitsLoss()(outputs[:lb, 0, ...], label_batch[:lb].float())
    loss_seg_dice = losses.dice_loss(outputs_soft[:lb, 0, :, :, :], label_batch[:lb] == 1)
    dis_to_mask = torch.sigmoid(-1500 * outputs_tanh)
    consistency_loss = torch.mean((dis_to_mask - outputs_soft) ** 2)
    supervised_loss = loss_seg_dice + 0.3 * loss_sdf
    consistency_weight = 1.0 * ramps.sigmoid_rampup(IT // 150, 40.0)
    loss = supervised_loss + consistency_weight * consistency_loss
    _check_step(m, b, loss, {"loss_sdf": loss_sdf, "loss_ce": loss_seg, "loss_dice": loss_seg_dice,
                             "loss_consistency": consistency_loss, "consistency_weight": consistency_weight})


def test_mcf(official_dir, record_property):
    record_property("commit", official_commit(official_dir, "MCF"))
    losses = official_module(official_dir, "MCF", "utils.losses")
    ramps = official_module(official_dir, "MCF", "utils.ramps")
    m, b = _method("mcf"), _batch()
    lb, T = 2, 0.1
    x, v_label = torch.cat([b.image_l, b.image_u]), b.label_l
    # train_MCF.py:161-223 (consistency_criterion = losses.softmax_mse_loss, :136); one total for both networks
    v_outputs, r_outputs = m.vnet(x), m.resnet(x)
    v_loss_seg = F.cross_entropy(v_outputs[:lb], v_label[:lb])
    v_outputs_soft = F.softmax(v_outputs, dim=1)
    v_loss_seg_dice = losses.dice_loss(v_outputs_soft[:lb, 1], v_label[:lb] == 1)
    r_loss_seg = F.cross_entropy(r_outputs[:lb], v_label[:lb])
    r_outputs_soft = F.softmax(r_outputs, dim=1)
    r_loss_seg_dice = losses.dice_loss(r_outputs_soft[:lb, 1], v_label[:lb] == 1)
    good = 0 if v_loss_seg_dice < r_loss_seg_dice else 1
    v_predict = torch.max(v_outputs_soft[:lb], 1)[1]
    r_predict = torch.max(r_outputs_soft[:lb], 1)[1]
    diff_mask = ((v_predict == 1) ^ (r_predict == 1)).to(torch.int32)
    v_mse = torch.sum(diff_mask * losses.softmax_mse_loss(v_outputs_soft[:lb, 1], v_label[:lb])) / (
        torch.sum(diff_mask) + 1e-16)
    r_mse = torch.sum(diff_mask * losses.softmax_mse_loss(r_outputs_soft[:lb, 1], v_label[:lb])) / (
        torch.sum(diff_mask) + 1e-16)
    v_sup = (v_loss_seg + v_loss_seg_dice) + 0.5 * v_mse
    r_sup = (r_loss_seg + r_loss_seg_dice) + 0.5 * r_mse
    src = (v_outputs_soft if good == 0 else r_outputs_soft)[lb:].clone().detach()
    plabel = torch.pow(src, 1 / T) / torch.sum(torch.pow(src, 1 / T), dim=1, keepdim=True)
    other_soft = r_outputs_soft if good == 0 else v_outputs_soft
    dist = losses.softmax_mse_loss(other_soft[lb:], plabel)
    cons = torch.sum(dist) / dist.numel()
    w = 0.1 * ramps.sigmoid_rampup(IT // 150, 40.0)
    loss = v_sup + r_sup + w * cons
    g_official = _grads(loss, m)

    out = m.training_step(b, StepContext(IT, TOTAL, torch.device("cpu")))
    assert int(out["good_student_is_resnet"]) == good
    _close(out["v_loss_dice"], v_loss_seg_dice)
    _close(out["r_loss_ce"], r_loss_seg)
    _close(out["v_loss_mse"], v_mse)
    _close(out["r_loss_mse"], r_mse)
    _close(out["loss_consistency"], cons)
    _close(out["loss"], loss)
    _assert_grads(_grads(out["loss"], m), g_official)


def test_mlrp(official_dir, record_property):
    record_property("commit", official_commit(official_dir, "MLRP"))
    losses = official_module(official_dir, "MLRP", "utils.losses")
    ramps = official_module(official_dir, "MLRP", "utils.ramps")
    m, b = _method("mlrp"), _batch()
    lb, num_classes = 2, 2
    volume_batch, label_batch = torch.cat([b.image_l, b.image_u]), b.label_l
    outputs, outfeats = m._forward(volume_batch)
    # train_Mutual_Reliable.py:148-203 (consistency_criterion = CrossEntropyLoss(reduction='none'), :129)
    y_all = [F.softmax(y, dim=1) for y in outputs]
    loss_seg_dice = sum(losses.Binary_dice_loss(p[:lb, 1, ...], label_batch[:lb, ...] == 1) for p in y_all)
    loss_consist = 0
    for i in range(2):
        for j in range(2):
            if i == j:
                continue
            u_i = -1.0 * torch.sum(y_all[i] * torch.log(y_all[i] + 1e-6), dim=1)
            u_j = -1.0 * torch.sum(y_all[j] * torch.log(y_all[j] + 1e-6), dim=1)
            mask = (u_i > u_j).float()
            bo, co, w_, h_, d_ = y_all[j].shape
            bf, cf = outfeats[j].shape[:2]
            teacher_f = outfeats[j].reshape(bf, cf, -1)
            index = torch.argmax(y_all[j], dim=1, keepdim=True)
            bank = torch.zeros(bf, num_classes, cf)
            for ba in range(bf):
                for c in range(num_classes):
                    mt = (index[ba] == c).float()
                    bank[ba, c] = (outfeats[j][ba] * mt).sum(-1).sum(-1).sum(-1) / (mt.sum() + 1e-6)
            bank = F.normalize(bank, dim=-1)
            mask_t = torch.zeros_like(y_all[i])
            for ba in range(bo):
                for c in range(num_classes):
                    mask_t[ba, c] = F.cosine_similarity(teacher_f[ba], bank[ba, c].unsqueeze(1), dim=0).view(w_, h_, d_)
            weight = (1 - nn.MSELoss(reduction="none")(mask_t, y_all[j])).mean(1) * mask
            loss_t = nn.CrossEntropyLoss(reduction="none")(outputs[i], torch.argmax(y_all[j], dim=1).detach())
            loss_consist += (loss_t * weight.detach()).sum() / (mask.sum() + 1e-6)
    consistency_weight = 1.0 * ramps.sigmoid_rampup((IT + 1) // 150, 40.0)
    loss = 0.5 * loss_seg_dice + consistency_weight * loss_consist
    _check_step(m, b, loss, {"loss_dice": loss_seg_dice, "loss_consistency": loss_consist,
                             "consistency_weight": consistency_weight})


def test_cps(official_dir, record_property):
    record_property("commit", official_commit(official_dir, "SSL4MIS"))
    losses = official_module(official_dir, "SSL4MIS", "utils.losses")
    ramps = official_module(official_dir, "SSL4MIS", "utils.ramps")
    m, b = _method("cps"), _batch()
    lb = 2
    volume_batch, label_batch = torch.cat([b.image_l, b.image_u]), b.label_l
    ce_loss, dice_loss = nn.CrossEntropyLoss(), losses.DiceLoss(2)  # train_cross_pseudo_supervision_3D.py:140-141
    # :154-178 (rampup 200, :62; weight 0.1, :60)
    outputs1, outputs2 = m.net1(volume_batch), m.net2(volume_batch)
    soft1, soft2 = torch.softmax(outputs1, dim=1), torch.softmax(outputs2, dim=1)
    w = 0.1 * ramps.sigmoid_rampup(IT // 150, 200.0)
    loss1 = 0.5 * (ce_loss(outputs1[:lb], label_batch[:lb].long()) + dice_loss(soft1[:lb], label_batch[:lb].unsqueeze(1)))
    loss2 = 0.5 * (ce_loss(outputs2[:lb], label_batch[:lb].long()) + dice_loss(soft2[:lb], label_batch[:lb].unsqueeze(1)))
    ps1 = ce_loss(outputs1[lb:], torch.argmax(soft2[lb:].detach(), dim=1))
    ps2 = ce_loss(outputs2[lb:], torch.argmax(soft1[lb:].detach(), dim=1))
    loss = loss1 + w * ps1 + loss2 + w * ps2
    _check_step(m, b, loss, {"loss_sup1": loss1, "loss_sup2": loss2, "loss_cps1": ps1, "loss_cps2": ps2,
                             "consistency_weight": w})


def test_urpc(official_dir, record_property):
    record_property("commit", official_commit(official_dir, "SSL4MIS"))
    losses = official_module(official_dir, "SSL4MIS", "utils.losses")
    ramps = official_module(official_dir, "SSL4MIS", "utils.ramps")
    torch.manual_seed(0)
    m = build_method("urpc", {"method": {"backbone": {"n_filters": 4}}}, 1, 2, dim=3).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 32, 32, 32, generator=g)  # instance norm needs > 1 voxel at the bottleneck
    label_batch = torch.zeros(2, 32, 32, 32, dtype=torch.long)
    label_batch[:, 8:20, 6:22, 10:26] = 1
    b, lb = Batch(x[:2], label_batch, x[2:]), 2
    ce_loss, dice_loss = nn.CrossEntropyLoss(), losses.DiceLoss(2)  # :114-115
    kl_distance = nn.KLDivLoss(reduction="none")  # :124
    # train_uncertainty_rectified_pyramid_consistency_3D.py:132-203 (weight 0.1, rampup 400: :61-63)
    outs = m.net(x)
    softs = [torch.softmax(o, dim=1) for o in outs]
    supervised_loss = (sum(ce_loss(o[:lb], label_batch[:lb]) for o in outs)
                       + sum(dice_loss(s[:lb], label_batch[:lb].unsqueeze(1)) for s in softs)) / 8
    preds = sum(softs) / 4
    cons = 0
    for s in softs:
        variance = torch.sum(kl_distance(torch.log(s[lb:]), preds[lb:]), dim=1, keepdim=True)
        exp_variance = torch.exp(-variance)
        dist = (preds[lb:] - s[lb:]) ** 2
        cons = cons + torch.mean(dist * exp_variance) / (torch.mean(exp_variance) + 1e-8) + torch.mean(variance)
    cons = cons / 4
    w = 0.1 * ramps.sigmoid_rampup(IT // 150, 400.0)
    loss = supervised_loss + w * cons
    _check_step(m, b, loss, {"loss_consistency": cons, "consistency_weight": w})


def test_bcp_mix_loss_and_pseudo_labels(official_dir, record_property):
    """BCP's loss lives in utils/BCP_utils.py (mix_loss, :58-69, with mask_DiceLoss and per-voxel CE); the script
    pairs it as LA_BCP_train.py:254-257. The cuboid comes from the official context_mask (:18-28) here, so both see
    the same mask; textseg draws its own cuboid with the same size (see docs/fidelity.md for the corner range)."""
    from textseg_cli.methods.bcp import mix_loss as ours_mix_loss
    from textseg_cli.methods.ssl_common import threshold_pseudo_label

    record_property("commit", official_commit(official_dir, "BCP"))
    bcp = official_module(official_dir, "BCP", "utils.BCP_utils")
    g = torch.Generator().manual_seed(4)
    shape = (2, 112, 112, 80)  # context_mask hard-codes LA's 112 × 112 × 80 patch
    logits_l = torch.randn(2, 2, *shape[1:], generator=g, requires_grad=True)
    logits_u = torch.randn(2, 2, *shape[1:], generator=g, requires_grad=True)
    lab_a = (torch.rand(shape, generator=g) > 0.6).long()
    lab_b = (torch.rand(shape, generator=g) > 0.4).long()
    # get_cut_mask (LA_BCP_train.py:57-63) without its LCC: softmax ≥ 0.5 on channel 1
    un = torch.randn(2, 2, *shape[1:], generator=g)
    plab_a = (F.softmax(un, 1) >= 0.5).long()[:, 1]
    assert torch.equal(threshold_pseudo_label(torch.softmax(un, 1), 0.5), plab_a)
    plab_b = 1 - plab_a
    np.random.seed(0)
    img_mask, loss_mask = bcp.context_mask(torch.zeros(2, 1, *shape[1:]), 2 / 3)
    assert torch.equal(loss_mask[0], img_mask) and (img_mask == 0).sum() == 74 * 74 * 53

    off_l = bcp.mix_loss(logits_l, lab_a, plab_a, loss_mask, u_weight=0.5)
    off_u = bcp.mix_loss(logits_u, plab_b, lab_b, loss_mask, u_weight=0.5, unlab=True)
    g_off = torch.autograd.grad(off_l + off_u, [logits_l, logits_u])
    our_l = ours_mix_loss(logits_l, lab_a, plab_a, img_mask, 1.0, 0.5)
    our_u = ours_mix_loss(logits_u, plab_b, lab_b, img_mask, 0.5, 1.0)
    g_our = torch.autograd.grad(our_l + our_u, [logits_l, logits_u])
    _close(our_l, off_l)
    _close(our_u, off_u)
    _assert_grads(list(g_our), list(g_off))

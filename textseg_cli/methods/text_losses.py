"""Losses and mixing used by the text-guided methods (Text-SemiSeg, VCLIPSeg, LLM-SegNet).

All functions take probabilities (B, K, *spatial) and integer labels (B, *spatial); text features are
(K, D). They are plain functions so each can be checked against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.models.text_fusion import resize_probs


class ProjectionHead(nn.Module):
    """1×1 conv head mapping bottleneck features to the text width (CSA: one conv; VTCM: conv-ReLU-conv, L2)."""

    def __init__(self, channels: int = 256, text_dim: int = 512, hidden: int | None = None, normalize: bool = False,
                 dim: int = 3):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        if hidden is None:
            self.net = conv(channels, text_dim, 1)
        else:
            self.net = nn.Sequential(conv(channels, hidden, 1), nn.ReLU(inplace=True), conv(hidden, text_dim, 1))
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return F.normalize(y, dim=1) if self.normalize else y


def csa_loss(features: torch.Tensor, probs: list[torch.Tensor], text: torch.Tensor, pool: str = "mean",
             channel_reduction: str = "sum", class_reduction: str = "sum", resize: str = "avgpool") -> torch.Tensor:
    """Class-semantic alignment (Text-SemiSeg Eq. 4).

    For each decoder's probabilities ŷ_d (resized to the feature grid) and class k, the prototype
    avg_v(F_p(v) · ŷ_{d,k}(v)) is pulled to t_k by squared error; summed over classes and decoders,
    averaged over the batch. pool="mean" divides by the voxel count as the paper's avg(·) does;
    pool="masked" divides by Σ_v ŷ_{d,k}(v) (a soft masked mean). channel_reduction="sum" sums the squared
    error over the D channels (Eq. 4 as written); "mean" averages it (the published code's scale, which keeps
    the loss O(1) with unnormalised 512-d CLIP features). class_reduction="mean" also averages over the K
    classes: with channel_reduction="mean" the term is `torch.mean((proto - t)**2)` of the published code
    (Text-SemiSeg trainer.py:138). resize="trilinear" samples the probabilities onto the grid by trilinear
    interpolation (align_corners=False) as that code does (trainer.py:125); "avgpool" averages them.
    """
    if channel_reduction not in ("sum", "mean"):
        raise ValueError(f"csa channel_reduction must be 'sum' or 'mean', got {channel_reduction!r}")
    if class_reduction not in ("sum", "mean"):
        raise ValueError(f"csa class_reduction must be 'sum' or 'mean', got {class_reduction!r}")
    if resize not in ("avgpool", "trilinear"):
        raise ValueError(f"csa resize must be 'avgpool' or 'trilinear', got {resize!r}")
    # prototypes in float32: under autocast the einsum would sum a whole volume's products in bf16
    with torch.autocast(features.device.type, enabled=False):
        return _csa_fp32(features.float(), probs, text.float(), pool, channel_reduction, class_reduction, resize)


def _csa_fp32(features: torch.Tensor, probs: list[torch.Tensor], text: torch.Tensor, pool: str,
              channel_reduction: str, class_reduction: str, resize: str) -> torch.Tensor:
    b, _ = features.shape[:2]
    spatial = features.shape[2:]
    n = float(torch.tensor(spatial).prod())
    total = features.new_zeros(())
    for p in probs:
        if resize == "trilinear":
            mode = "trilinear" if p.dim() == 5 else "bilinear"
            ps = F.interpolate(p.float(), size=tuple(spatial), mode=mode, align_corners=False).to(features.dtype)
        else:
            ps = resize_probs(p.float(), spatial).to(features.dtype)
        proto = torch.einsum("bc...,bk...->bkc", features, ps)
        if pool == "mean":
            proto = proto / n
        elif pool == "masked":
            proto = proto / ps.flatten(2).sum(-1).clamp_min(1e-6).unsqueeze(-1)
        else:
            raise ValueError(f"csa pool must be 'mean' or 'masked', got {pool!r}")
        err = (proto - text.to(proto.dtype).unsqueeze(0)) ** 2  # (B, K, D)
        err = err.sum(dim=2) if channel_reduction == "sum" else err.mean(dim=2)
        per_class = err.sum(dim=1) if class_reduction == "sum" else err.mean(dim=1)
        total = total + per_class.mean()
    return total


def _nearest_labels(labels: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest").squeeze(1).long()


def vtcm_loss(projs: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, preds: list[torch.Tensor],
              text: torch.Tensor, absent: str = "skip") -> torch.Tensor:
    """Vision-text consistency (VCLIPSeg): L_reg = 1 − mean_k cos(prototype_k, t_k).

    projs: each decoder head's projected features (B, D, *grid) of labeled samples (one tensor = one head);
    labels and each decoder's argmax prediction (B, *full) are nearest-downsampled to the grid. As in the
    published code (train_3d.py:146-155) ONE prototype per class averages the features of all heads together
    at the voxels where the label and every decoder agree on k. A class with no such voxel (the published
    code's prototype is then a mean over no voxels, NaN; its loss value is NaN, but that class gets no gradient
    and the mean still divides by K) is, with absent="official", counted as cosine 0: 1 − Σ_present cos / K,
    the published gradient with a finite value; with absent="skip" it is left out: 1 − mean over the present
    classes (K / #present times the published gradient). A zero loss that keeps the graph when none qualifies.
    """
    if absent not in ("official", "skip"):
        raise ValueError(f"vtcm absent must be 'official' or 'skip', got {absent!r}")
    projs = [projs] if isinstance(projs, torch.Tensor) else list(projs)
    grid = projs[0].shape[2:]
    lab = _nearest_labels(labels, grid)
    agree = torch.ones_like(lab, dtype=torch.bool)
    for p in preds:
        agree &= _nearest_labels(p, grid) == lab
    feats = [f.movedim(1, -1) for f in projs]  # (B, *grid, D)
    sims = []
    for k in range(text.shape[0]):
        m = agree & (lab == k)
        if bool(m.any()):
            proto = torch.cat([f[m] for f in feats]).mean(0)
            sims.append(F.cosine_similarity(proto, text[k].to(proto.dtype), dim=0))
    if not sims:
        zero = sum(f.sum() for f in projs) * 0.0
        return zero if absent == "skip" else 1 + zero
    if absent == "official":
        return 1 - torch.stack(sims).sum() / text.shape[0]
    return 1 - torch.stack(sims).mean()


def dlb_weights(dice_losses: list[torch.Tensor]) -> torch.Tensor:
    """Dynamic learning balance (VCLIPSeg): w = softmax_i(1 − sigmoid(DiceLoss_i)) over decoders.

    In float64 as the published code's numpy (train_3d.py:177-182): a last-bit difference in w flips the
    argmax of Σ w_i p_i at voxels where the fused probability sits at 0.5."""
    return torch.softmax(1 - torch.sigmoid(torch.stack([d.detach().double() for d in dice_losses])), dim=0)


def dlb_fused(probs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i p_i of the decoders' probabilities (detached): the soft pseudo-label of paper Eq. 9."""
    return sum(w * p.detach() for w, p in zip(weights, probs))


def dlb_pseudo_label(probs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Hard pseudo-label argmax Σ_i w_i p_i (the published code, train_3d.py:184-187)."""
    return dlb_fused(probs, weights).argmax(dim=1)


USL_READINGS = ("paper", "textseg")


def usl_loss(p: torch.Tensor, q: torch.Tensor, t1: float = 0.9, t2: float = 0.1, kind: str = "usl",
             reading: str = "paper") -> torch.Tensor:
    """Unified segmentation loss of LLM-SegNet (Eqs. 4, 8–11), student probabilities p vs the other model's q.

    reading="paper" (default; the equations as printed, no official code exists):
    - confident voxels (max q > t1): NLL of p at argmax q, weighted by max q (Eq. 8, first term);
    - complementary voxels (min q < t2): NLL of the complement, −log(1 − p at argmin q), weighted by 1 − min q
      (Eq. 8, second term). Eq. 8 sums both terms over their own sets, so a voxel in both counts in both: with
      two classes max q > t1 ⇔ min q < 1 − t1, and a confident binary voxel gets 2 · max q · (−log p_argmax);
    - uncertain voxels (t2 < min q and max q < t1): MSE between p and the one-hot argmax ỹ of q (Eq. 4), mean
      over classes.
    reading="textseg" (textseg's former reading, `method.usl_reading: textseg`): the complementary set leaves
    out confident voxels (each voxel counts once) and the MSE target is the soft q.
    Each term is summed over its voxels and divided by the total voxel count (batch × voxels). kind="mse" uses
    the MSE everywhere, kind="nll" only the two NLL terms (paper Table 7).
    """
    if reading not in USL_READINGS:
        raise ValueError(f"USL reading must be one of {', '.join(USL_READINGS)}, got {reading!r}")
    q = q.detach()
    eps = 1e-6
    n = q[:, 0].numel()  # batch × voxels
    qmax, qarg = q.max(dim=1)
    target = q if reading == "textseg" else F.one_hot(qarg, q.shape[1]).movedim(-1, 1).to(p.dtype)
    mse_all = ((p - target) ** 2).mean(dim=1)
    if kind == "mse":
        return mse_all.sum() / n
    qmin, qargmin = q.min(dim=1)
    p_pos = p.gather(1, qarg.unsqueeze(1)).squeeze(1)
    p_neg = p.gather(1, qargmin.unsqueeze(1)).squeeze(1)
    conf = qmax > t1
    comp = qmin < t2
    if reading == "textseg":
        comp = comp & ~conf
    l_pos = -(qmax * torch.log(p_pos.clamp_min(eps)))[conf].sum()
    l_neg = -((1 - qmin) * torch.log((1 - p_neg).clamp_min(eps)))[comp].sum()
    total = l_pos + l_neg
    if kind == "usl":
        unc = (qmin > t2) & (qmax < t1)
        total = total + mse_all[unc].sum()
    elif kind != "nll":
        raise ValueError(f"unsupervised loss must be usl, mse or nll, got {kind!r}")
    return total / n


def dca_mix(x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, pseudo_u: torch.Tensor):
    """Dual copy-paste of foreground (Text-SemiSeg DCA, Eqs. 5–6).

    Labeled foreground is pasted onto the paired unlabeled image (labels: y_l there, pseudo-label elsewhere),
    and pseudo-foreground onto the labeled image. Images (B, C, *s), labels (B, *s); returns
    (x_u_mix, y_u_mix, x_l_mix, y_l_mix).
    """
    m_l = (y_l > 0)
    m_u = (pseudo_u > 0)
    x_u_mix = torch.where(m_l.unsqueeze(1), x_l, x_u)
    y_u_mix = torch.where(m_l, y_l, pseudo_u)
    x_l_mix = torch.where(m_u.unsqueeze(1), x_u, x_l)
    y_l_mix = torch.where(m_u, pseudo_u, y_l)
    return x_u_mix, y_u_mix, x_l_mix, y_l_mix

"""CrossMatch (Zhao, Wang, Ding, IEEE JBHI 2024), as in the published `AiEson/CrossMatch` LA code
(LA/code/train_cross_match.py at the commit `official_commit` names).

One V-Net with feature perturbation (`models.vnet_fp.PerturbedVNet`) is teacher and student at once. Per step, with
labeled x, y and unlabeled halves u (the images) and u' (their CutMix partners):

- image-level perturbation: two strong views s1, s2 of u (and of u'), each a bias field + gamma with p = 0.8 and a
  Gaussian blur with p = 0.5 (la_heart.py:104-116, torchio's RandomBiasField / RandomGamma((−0.5, 0.5)) /
  RandomBlur((0.1, 2))); s1 and s2 get one CutMix cuboid each (p = 0.5, la_heart.py:14-47) filled from u'`s views.
- teacher passes without gradient, in train mode: the dropout-in-eval fix (`# net.eval()` left commented out,
  train_cross_match.py:231-232) keeps BatchNorm on batch statistics and the dropouts active. They give the
  pseudo-labels and confidences of u' (plain pass) and of its weak/strong feature-perturbed decodings.
- student passes: (x, u) with feature perturbation → p_x, p_u, p_u^weak, p_u^strong; (s1, s2) → p_s1, p_s2,
  p_s2^weak, p_s2^strong. Targets: argmax of p_u (detached; CutMix-pasted with u' targets inside the cuboids),
  voxels kept where the confidence max softmax ≥ τ.

      L_x  = ½ (CE(p_x, y) + Dice(p_x, y))
      L_kd = (1 − η)·¼ (D(p_u^w | p_u) + D(p_u^s | p_u) + D(p_s2^w | p_u⊕) + D(p_s2^s | p_u⊕))
             + η·½ (D(p_s2^w | p_u^w⊕) + D(p_s2^s | p_u^s⊕))
      L    = ½ (L_x + 0.25·D(p_s1 | p_u⊕1) + 0.25·D(p_s2 | p_u⊕2) + L_kd)

  D is the code's foreground Dice (squared sums, smooth 1e-5, over the whole batch) on the confident voxels; ⊕ marks a
  target CutMix-pasted from the teacher's u' predictions. With K > 2 classes D is the mean over the foreground classes
  (the code is binary: its channel 1). η = 0.3. A temperature T ≠ 1 divides p_u, p_u^w, p_u^s (it is 1 in train.sh).
- τ: 0.75 at the first step; after it the code's update (0.75 + 0.25·ramp(t − 1, 17,000))·ln 2 (line 365-367, run
  after each step's losses, so step t uses the value of step t − 1).

The random draws of the image-level perturbation come from a generator seeded by (seed, rank, step): a resumed run
draws what the uninterrupted run drew, and no state needs checkpointing. Dropout draws (the V-Net's and the
perturbation's) use the global torch RNG, which the engine checkpoints. Inference: the network without perturbation
(test.py:38-51).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import sigmoid_rampup
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import backbone_kwargs
from textseg_cli.models.vnet_fp import PerturbedVNet


def foreground_dice(probs: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
                    smooth: float = 1e-5) -> torch.Tensor:
    """CrossMatch's `dice_loss(score, target, ignore)` (LA/code/utils/losses.py:8-16) on probabilities (B, K, ...):
    1 − (2 Σ p·t + s) / (Σ p² + Σ t² + s) over the voxels where `valid`, per foreground class, averaged."""
    probs = probs.float()
    m = None if valid is None else valid.to(probs.dtype)
    out = []
    for c in range(1, probs.shape[1]):
        p, t = probs[:, c], (labels == c).to(probs.dtype)
        if m is not None:
            p, t = p * m, t * m
        out.append(1 - (2 * (p * t).sum() + smooth) / ((p * p).sum() + (t * t).sum() + smooth))
    return torch.stack(out).mean()


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax, argmax) over the classes."""
    conf, label = torch.softmax(logits.float(), 1).max(1)
    return conf, label


class Draws:
    """The random draws of one step from a `torch.Generator`: U[0, 1) floats, U(lo, hi) and integers in [0, hi)."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def random(self) -> float:
        return float(torch.rand((), dtype=torch.float64, generator=self.gen))

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def randint(self, hi: int) -> int:
        return int(torch.randint(0, hi, (), generator=self.gen))


def cutmix_box(spatial: list[int], draws: Draws, p: float = 0.5, size_min: float = 0.02,
               size_max: float = 0.4, ratio_min: float = 0.3, ratio_max: float = 1 / 0.3) -> torch.Tensor:
    """`obtain_cutmix_box` (la_heart.py:14-47) on the patch `spatial`: zeros, or with probability p a cuboid of ones
    of volume U(size_min, size_max)·|patch| and aspect ratio U(ratio_min, ratio_max), placed as the code places it
    (`mask[z:z+d, y:y+h, x:x+w]`: the corner drawn for the last axis indexes the first and vice versa, and a slice
    past the end is cut). Where a side exceeds the patch (small patches) the corner is 0 (the code's randint fails)."""
    mask = torch.zeros(spatial)
    if draws.random() > p:
        return mask
    nx, ny, nz = spatial
    size = draws.uniform(size_min, size_max) * nx * ny * nz
    ratio = draws.uniform(ratio_min, ratio_max)
    w, h, d = int((size / ratio) ** (1 / 3)), int((size * ratio) ** (1 / 3)), int(size ** (1 / 3))
    x, y, z = (draws.randint(max(1, n - s)) for n, s in ((nx, w), (ny, h), (nz, d)))
    mask[z:z + d, y:y + h, x:x + w] = 1
    return mask


def bias_field(spatial: list[int], coefficients: list[float], order: int, device: torch.device) -> torch.Tensor:
    """torchio's `BiasField.generate_bias_field`: exp of Σ c·x^a·y^b·z^c over a + b + c ≤ order on coordinates
    (arange(−n/2, n/2) + 0.5) scaled to max 1, terms in the order x, y, z (its coefficients' draw order)."""
    axes = []
    for n in spatial:
        r = torch.arange(n, dtype=torch.float64, device=device) - n / 2 + 0.5
        axes.append(r / r.max() if r.max() > 0 else r)
    ax, ay, az = axes
    field = torch.zeros(spatial, dtype=torch.float64, device=device)
    i = 0
    for a in range(order + 1):
        for b in range(order + 1 - a):
            for c in range(order + 1 - (a + b)):
                field += coefficients[i] * (ax ** a)[:, None, None] * (ay ** b)[None, :, None] * (az ** c)[None, None]
                i += 1
    return torch.exp(field).float()


def gaussian_blur(image: torch.Tensor, stds: list[float], truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter (mode "reflect", truncate 4) of each channel of (C, *spatial) with one std per
    axis, as torchio's Blur on a tensor (spacing 1)."""
    out = image
    for axis, sigma in enumerate(stds, start=1):
        radius = int(truncate * float(sigma) + 0.5)
        if radius == 0:
            continue
        k = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-0.5 / float(sigma) ** 2 * k ** 2)
        w = (w / w.sum()).tolist()
        n = out.shape[axis]
        idx = torch.arange(-radius, n + radius) % (2 * n)
        idx = torch.where(idx < n, idx, 2 * n - 1 - idx).to(out.device)  # half-sample symmetric extension
        padded = out.index_select(axis, idx)
        out = sum(wj * padded.narrow(axis, j, n) for j, wj in enumerate(w))
    return out


@register_method("crossmatch")
class CrossMatch(Method):
    paper = ("Zhao, Wang, Ding, CrossMatch: Enhance semi-supervised medical image segmentation with perturbation "
             "strategies and knowledge distillation, IEEE JBHI 2024")
    display_name = "CrossMatch"
    official_code = "AiEson/CrossMatch"
    official_commit = "59772e0"
    ledger = "docs/fidelity.md#crossmatch-crossmatch"
    protocol_lcc = ""  # LA/code/test_util.py: argmax of the averaged windows, no connected-component step
    dims = (3,)
    dims_note = "the official network, dropouts and image perturbations are 3D"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        hp = self.hparams
        self.net = PerturbedVNet(in_channels, num_classes, dim=dim, pert_gap=float(hp.get("pert_gap", 0.5)),
                                 pert_type=str(hp.get("pert_type", "dropout")), **backbone_kwargs(hp))
        self.seed = int(cfg.get("seed", 1337)) if isinstance(cfg, dict) else 1337

    # --- schedule and draws ----------------------------------------------------------------------------------------
    def confidence_threshold(self, iteration: int) -> float:
        """τ of the step with 0-based index `iteration` (train_cross_match.py:59, 98, 365-367)."""
        hp = self.hparams
        start = float(hp.get("conf_thresh", 0.75))
        if iteration == 0:
            return start
        ramp = sigmoid_rampup(iteration - 1, float(hp.get("threshold_rampup", 17000)))
        return (start + (1 - start) * ramp) * float(hp.get("threshold_scale", 0.6931471805599453))

    def draws(self, ctx: StepContext) -> Draws:
        """This step's draws: a generator seeded by (config seed, rank, step), so a resumed run repeats them."""
        rank = int((ctx.extra or {}).get("rank", 0))
        seed = np.random.SeedSequence([self.seed % 2**63, rank, int(ctx.iteration)]).generate_state(1, np.uint64)[0]
        return Draws(torch.Generator().manual_seed(int(seed) % 2**63))

    def strong_view(self, image: torch.Tensor, draws: Draws) -> torch.Tensor:
        """One strong view of (C, *spatial) (la_heart.py:104-109): bias field then gamma with p = bias_field_p,
        then a blur with p = blur_p."""
        s = self.hparams.get("strong") or {}
        u = draws.uniform
        out = image.float()
        if draws.random() < float(s.get("bias_field_p", 0.8)):
            order, c = int(s.get("bias_order", 3)), float(s.get("bias_coefficients", 0.5))
            n_terms = sum(order + 1 - (a + b) for a in range(order + 1) for b in range(order + 1 - a))
            coefficients = [u(-c, c) for _ in range(n_terms)]
            out = out * bias_field(list(out.shape[1:]), coefficients, order, out.device)
            lo, hi = s.get("log_gamma", [-0.5, 0.5])
            gammas = torch.tensor([math.exp(u(float(lo), float(hi))) for _ in range(out.shape[0])], device=out.device)
            out = out.sign() * out.abs() ** gammas.view(-1, *[1] * (out.dim() - 1))
        if draws.random() < float(s.get("blur_p", 0.5)):
            lo, hi = s.get("blur_std", [0.1, 2.0])
            out = gaussian_blur(out, [u(float(lo), float(hi)) for _ in range(out.dim() - 1)])
        return out

    def _box(self, spatial: list[int], draws: Draws, device: torch.device) -> torch.Tensor:
        c = self.hparams.get("cutmix") or {}
        return cutmix_box(spatial, draws, float(c.get("p", 0.5)), float(c.get("size_min", 0.02)),
                          float(c.get("size_max", 0.4)), float(c.get("ratio_min", 0.3)),
                          float(c.get("ratio_max", 3.3333333333333335))).to(device)

    def perturb_images(self, u: torch.Tensor, u_mix: torch.Tensor, draws: Draws):
        """(s1, s2, box1, box2) of u, each view CutMix-pasted from the views of u_mix inside its box.
        Draws per sample of u: s1, s2, box1, box2 (la_heart.py:104-118); then per sample of u_mix: s1, s2."""
        spatial = list(u.shape[2:])
        s1, s2, b1, b2 = [], [], [], []
        for img in u:
            s1.append(self.strong_view(img, draws))
            s2.append(self.strong_view(img, draws))
            b1.append(self._box(spatial, draws, u.device))
            b2.append(self._box(spatial, draws, u.device))
        mix1, mix2 = [], []
        for img in u_mix:
            mix1.append(self.strong_view(img, draws))
            mix2.append(self.strong_view(img, draws))
        box1, box2 = torch.stack(b1), torch.stack(b2)
        # train_cross_match.py:247-252: the mix sample's strong view inside the box
        u_s1 = torch.where(box1.unsqueeze(1) == 1, torch.stack(mix1), torch.stack(s1))
        u_s2 = torch.where(box2.unsqueeze(1) == 1, torch.stack(mix2), torch.stack(s2))
        return u_s1, u_s2, box1, box2

    # --- the step --------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        if bu < 2 or bu % 2:
            raise ConfigError(f"method crossmatch: train.batch_unlabeled must be even and ≥ 2 (its first half are the "
                              f"unlabeled images, the second half their CutMix partners), got {bu}")
        h = bu // 2
        x, y = batch.image_l, batch.label_l
        u_w, u_w_mix = batch.image_u[:h], batch.image_u[h:]
        u_s1, u_s2, box1, box2 = self.perturb_images(u_w, u_w_mix, self.draws(ctx))
        thr = self.confidence_threshold(ctx.iteration)
        temperature = float(hp.get("temperature", 1.0))

        with torch.no_grad():  # train_cross_match.py:231-245, in train mode (the `net.eval()` there is commented out)
            conf_mix, mask_mix = confidence(self.net(u_w_mix))
            _, _, mix_weak, mix_strong = self.net(torch.cat([x, u_w_mix]), need_fp=True, n_first=bl)
            conf_mix_weak, mask_mix_weak = confidence(mix_weak)
            conf_mix_strong, mask_mix_strong = confidence(mix_strong)

        p_x, p_u, p_u_weak, p_u_strong = (o.float() for o in self.net(torch.cat([x, u_w]), need_fp=True, n_first=bl))
        if temperature != 1:  # :260-263
            p_u, p_u_weak, p_u_strong = p_u / temperature, p_u_weak / temperature, p_u_strong / temperature
        p_s1, p_s2, p_s2_weak, p_s2_strong = (o.float() for o in self.net(torch.cat([u_s1, u_s2]), need_fp=True))
        conf_u, mask_u = confidence(p_u.detach())
        conf_u_weak, mask_u_weak = confidence(p_u_weak.detach())
        conf_u_strong, mask_u_strong = confidence(p_u_strong.detach())

        def pasted(mask, conf, mask_other, conf_other, box):  # :283-298
            inside = box == 1
            return torch.where(inside, mask_other, mask), torch.where(inside, conf_other, conf)

        t1, c1 = pasted(mask_u, conf_u, mask_mix, conf_mix, box1)
        t2, c2 = pasted(mask_u, conf_u, mask_mix, conf_mix, box2)
        t2_weak, c2_weak = pasted(mask_u_weak, conf_u_weak, mask_mix_weak, conf_mix_weak, box2)
        t2_strong, c2_strong = pasted(mask_u_strong, conf_u_strong, mask_mix_strong, conf_mix_strong, box2)
        sm = lambda logits: torch.softmax(logits, 1)

        loss_x = (F.cross_entropy(p_x, y.long()) + foreground_dice(sm(p_x), y)) / 2  # :301-304
        loss_s1 = foreground_dice(sm(p_s1), t1, c1 >= thr)  # :306-310
        loss_s2 = foreground_dice(sm(p_s2), t2, c2 >= thr)  # :312-316
        kd_weak_s2 = foreground_dice(sm(p_s2_weak), t2_weak, c2_weak >= thr)  # :319-323
        kd_strong_s2 = foreground_dice(sm(p_s2_strong), t2_strong, c2_strong >= thr)  # :325-329
        kd_weak_t = foreground_dice(sm(p_u_weak), mask_u, conf_u >= thr)  # :332-339
        kd_strong_t = foreground_dice(sm(p_u_strong), mask_u, conf_u >= thr)  # :341-345
        kd_weak_s2_t = foreground_dice(sm(p_s2_weak), t2, c2 >= thr)  # :347-351
        kd_strong_s2_t = foreground_dice(sm(p_s2_strong), t2, c2 >= thr)  # :353-357
        eta = float(hp.get("eta", 0.3))
        loss_kd = ((1 - eta) * (kd_weak_t + kd_strong_t + kd_weak_s2_t + kd_strong_s2_t) / 4
                   + eta * (kd_weak_s2 + kd_strong_s2) / 2)  # :359-361
        w = float(hp.get("image_weight", 0.25))
        loss = (loss_x + loss_s1 * w + loss_s2 * w + loss_kd) / 2  # :363
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_u_s1": loss_s1.detach(), "loss_u_s2": loss_s2.detach(),
                "loss_kd": loss_kd.detach(), "loss_kd_weak_t": kd_weak_t.detach(),
                "loss_kd_strong_t": kd_strong_t.detach(), "loss_kd_weak_s2_t": kd_weak_s2_t.detach(),
                "loss_kd_strong_s2_t": kd_strong_s2_t.detach(), "loss_kd_weak_s2": kd_weak_s2.detach(),
                "loss_kd_strong_s2": kd_strong_s2.detach(), "conf_threshold": torch.tensor(thr),
                "confident_fraction": (conf_u >= thr).float().mean()}

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        """The network without feature perturbation (LA/code/test.py:38-51)."""
        return self.net(x)

"""AD-MT: alternate diverse teaching (Zhao et al., ECCV 2024), as in the published `ZhenZHAO/AD-MT` 3D code
(code/train_post_3d_aut.py with cfgs/config_3d_la_aut.yml / config_3d_pan_aut.yml).

One V-Net student and two EMA teachers T₁, T₂ (three independent initialisations, as the script's three
`create_model` calls). Per step, with the unlabeled weak patches u:

1. RPA (random periodic alternation): a flag says which teacher is "active". The active teacher runs in train
   mode (batch statistics, dropout), the other in eval mode. Both predict u; after the optimiser step only the
   active one is EMA-updated, then a counter advances and, after a period drawn from U{1..P} (P = `period`,
   half an epoch in the configs), the flag flips and a new period is drawn (train_utils.py:12-60).
   The student's second unlabeled view differs by period (distinct augmentation): while T₁ is active it is the
   strong view (brightness/contrast p 0.8, Gaussian noise p 0.2: dataset_3d.py:93-130, done here on the
   patches); while T₂ is active it is a CutMix of u (with its pseudo-labels mixed alike, mixaugs.py:181-215).
2. CCM (conflict combating): the teachers' softmax maps are ensembled with weights
   exp(−H₁) / (exp(−H₁) + exp(−H₂)) (H = entropy in bits), sharpened by 1/T and renormalised; the pseudo-label
   is its argmax and confidence its max. Where the two teachers disagree *and* the student (on u) disagrees with
   the ensemble, the more confident of ensemble and student wins ("pixel_confidence", train_utils.py:144-180).
3. Loss: ½ (CE + Dice over all classes, squared denominators) on labeled + λ(t) · CE(student on the second view,
   pseudo-labels with confidence ≥ 0.8), λ(t) = 2.0 · ramp(t // 150, 40).
   EMA: α = 0 while t // 2 < 40, then min(1 − 1/(t // 2 − 40 + 1), 0.99), on parameters and BatchNorm buffers.

Every random draw of the method (periods, CutMix permutation and boxes, the strong view's parameters and noise)
comes from one `numpy.random.RandomState` seeded with the run's seed, drawn in the order and with the calls of the
official code (so the parity tests feed both sides the same draws); its state and the RPA state are buffers of
the method, so checkpoints resume the same sequence. Differences to the code: docs/fidelity.md#ad-mt-ad-mt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import backbone_kwargs, ramped_weight
from textseg_cli.models.vnet import VNet

CONFLICT_MODES = ("pixel_confidence", "random", "always_tea", "always_stu")


# ----------------------------------------------------------------------------------------------------------
# CCM: the entropy-weighted teacher ensemble and the teacher/student compromise


def entropy_ensemble(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The teachers' softmax maps (B, K, *spatial) averaged with per-voxel weights exp(−H₁)/(exp(−H₁)+exp(−H₂)),
    H = −Σ p log₂(p + 1e-10), then p^(1/T) renormalised (train_post_3d_aut.py:227-237)."""
    h1 = -(p1 * torch.log2(p1 + 1e-10)).sum(1)
    h2 = -(p2 * torch.log2(p2 + 1e-10)).sum(1)
    w1 = torch.exp(-h1) / (torch.exp(-h1) + torch.exp(-h2))
    mixed = w1.unsqueeze(1) * p1 + (1 - w1).unsqueeze(1) * p2
    mixed = torch.pow(mixed, 1.0 / temperature)
    return mixed / mixed.sum(1, keepdim=True)


def compromise(label_t: torch.Tensor, conf_t: torch.Tensor, label_s: torch.Tensor, conf_s: torch.Tensor,
               mode: str, teacher_conflict: torch.Tensor | None, coin: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and confidences after the teacher/student compromise (train_utils.py:144-180): on voxels where
    the ensemble and the student disagree (and, given `teacher_conflict`, the two teachers disagree too) take the
    student's label when `mode` says so: pixel_confidence where the student is more confident, always_stu always,
    random everywhere there when `coin` < 0.5, always_tea never."""
    label, conf = label_t.clone(), conf_t.clone()
    conflict = label_t != label_s
    if teacher_conflict is not None:
        conflict = conflict & teacher_conflict
    if mode == "pixel_confidence":
        take = (conf_s > conf_t) & conflict
    elif mode == "always_stu" or (mode == "random" and coin is not None and coin < 0.5):
        take = conflict
    else:  # always_tea, or random with coin ≥ 0.5
        return label, conf
    label[take] = label_s[take]
    conf[take] = conf_s[take]
    return label, conf


def _f32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 outputs (autocast); float64 stays (the parity tests run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the voxels where `keep` (the code's ignore_index=-100, reduction="mean");
    0 when no voxel is kept (the code's mean would be NaN there)."""
    ce = F.cross_entropy(_f32(logits), torch.where(keep, labels, torch.zeros_like(labels)).long(), reduction="none")
    k = keep.to(ce.dtype)
    return (ce * k).sum() / k.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# Augmentations with the method's draws


def cutmix_3d(rng: np.random.RandomState, image: torch.Tensor, *maps: torch.Tensor) -> list[torch.Tensor]:
    """`cut_mix_3d` of mixaugs.py:115-215: a permutation of the batch, λ ~ Beta(4, 4), per sample a box of
    int(d·√(1−λ)) per axis centred at U{⌊d/8⌋..d−1} (clipped), filled from the permuted sample; `maps`
    (B, *spatial) are mixed alike. Draw order as the code (its torch.randperm here from `rng`)."""
    b = image.shape[0]
    perm = rng.permutation(b)
    lam = rng.beta(4, 4)
    spatial = image.shape[2:]
    cut = [int(d * np.sqrt(1.0 - lam)) for d in spatial]
    centres = [rng.randint(int(d / 8), d, size=b) for d in spatial]
    lo = [np.clip(c - s // 2, 0, d) for c, s, d in zip(centres, cut, spatial)]
    hi = [np.clip(c + s // 2, 0, d) for c, s, d in zip(centres, cut, spatial)]
    outs = [image.clone(), *(m.clone() for m in maps)]
    srcs = [image, *maps]
    for i in range(b):
        box = tuple(slice(int(a[i]), int(z[i])) for a, z in zip(lo, hi))
        j = int(perm[i])
        outs[0][(i, slice(None)) + box] = srcs[0][(j, slice(None)) + box]
        for out, src in zip(outs[1:], srcs[1:]):
            out[(i,) + box] = src[(j,) + box]
    return outs


def strong_view(rng: np.random.RandomState, image: torch.Tensor, hp: dict[str, Any]) -> torch.Tensor:
    """The strong view of WeakStrongAugment (dataset_3d.py:93-130) on each patch: RandomBrightnessContrast
    (:250-280; min-max normalise, ×(1 + U(±contrast)), + U(±brightness)·mean, clip to [0, 1], back) with
    probability p_color, then RandomGaussianNoise (:235-247; σ ~ U(σ_min, σ_max), clamp(σ·N(0, 1), ±2σ)) with
    probability p_noise. Same draws in the same order as those classes."""
    aug = hp.get("strong_augment") or {}
    c, br = float(aug.get("contrast", 0.5)), float(aug.get("brightness", 0.5))
    p_color, p_noise = float(aug.get("p_color", 0.8)), float(aug.get("p_noise", 0.2))
    s_lo, s_hi = (float(s) for s in aug.get("noise_sigma", (0.1, 1.0)))
    out = []
    for img in image.float():
        alpha = 1.0 + rng.uniform(-c, c)
        beta = rng.uniform(-br, br)
        if rng.uniform() < p_color:
            lo, hi = img.min(), img.max()
            span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant patch stays as it is
            norm = ((img - lo) / span).double().mul(alpha).float()  # float32 image × float64 factor, as numpy
            norm = (norm + beta * norm.mean()).clamp(0.0, 1.0)
            img = norm * span + lo
        sigma = rng.uniform(min(s_lo, s_hi), max(s_lo, s_hi))
        if rng.uniform() < p_noise:
            noise = np.clip(sigma * rng.randn(*img.shape), -2 * sigma, 2 * sigma)
            img = (img.double() + torch.from_numpy(noise).to(img.device)).float()
        out.append(img)
    return torch.stack(out).to(image.dtype)


# ----------------------------------------------------------------------------------------------------------
# The method


@register_method("ad-mt")
class ADMT(Method):
    paper = "Zhao et al., Alternate diverse teaching for semi-supervised medical image segmentation, ECCV 2024"
    display_name = "AD-MT"
    official_code = "ZhenZHAO/AD-MT code/train_post_3d_aut.py"
    official_commit = "03ef84c79ae4db884133293cba647c571dbce25b"
    ledger = "docs/fidelity.md#ad-mt-ad-mt"
    protocol_lcc = "ZhenZHAO/AD-MT code/test_performance_3d.py:17 (--nms default 1)"
    dims = (3,)
    dims_note = "the 3D script (train_post_3d_aut.py); the 2D ACDC script trains a U-Net"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        hp = self.hparams
        mode = str(hp.get("conflict_mode", "pixel_confidence"))
        if mode not in CONFLICT_MODES:
            raise ConfigError(f"method.conflict_mode {mode!r}: expected one of {', '.join(CONFLICT_MODES)}")
        if int(hp.get("period", 19)) < 1:
            raise ConfigError(f"method.period must be ≥ 1, got {hp.get('period')}")
        # three independent initialisations in this order, as the script's create_model calls (:85-87)
        self.student = VNet(in_channels, num_classes, dim=dim, **backbone_kwargs(hp))
        self.teacher1 = VNet(in_channels, num_classes, dim=dim, **backbone_kwargs(hp))
        self.teacher2 = VNet(in_channels, num_classes, dim=dim, **backbone_kwargs(hp))
        for t in (self.teacher1, self.teacher2):
            for p in t.parameters():
                p.requires_grad_(False)
        seed = int(cfg.get("seed") or 0) if isinstance(cfg, dict) else 0
        self.rng = np.random.RandomState(seed % 2**32)
        # RPA state (train_utils.py:12-21): T₁ active first, first period drawn at construction
        self.active_first, self.counter = True, 0
        self.period = self._draw_period()
        # checkpointed mirrors of the Python-side state (written before state_dict, read after load_state_dict)
        self.register_buffer("rpa_state", torch.zeros(3, dtype=torch.long))
        self.register_buffer("rng_keys", torch.zeros(627, dtype=torch.long))
        self.register_buffer("rng_gauss", torch.zeros((), dtype=torch.float64))
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module._mirror_state())
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._restore_state())
        self._mirror_state()

    # --- state ---------------------------------------------------------------------------------
    def _draw_period(self) -> int:
        """U{1..period} (np.random.randint(1, period + 1)); without `period_random` the code's fixed mode, whose
        period is its flag True = 1 (train_utils.py:21): the teachers alternate every step."""
        if not bool(self.hparams.get("period_random", True)):
            return 1
        return int(self.rng.randint(1, int(self.hparams.get("period", 19)) + 1))

    @torch.no_grad()
    def _mirror_state(self) -> None:
        _, keys, pos, has_gauss, gauss = self.rng.get_state(legacy=True)
        self.rpa_state.copy_(torch.tensor([int(self.active_first), self.counter, self.period]))
        self.rng_keys.copy_(torch.from_numpy(np.concatenate([keys.astype(np.int64), [pos, has_gauss, 1]])))
        self.rng_gauss.fill_(float(gauss))

    def _restore_state(self) -> None:
        if int(self.rng_keys[-1]) != 1:  # never written (an old or foreign state dict): keep the seeded state
            return
        raw = self.rng_keys.cpu().numpy()
        self.rng.set_state(("MT19937", raw[:624].astype(np.uint32), int(raw[624]), int(raw[625]),
                            float(self.rng_gauss)))
        flag, counter, period = (int(v) for v in self.rpa_state.cpu())
        self.active_first, self.counter, self.period = bool(flag), counter, period

    def networks(self):
        return {"student": self.student}  # the two teachers are EMA copies of the same size

    # --- training --------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        if bu == 0:
            raise ConfigError("method ad-mt needs unlabeled patches (train.batch_unlabeled ≥ 1)")
        u = batch.image_u
        # the active teacher in train mode, the other in eval mode (:207-212)
        self.teacher1.train(self.active_first)
        self.teacher2.train(not self.active_first)
        strong = strong_view(self.rng, u, hp) if self.active_first else None  # the loader's view (T₁ periods)
        with torch.no_grad():
            p1 = torch.softmax(_f32(self.teacher1(u)), 1)
            p2 = torch.softmax(_f32(self.teacher2(u)), 1)
            teacher_conflict = p1.argmax(1) != p2.argmax(1)
            ens = entropy_ensemble(p1, p2, float(hp.get("ensemble_temperature", 1.0)))
            conf, label = ens.max(1)
        if not self.active_first:  # T₂ periods: CutMix of the weak view with its pseudo-labels (:259-278)
            if self.rng.random_sample() < float(hp.get("cutmix_prob", 1.0)):
                strong, label, conf, teacher_conflict = cutmix_3d(self.rng, u, label, conf, teacher_conflict)
            else:
                strong = u.clone()
        logits = _f32(self.student(torch.cat([batch.image_l, u, strong])))
        pred_l, pred_w, pred_s = logits[:bl], logits[bl:bl + bu], logits[bl + bu:]
        with torch.no_grad():
            conf_s, label_s = torch.softmax(pred_w.detach(), 1).max(1)
        ce = F.cross_entropy(pred_l, batch.label_l.long())
        dice = dice_loss(torch.softmax(pred_l, 1), batch.label_l, include_background=True, squared=True)
        loss_l = (ce + dice) / 2.0
        thr = float(hp.get("conf_threshold", 0.8))
        high_ratio = (conf >= thr).float().mean()  # before the compromise, as the code's log (:297-298)
        mode = str(hp.get("conflict_mode", "pixel_confidence"))
        coin = self.rng.random_sample() if mode == "random" else None
        label, conf = compromise(label, conf, label_s, conf_s, mode,
                                 None if bool(hp.get("conflict_student_more", False)) else teacher_conflict, coin)
        keep = conf >= thr
        w_conflict = float(hp.get("conflict_weight", 1.0))
        if w_conflict == 1.0:  # :332-335
            loss_u = masked_ce(pred_s, label, keep)
            consist = conflict_term = torch.zeros((), device=loss_u.device)
        else:  # :310-329: consistent and conflicting voxels (of the two teachers) weighted apart
            consist = masked_ce(pred_s, label, keep & ~teacher_conflict)
            conflict_term = masked_ce(pred_s, label, keep & teacher_conflict) if w_conflict != 0 else consist * 0
            loss_u = consist + w_conflict * conflict_term if float(conflict_term) > 0.0 else consist
        w = ramped_weight(hp, ctx.iteration, 2.0, 40)
        return {"loss": loss_l + w * loss_u, "loss_l": loss_l.detach(), "loss_ce": ce.detach(),
                "loss_dice": dice.detach(), "loss_u": loss_u.detach(), "loss_u_consist": consist.detach(),
                "loss_u_conflict": conflict_term.detach(), "consistency_weight": torch.tensor(w),
                "high_ratio": high_ratio.detach(), "teacher_conflict_fraction": teacher_conflict.float().mean(),
                "active_teacher": torch.tensor(1.0 if self.active_first else 2.0)}

    def ema_alpha(self, iteration: int) -> float:
        """The decay of update_ema_variables (:40-45) at the script's global_step = iteration // 2 (:353-355):
        0 while it is below the consistency ramp length (40), then min(1 − 1/(step − 40 + 1), ema_decay)."""
        step = iteration // 2
        ramp = float((self.hparams.get("consistency") or {}).get("rampup", 40))
        if step < ramp:
            return 0.0
        return min(1.0 - 1.0 / (step - ramp + 1), float(self.hparams.get("ema_decay", 0.99)))

    @torch.no_grad()
    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        teacher = self.teacher1 if self.active_first else self.teacher2
        ema_with_buffers(teacher, self.student, self.ema_alpha(ctx.iteration))
        # AlternateUpdate.update (train_utils.py:53-60)
        self.counter += 1
        if self.counter >= self.period:
            self.active_first, self.counter = not self.active_first, 0
            if bool(self.hparams.get("period_random", True)):
                self.period = self._draw_period()

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        """The student (test_3d.sh: --flag_check_with_best_stu); "teacher"/1 = T₁ (the teacher the script
        validates and saves, :420-448), "teacher2"/2 = T₂."""
        decoder = self.hparams.get("eval_decoder", "student") if decoder is None else decoder
        if decoder in ("teacher", "teacher1", 1, "1"):
            return self.teacher1(x)
        if decoder in ("teacher2", 2, "2"):
            return self.teacher2(x)
        if decoder not in ("student", 0, "0"):
            raise ConfigError(f"decoder {decoder!r}: ad-mt predicts with student, teacher (1) or teacher2 (2)")
        return self.student(x)


@torch.no_grad()
def ema_with_buffers(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher ← α·teacher + (1−α)·student on the parameters and on every buffer (BatchNorm running statistics;
    update_ema_variables, train_post_3d_aut.py:47-53). Integer buffers (num_batches_tracked, unused with BatchNorm's
    fixed momentum) keep their dtype."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for s, t in zip(student.buffers(), teacher.buffers()):
        t.copy_(t * alpha + s * (1.0 - alpha))

"""AD-MT in the default suite (no official code needed): its packaged config holds the official values, the random
periodic alternation and the EMA warm start follow the code's rules by hand, the conflict-combating ensemble by
hand, a step's terms add up, the method's random state survives a checkpoint, and `textseg train` / `textseg
models` run it. Equality with the official code itself: tests/parity/test_admt_parity.py."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from textseg_cli.data.batch import Batch
from textseg_cli.engine.setup import train
from textseg_cli.methods.admt import compromise, ema_with_buffers, entropy_ensemble
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method, method_class
from textseg_cli.runs.config import build_config

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["method.backbone.n_filters=4"]


def _method(*sets: str, seed: int = 3):
    cfg = build_config("ad-mt", "la", 3, [16, 16, 16], sets=[*TINY, f"seed={seed}", *sets])
    return build_method("ad-mt", cfg, 1, 2, dim=3), cfg


def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 16, 16, 16, generator=g)
    y = (x[:2, 0] > 0.3).long()
    return Batch(x[:2], y, x[2:])


def test_admt_config_holds_the_official_values():
    # cfgs/config_3d_la_aut.yml:13-41, train_post_3d_aut.py:128-129/:362-365, config_3d_pan_aut.yml:40
    la = build_config("ad-mt", "la", 3, [112, 112, 80])
    m = la["method"]
    assert (m["conf_threshold"], m["ema_decay"], m["cutmix_prob"], m["period"], m["period_random"]) == (
        0.8, 0.99, 1.0, 19, True)
    assert m["consistency"] == {"weight": 2.0, "rampup": 40, "per": 150}
    assert (m["conflict_mode"], m["conflict_weight"], m["ensemble_temperature"]) == ("pixel_confidence", 1.0, 1.0)
    assert la["optim"]["schedule"] == "poly" and la["optim"]["poly_power"] == 0.9 and la["optim"]["lr"] == 0.01
    assert (la["optim"]["momentum"], la["optim"]["weight_decay"]) == (0.9, 0.0001)
    assert (la["train"]["iterations"], la["train"]["batch_labeled"], la["train"]["batch_unlabeled"]) == (15000, 2, 2)
    assert la["data"]["augment"]["rotflip"] is True and la["data"]["patch_size"] == [112, 112, 80]
    pan = build_config("ad-mt", "pancreas", 3, [96, 96, 96])
    assert pan["method"]["period"] == 14 and pan["data"]["augment"]["rotflip"] is False
    assert la["published"]["la"]["8"]["dice"] == 90.58 and la["published"]["pancreas"]["20%"]["dice"] == 82.61
    cls = method_class("ad-mt")
    assert cls.display_name == "AD-MT" and "test_performance_3d.py:17" in cls.protocol_lcc
    assert cls.ledger == "docs/fidelity.md#ad-mt-ad-mt" and cls.official_commit.startswith("03ef84c")


def test_admt_random_periodic_alternation_by_hand():
    """train_utils.py:12-60: T₁ active first, a period drawn from U{1..P} at construction and at every switch;
    only the active teacher is EMA-updated (α = 0 before global step 40: a copy of the student)."""
    m, _ = _method("method.period=3", seed=11)
    rs = np.random.RandomState(11)
    period, flag, counter = int(rs.randint(1, 4)), True, 0
    assert (m.period, m.active_first, m.counter) == (period, True, 0)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)  # the student moves away from both teachers
    for it in range(12):
        before = {n: [p.clone() for p in t.parameters()] for n, t in (("1", m.teacher1), ("2", m.teacher2))}
        m.on_after_optimizer_step(StepContext(it, 100, torch.device("cpu")))
        updated, kept = ("1", "2") if flag else ("2", "1")
        t_up = m.teacher1 if updated == "1" else m.teacher2
        assert all(torch.equal(a, s) for a, s in zip(t_up.parameters(), m.student.parameters()))  # α = 0: a copy
        t_kept = m.teacher2 if kept == "2" else m.teacher1
        assert all(torch.equal(a, b) for a, b in zip(t_kept.parameters(), before[kept]))
        counter += 1
        if counter >= period:
            flag, counter, period = not flag, 0, int(rs.randint(1, 4))
        assert (m.active_first, m.counter, m.period) == (flag, counter, period)
    assert m.rng.get_state()[2] == rs.get_state()[2]


def test_admt_ema_warm_start_and_buffers():
    """update_ema_variables (train_post_3d_aut.py:40-53) at global step iteration // 2: α = 0 below 40, then
    min(1 − 1/(step − 40 + 1), 0.99); BatchNorm running statistics are averaged too."""
    m, _ = _method()
    assert [m.ema_alpha(i) for i in (0, 79, 80, 81, 82, 84)] == [0.0, 0.0, 0.0, 0.0, 0.5, 1 - 1 / 3]
    assert m.ema_alpha(2999) == 0.99 and m.ema_alpha(180) == pytest.approx(1 - 1 / 51)
    t, s = m.teacher1, m.student
    with torch.no_grad():
        for b in s.buffers():
            if b.is_floating_point():
                b.fill_(2.0)
        for b in t.buffers():
            if b.is_floating_point():
                b.fill_(1.0)
    ema_with_buffers(t, s, 0.75)
    assert all(torch.allclose(b, torch.full_like(b, 1.25)) for b in t.buffers() if b.is_floating_point())


def test_admt_ccm_ensemble_and_compromise_by_hand():
    p1 = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1, 1)
    p2 = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1, 1)
    h = lambda p: -sum(q * math.log2(q + 1e-10) for q in p)
    w1 = math.exp(-h([0.9, 0.1])) / (math.exp(-h([0.9, 0.1])) + math.exp(-h([0.3, 0.7])))
    want = [w1 * 0.9 + (1 - w1) * 0.3, w1 * 0.1 + (1 - w1) * 0.7]
    got = entropy_ensemble(p1, p2)
    assert got.flatten().tolist() == pytest.approx(want, rel=1e-6)
    sharp = entropy_ensemble(p1, p2, temperature=0.5).flatten()
    assert sharp.tolist() == pytest.approx([want[0] ** 2 / (want[0] ** 2 + want[1] ** 2),
                                            want[1] ** 2 / (want[0] ** 2 + want[1] ** 2)], rel=1e-6)
    # voxels: teachers conflict / student disagrees / student more confident → only the first takes the student
    label_t, conf_t = torch.tensor([0, 0, 0, 0]), torch.tensor([0.6, 0.6, 0.6, 0.9])
    label_s, conf_s = torch.tensor([1, 1, 0, 1]), torch.tensor([0.8, 0.8, 0.8, 0.8])
    teachers = torch.tensor([True, False, True, True])
    lab, conf = compromise(label_t, conf_t, label_s, conf_s, "pixel_confidence", teachers)
    assert lab.tolist() == [1, 0, 0, 0] and conf.tolist() == pytest.approx([0.8, 0.6, 0.6, 0.9])
    lab, _ = compromise(label_t, conf_t, label_s, conf_s, "pixel_confidence", None)  # conflict_student_more
    assert lab.tolist() == [1, 1, 0, 0]
    assert compromise(label_t, conf_t, label_s, conf_s, "always_stu", teachers)[0].tolist() == [1, 0, 0, 1]
    assert compromise(label_t, conf_t, label_s, conf_s, "always_tea", teachers)[0].tolist() == [0, 0, 0, 0]
    assert compromise(label_t, conf_t, label_s, conf_s, "random", teachers, coin=0.7)[0].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("first", [True, False], ids=["teacher1", "teacher2"])
def test_admt_step_terms_add_up(first):
    m, cfg = _method()
    m.active_first = first
    it = 2999
    out = m.training_step(_batch(), StepContext(it, cfg["train"]["iterations"], torch.device("cpu")))
    w = 2.0 * math.exp(-5 * (1 - (it // 150) / 40) ** 2)  # yml:26-27, script:342
    assert float(out["consistency_weight"]) == pytest.approx(w)
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss_l"]) + w * float(out["loss_u"]), rel=1e-6)
    assert float(out["loss_l"]) == pytest.approx((float(out["loss_ce"]) + float(out["loss_dice"])) / 2, rel=1e-6)
    assert float(out["active_teacher"]) == (1.0 if first else 2.0) and math.isfinite(float(out["loss"].detach()))
    out["loss"].backward()
    assert all(p.grad is not None for p in m.student.parameters())
    assert all(p.grad is None for t in (m.teacher1, m.teacher2) for p in t.parameters())


def test_admt_state_survives_a_checkpoint():
    m, _ = _method("method.period=4")
    for it in range(5):
        m.training_step(_batch(it), StepContext(it, 100, torch.device("cpu")))
        m.on_after_optimizer_step(StepContext(it, 100, torch.device("cpu")))
    other, _ = _method("method.period=4", seed=99)  # another seed: its own state is overwritten
    other.load_state_dict(m.state_dict())
    assert (other.active_first, other.counter, other.period) == (m.active_first, m.counter, m.period)
    assert [other.rng.randint(1000) for _ in range(5)] == [m.rng.randint(1000) for _ in range(5)]


def test_admt_train_writes_checkpoints_and_resumes_exactly(synthetic_data, tmp_path):
    code, out = run_cli("train", "--method", "ad-mt", "--data", synthetic_data, "--labeled", "2", "--iterations", "3",
                        "--out", tmp_path / "cli", "--device", "cpu", "--val-every", "0", "--set",
                        "method.backbone.n_filters=4", "--set", "method.period=2")
    assert code == 0, out
    assert (tmp_path / "cli" / "checkpoints" / "last.pt").is_file()

    args = {"labeled": "2", "seed": 5, "device": "cpu", "quiet": True,
            "sets": [*TINY, "method.period=2", "val.every=0", "train.log_every=1",
                     "optim.schedule=constant"]}  # poly would depend on the first run's length
    train("ad-mt", synthetic_data, out=tmp_path / "full", iterations=6, **args)
    train("ad-mt", synthetic_data, out=tmp_path / "cut", iterations=3, **args)
    train(resume=True, out=tmp_path / "cut", iterations=6, quiet=True)

    def losses(run):
        with open(run / "log.csv", newline="") as f:
            return {int(r["iteration"]): (float(r["loss"]), float(r["active_teacher"])) for r in csv.DictReader(f)}

    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == sorted(full) == list(range(1, 7))
    assert {t for _, t in full.values()} == {1.0, 2.0}  # both teachers took turns
    for i in full:
        assert cut[i][1] == full[i][1] and cut[i][0] == pytest.approx(full[i][0], rel=1e-5, abs=1e-6), i


def test_models_lists_ad_mt_with_its_parameter_counts():
    code, out = run_cli("models", "--in-channels", "1", "--classes", "2", "--patch", "112,112,80")
    assert code == 0, out
    line = next(line for line in out.splitlines() if "ad-mt" in line)
    assert "9,448,866" in line  # the student V-Net; the two teachers are EMA copies (28,346,598 in all)


def test_admt_text_addon_gives_both_teachers_an_ema_fusion(tmp_path):
    """`--text tmr+csa` on AD-MT: the student's bottleneck gets TMR, each of the two teachers its own copy, which
    follows the student's only while that teacher is the active one (α = 0 here: a copy)."""
    from method_matrix import SPECS, batch, build, write_inputs

    from textseg_cli.methods.text_addon import TextEncoder

    spec = next(s for s in SPECS if s.id == "ad-mt+tmr+csa")
    m = build(spec, write_inputs(tmp_path))
    base = m.base
    assert all(isinstance(n.encoder, TextEncoder) and n.encoder.fusion is not None
               for n in (base.student, base.teacher1, base.teacher2))
    out = m.training_step(batch(spec), StepContext(0, 300, torch.device("cpu")))
    assert "loss_csa" in out and math.isfinite(float(out["loss"].detach()))
    out["loss"].backward()
    assert all(p.grad is not None for p in base.student.encoder.fusion.parameters())
    with torch.no_grad():
        for p in base.student.encoder.fusion.parameters():
            p.add_(1.0)
    active, idle = (base.teacher1, base.teacher2) if base.active_first else (base.teacher2, base.teacher1)
    idle_before = [p.clone() for p in idle.encoder.fusion.parameters()]
    m.on_after_optimizer_step(StepContext(0, 300, torch.device("cpu")))
    student = list(base.student.encoder.fusion.parameters())
    assert all(torch.equal(a, s) for a, s in zip(active.encoder.fusion.parameters(), student))
    assert all(torch.equal(a, b) for a, b in zip(idle.encoder.fusion.parameters(), idle_before))


def test_admt_text_addon_trains_from_the_cli_and_its_text_path_learns(synthetic_data, tmp_path, monkeypatch):
    """`textseg train --method ad-mt --text tmr+csa`, 2 steps: at each optimiser step every parameter of the
    student's TMR fusion and of the CSA head has a non-zero gradient (read after the step's backward), and the
    log holds a finite CSA term."""
    from method_matrix import write_inputs

    from textseg_cli.methods.text_addon import TextAddon

    seen = []
    original = TextAddon.on_after_optimizer_step

    def spy(self, ctx):
        def ok(params):
            params = list(params)
            return bool(params) and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
        seen.append((ok(self.base.student.encoder.fusion.parameters()), ok(self.csa_heads.parameters()),
                     all(p.grad is None for t in (self.base.teacher1, self.base.teacher2) for p in t.parameters())))
        return original(self, ctx)

    monkeypatch.setattr(TextAddon, "on_after_optimizer_step", spy)
    emb = write_inputs(tmp_path / "inputs")["clip"]
    run = tmp_path / "text"
    code, out = run_cli("train", "--method", "ad-mt", "--data", synthetic_data, "--labeled", "2", "--iterations", "2",
                        "--out", run, "--device", "cpu", "--threads", "1", "--val-every", "0", "--text", "tmr+csa",
                        "--text-embeddings", emb, "--set", "method.backbone.n_filters=4", "--set", "method.period=2",
                        "--set", "train.log_every=1")
    assert code == 0, out
    assert seen == [(True, True, True)] * 2
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(r["loss_csa"])) and float(r["loss_csa"]) > 0 for r in rows)

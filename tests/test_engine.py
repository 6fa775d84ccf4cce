"""Engine: config resolution, sampling, resume exactness, labels of unlabeled cases, NaN handling, load_run."""

import csv
import shutil
import signal

import numpy as np
import pytest
import torch

from textseg_cli.data.sampling import Augment, TwoStreamSampler
from textseg_cli.engine.loop import NonFiniteLossError
from textseg_cli.runs.load import load_run
from textseg_cli.engine.setup import train
from textseg_cli.runs.config import build_config
from textseg_cli.engine.optim import lr_factor
from textseg_cli.errors import ConfigError, DataError, OutputExistsError

TINY = ["method.backbone.n_filters=4", "train.batch_labeled=1", "train.batch_unlabeled=1", "train.log_every=1",
        "train.checkpoint_every=1000"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from textseg_cli.data.prep.synthetic import prep_synthetic

    out = tmp_path_factory.mktemp("syn") / "data"
    prep_synthetic(out, n_cases=7, size=(32, 32, 16), n_val=1, n_test=1, patch_size=(16, 16, 16))
    return out


def _rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- config -----------------------------------------------------------------------------------------

def test_config_layers_and_overrides():
    cfg = build_config("mcnet", "la", 3, None, sets=["optim.lr=0.005", "train.batch_labeled=1",
                                                     "method.consistency.weight=0.3"])
    assert cfg["data"]["patch_size"] == [112, 112, 80]  # defaults.yaml datasets.la
    assert cfg["inference"]["stride"] == [18, 18, 4]
    assert cfg["optim"]["lr"] == 0.005 and cfg["train"]["batch_labeled"] == 1
    assert cfg["method"]["consistency"] == {"weight": 0.3, "rampup": 40, "per": 150, "temperature": 0.1,
                                            "detach_target": False}
    assert cfg["method"]["up_modes"] == [0, 1] and cfg["train"]["iterations"] == 15000
    plus = build_config("mcnet+", "pancreas", 3, None)
    assert plus["method"]["up_modes"] == [0, 1, 2] and plus["inference"]["stride"] == [16, 16, 16]
    own = build_config("sup", "mydata", 3, [64, 64, 32])
    assert own["data"]["patch_size"] == [64, 64, 32] and own["inference"]["stride"] == [32, 32, 16]
    assert build_config("sup", "x", 3, [64, 64, 32], sets=["data.patch_size=32,32,16"])["data"]["patch_size"] == [32, 32, 16]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="optim.lrr"):
        build_config("mcnet", "la", 3, None, sets=["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="test split is refused"):
        build_config("mcnet", "la", 3, None, sets=["val.split=test"])
    with pytest.raises(ConfigError, match="optim.schedule"):
        build_config("mcnet", "la", 3, None, sets=["optim.schedule=cosine"])
    with pytest.raises(ConfigError, match="data.patch_size"):
        build_config("mcnet", "la", 3, None, sets=["data.patch_size=16,16"])


def test_lr_schedules():
    o = {"schedule": "constant"}
    assert lr_factor(500, 1000, o) == 1.0
    assert lr_factor(500, 1000, {"schedule": "poly", "poly_power": 0.9}) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(5000, 6000, {"schedule": "step", "step_size": 2500, "step_gamma": 0.1}) == pytest.approx(0.01)
    assert lr_factor(250, 1000, {"schedule": "linear"}) == pytest.approx(0.75)
    # Text-SemiSeg's trainer.py:222 sets lr(t − 1) after step t: steps 0 and 1 at the base lr, step t at 1 − (t − 1)/T
    lin1 = {"schedule": "linear", "step_offset": 1}
    assert [lr_factor(t, 1000, lin1) for t in (0, 1, 251)] == [1.0, 1.0, pytest.approx(0.75)]
    # URPC's 3D script (SSL4MIS :208 before :212) does the same with poly; MCF steps after its step 2,501
    poly1 = {"schedule": "poly", "poly_power": 0.9, "step_offset": 1}
    assert [lr_factor(t, 1000, poly1) for t in (0, 1, 501)] == [1.0, 1.0, pytest.approx(0.5 ** 0.9)]
    step1 = {"schedule": "step", "step_size": 2500, "step_gamma": 0.1, "step_offset": 1}
    assert [lr_factor(t, 6000, step1) for t in (2500, 2501, 5001)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]
    assert lr_factor(4, 1000, {"schedule": "constant", "warmup_iterations": 10}) == pytest.approx(0.5)


# --- sampling ---------------------------------------------------------------------------------------

def test_sampler_pads_crops_and_restores_state():
    rng = np.random.default_rng(0)
    imgs = [rng.normal(size=(1, 20, 12, 9)).astype(np.float32) for _ in range(3)]
    labs = [(i[0] > 0).astype(np.uint8) for i in imgs]
    unl = [rng.normal(size=(1, 24, 24, 24)).astype(np.float32) for _ in range(2)]
    s = TwoStreamSampler(imgs, labs, unl, (16, 16, 8), 2, 3, seed=[1, 0], augment=Augment(flip=True, rot90=True))
    b = s.next_batch()
    assert b.image_l.shape == (2, 1, 16, 16, 8) and b.label_l.shape == (2, 16, 16, 8)
    assert b.image_u.shape == (3, 1, 16, 16, 8) and b.label_l.dtype == torch.long
    # labels stay aligned with images through crops, rotations and flips
    assert torch.equal((b.image_l[:, 0] > 0).long() & (b.image_l[:, 0] != 0).long(), b.label_l)
    state = s.state_dict()
    nxt = [s.next_batch() for _ in range(4)]
    s.load_state_dict(state)
    again = [s.next_batch() for _ in range(4)]
    for a, c in zip(nxt, again):
        assert torch.equal(a.image_l, c.image_l) and torch.equal(a.image_u, c.image_u) and a.ids_l == c.ids_l
    # each labeled pass visits every case once
    fresh = TwoStreamSampler(imgs, labs, unl, (16, 16, 8), 2, 3, seed=[2, 0])
    seen = [cid for _ in range(3) for cid in fresh.next_batch().ids_l]
    assert sorted(seen) == sorted(["0", "0", "1", "1", "2", "2"])


# --- training runs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [[], ["optim.schedule=poly"], ["optim.schedule=step", "optim.step_size=3"]],
                         ids=["constant", "poly", "step"])
def test_resume_continues_the_loss_curve_exactly(tiny_data, tmp_path, monkeypatch, schedule):
    # poly/step: a resume that skipped the scheduler's state would restart the lr curve (issue 20)
    args = dict(labeled="2", iterations=8, seed=3, device="cpu", quiet=True, sets=TINY + ["val.every=0"] + schedule)
    train("mcnet", tiny_data, out=tmp_path / "full", **args)
    full = {int(r["iteration"]): float(r["loss"]) for r in _rows(tmp_path / "full")}
    full_lr = {int(r["iteration"]): float(r["lr"]) for r in _rows(tmp_path / "full")}
    if schedule:
        assert full_lr[8] < full_lr[5] < full_lr[1]
    assert sorted(full) == list(range(1, 9))

    calls = {"n": 0}
    real = TwoStreamSampler.next_batch

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 5:  # Ctrl-C while step 5 runs: the engine finishes it, saves and stops
            signal.raise_signal(signal.SIGINT)
        return real(self)

    monkeypatch.setattr(TwoStreamSampler, "next_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train("mcnet", tiny_data, out=tmp_path / "cut", **args)
    monkeypatch.setattr(TwoStreamSampler, "next_batch", real)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 5
    train(resume=True, out=tmp_path / "cut", quiet=True)
    rows = _rows(tmp_path / "cut")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 9))
    for r in rows:
        assert float(r["loss"]) == pytest.approx(full[int(r["iteration"])], rel=1e-5, abs=1e-6)
        assert float(r["lr"]) == pytest.approx(full_lr[int(r["iteration"])], rel=1e-9)


def test_resume_loads_the_checkpoint_to_cpu_whatever_the_run_device(tiny_data, tmp_path, monkeypatch):
    """On CUDA, `map_location=device` put the RNG states on the GPU, and `torch.set_rng_state` needs a CPU
    ByteTensor. Stand-in: the trainer's device reads as `meta` while resuming; only a CPU load survives."""
    from textseg_cli.runs import checkpoint as ckmod
    from textseg_cli.engine.loop import Trainer

    args = dict(labeled="2", seed=3, device="cpu", quiet=True, sets=TINY + ["val.every=0"])
    train("mcnet", tiny_data, out=tmp_path / "run", iterations=2, **args)
    seen, real_load, real_resume = [], ckmod.torch.load, Trainer._resume

    def recording_load(*a, **k):
        seen.append(str(k.get("map_location")))
        return real_load(*a, **k)

    def resume_on_stand_in(self, path):
        dev, self.device = self.device, torch.device("meta")
        try:
            real_resume(self, path)
        finally:
            self.device = dev

    monkeypatch.setattr(ckmod.torch, "load", recording_load)
    monkeypatch.setattr(Trainer, "_resume", resume_on_stand_in)
    res = train(resume=True, out=tmp_path / "run", iterations=3, quiet=True)
    assert res.iteration == 3 and seen == ["cpu"]
    assert torch.get_rng_state().device.type == "cpu"


def test_unlabeled_labels_are_never_read(tiny_data, tmp_path):
    import json

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    spec = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    unlabeled = spec["splits"]["train"][2:]
    for cid in unlabeled:
        (data / "labels" / f"{cid}.nii.gz").unlink()  # dataset.json still lists them: reading would fail
    res = train("mcnet", data, labeled="2", iterations=3, out=tmp_path / "run", device="cpu", quiet=True,
                sets=TINY + ["val.every=3"])
    assert res.iteration == 3
    cases = json.loads((tmp_path / "run" / "cases.json").read_text(encoding="utf-8"))
    assert cases["unlabeled"] == unlabeled and cases["val"] == spec["splits"]["val"]
    with pytest.raises(DataError, match="label file is missing"):  # the deletion really removed needed labels
        train("mcnet", data, labeled="4", iterations=1, out=tmp_path / "run2", device="cpu", quiet=True, sets=TINY)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    from textseg_cli.methods.mcnet import MCNet

    real = MCNet.training_step

    def poisoned(self, batch, ctx):
        out = real(self, batch, ctx)
        if ctx.iteration == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MCNet, "training_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="iteration 4.*last good checkpoint"):
        train("mcnet", tiny_data, labeled="2", iterations=6, out=run, device="cpu", quiet=True,
              sets=TINY + ["train.checkpoint_every=2", "val.every=0"])
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())


def test_outputs_guarded_and_load_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    res = train("sup", tiny_data, labeled="2", iterations=2, out=run, device="cpu", quiet=True,
                sets=TINY + ["val.every=2", "train.batch_labeled=2"])
    assert (run / "config.yaml").exists() and (run / "env.json").exists()
    assert (run / "checkpoints" / "best.pt").exists() and res.best_iteration == 2
    with pytest.raises(OutputExistsError):
        train("sup", tiny_data, labeled="2", iterations=2, out=run, device="cpu", quiet=True, sets=TINY)
    loaded = load_run(run, "best")
    assert not loaded.method.training and loaded.iteration == 2 and loaded.checkpoint_rule == "best"
    assert loaded.config["method"]["name"] == "sup" and loaded.dataset.name == "synthetic"
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    for k, v in loaded.method.state_dict().items():
        assert torch.equal(v, ckpt["method"][k])
    import json

    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    assert env["seed"] == 1337 and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert json.loads((run / "cases.json").read_text(encoding="utf-8"))["unused_unlabeled"]  # sup never loads unlabeled cases


def test_mcnet_loss_terms_and_decoder_selection():
    import math

    from textseg_cli.methods.losses import sharpen
    from textseg_cli.data.batch import Batch
    from textseg_cli.methods.base import StepContext
    from textseg_cli.methods.registry import build_method

    cfg = build_config("mcnet+", "synthetic", 3, [16, 16, 16], sets=["method.backbone.n_filters=4"])
    torch.manual_seed(0)
    m = build_method("mcnet+", cfg, 1, 2).eval()  # eval: no dropout, so outputs are reproducible
    batch = Batch(torch.randn(1, 1, 16, 16, 16), torch.randint(0, 2, (1, 16, 16, 16)), torch.randn(1, 1, 16, 16, 16))
    out = m.training_step(batch, StepContext(iteration=299, max_iterations=1000, device=torch.device("cpu")))
    w = math.exp(-5 * (1 - 2 / 40) ** 2)  # step 300 → 300 // 150 = 2
    assert out["consistency_weight"].item() == pytest.approx(w)
    assert out["loss"].item() == pytest.approx(0.5 * out["loss_dice"].item() + w * out["loss_consistency"].item(),
                                               rel=1e-5)
    with torch.no_grad():
        probs = [torch.softmax(o, 1) for o in m.net(torch.cat([batch.image_l, batch.image_u]))]
        cons = sum(((probs[i] - sharpen(probs[j], 0.1)) ** 2).mean() for i in range(3) for j in range(3) if i != j)
        assert out["loss_consistency"].item() == pytest.approx(cons.item(), rel=1e-5)
        x = batch.image_l
        assert torch.allclose(m.predict_proba(x, 1), probs[1][:1], atol=1e-6)
        assert torch.allclose(m.predict_proba(x, "mean"), sum(p[:1] for p in probs) / 3, atol=1e-6)
        assert torch.allclose(m.predict_proba(x), probs[0][:1], atol=1e-6)  # default: decoder 0
    with pytest.raises(ConfigError, match="decoders 0..2"):
        m.predict_logits(x, 3)


def test_deterministic_runs_warn_on_ops_without_a_deterministic_kernel(tiny_data, tmp_path, monkeypatch):
    """On CUDA, cross-entropy, trilinear upsampling backward, grid_sample backward... have no deterministic
    kernel: `use_deterministic_algorithms(True)` without warn_only stopped every method at step 1. CPU
    stand-in: `put_` has no deterministic kernel on any device, so it raises or warns just the same."""
    import json
    import warnings

    from textseg_cli.runtime.determinism import CUDA_NONDETERMINISTIC_OPS
    from textseg_cli.methods.mcnet import MCNet

    real = MCNet.training_step

    def step_with_a_nondeterministic_op(self, batch, ctx):
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return real(self, batch, ctx)

    monkeypatch.setattr(MCNet, "training_step", step_with_a_nondeterministic_op)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = train("mcnet", tiny_data, labeled="2", iterations=2, out=tmp_path / "run", device="cpu", quiet=True,
                        deterministic=True, sets=TINY + ["val.every=0"])
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    assert res.iteration == 2
    assert any("does not have a deterministic implementation" in str(w.message) for w in caught)
    env = json.loads((tmp_path / "run" / "env.json").read_text(encoding="utf-8"))
    assert env["deterministic"] is True and env["deterministic_warn_only"] is True
    assert env["cuda_nondeterministic_ops"] == CUDA_NONDETERMINISTIC_OPS
    assert "grid_sampler_2d_backward_cuda" in env["cuda_nondeterministic_ops"]

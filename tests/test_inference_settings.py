"""InferenceSettings: one default stride everywhere, settings built once per command, precision resolved once."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

from conftest import run_cli
from textseg_cli.bench import benchmark
from textseg_cli.errors import ConfigError
from textseg_cli.inference import predict as predict_mod
from textseg_cli.inference import sliding_window as sw
from textseg_cli.inference.settings import InferenceSettings
from textseg_cli.methods.base import Method
from textseg_cli.runs.config import build_config
from textseg_cli.runtime import precision as P

ODD_PATCH = (75, 33)
CEIL_STRIDE = (38, 17)  # ceil(p / 2); the old p // 2 gave (37, 16) in predict, the whole-volume fallback and bench


class Identity2D(Method):
    """A 1x1 conv 2D method: probabilities of any patch size."""

    name = "identity2d"

    def __init__(self, cfg=None, in_channels=1, num_classes=2, dim=2, **context):
        super().__init__(cfg or {}, in_channels, num_classes, dim=dim, **context)
        self.net = nn.Conv2d(in_channels, num_classes, 1)

    def predict_logits(self, x, decoder=None):
        return self.net(x)


def _record_strides(monkeypatch, module) -> list[tuple[int, ...]]:
    """Spy on `module.sliding_window_inference`: the stride each call ends up with."""
    real, seen = sw.sliding_window_inference, []

    def spy(predict_fn, image, patch_size, stride=None, **kw):
        seen.append(tuple(stride) if stride is not None else sw.default_stride(patch_size))
        return real(predict_fn, image, patch_size, stride, **kw)

    monkeypatch.setattr(module, "sliding_window_inference", spy)
    return seen


def test_an_odd_patch_gets_the_same_default_stride_everywhere(monkeypatch):
    cfg = build_config("mcnet", None, 2, list(ODD_PATCH))
    assert tuple(cfg["inference"]["stride"]) == CEIL_STRIDE  # what the run's config.yaml records
    assert InferenceSettings.from_config(cfg).stride == CEIL_STRIDE
    assert InferenceSettings(patch_size=ODD_PATCH).stride == CEIL_STRIDE

    image = torch.zeros((1, 90, 40))
    seen = _record_strides(monkeypatch, predict_mod)  # predict_case with no stride given
    predict_mod.predict_case(Identity2D(), image, {"patch_size": list(ODD_PATCH)}, "cpu")
    assert seen == [CEIL_STRIDE]

    seen = _record_strides(monkeypatch, sw)  # the pure functions' own defaults
    fn = lambda t: torch.softmax(torch.cat([t, -t], 1), 1)  # noqa: E731
    sw.sliding_window_inference(fn, image, ODD_PATCH)
    with pytest.warns(RuntimeWarning, match="falling back"):
        sw.whole_volume_inference(fn, image, max_voxels=1, patch_size=ODD_PATCH)
    assert seen == [CEIL_STRIDE, CEIL_STRIDE]

    assert benchmark.default_stride(ODD_PATCH) == CEIL_STRIDE
    assert benchmark.default_stride((75, 75, 33)) == (38, 38, 17)
    assert benchmark.default_stride((112, 112, 80)) == (18, 18, 4)  # the papers' explicit strides stay


def test_settings_from_config_apply_the_command_choices():
    cfg = build_config("mcnet", None, 3, [16, 16, 8], sets=["train.amp=false", "inference.sw_batch_size=2"])
    s = InferenceSettings.from_config(cfg, mode="whole", decoder="1", device="cpu")
    assert (s.mode, s.decoder, s.sw_batch_size, s.patch_size, s.stride) == ("whole", 1, 2, (16, 16, 8), (8, 8, 4))
    assert isinstance(s.precision, P.Precision) and s.precision.name == "fp32"  # auto follows train.amp=false
    assert s.record()["precision"] == "fp32" and s.record()["stride"] == [8, 8, 4]
    assert InferenceSettings.from_config(cfg, precision="bf16").precision == "bf16"  # no device: a request
    assert InferenceSettings.from_config(cfg, lcc=True).lcc_source == "--lcc"
    with pytest.raises(ConfigError, match="--inference"):
        InferenceSettings.from_config(cfg, mode="tiles")
    with pytest.raises(ConfigError, match="stride"):
        InferenceSettings(patch_size=(8, 8, 4), stride=(4, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mode = "sliding"


# --- one train / eval / predict: precision resolved once, settings built once --------------------------

def _spy_precision(mp: pytest.MonkeyPatch) -> Counter:
    """Count `resolve_precision` calls by what they resolve ("train.precision", "inference.precision", ...),
    through every textseg_cli module that bound the name."""
    real, calls = P.resolve_precision, Counter()

    def spy(requested, device, what="--precision"):
        calls[what] += 1
        return real(requested, device, what)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("textseg_cli") and getattr(mod, "resolve_precision", None) is real:
            mp.setattr(mod, "resolve_precision", spy)
    return calls


def _spy_settings(mp: pytest.MonkeyPatch, module) -> tuple[list, list]:
    """(settings objects `module.predict_case` received, InferenceSettings.from_config calls)."""
    real_predict, real_from = module.predict_case, InferenceSettings.from_config.__func__
    received, built = [], []

    def predict_spy(method, image, settings, device=None):
        received.append(settings)
        return real_predict(method, image, settings, device)

    def from_config_spy(cls, cfg, **kw):
        built.append(kw)
        return real_from(cls, cfg, **kw)

    mp.setattr(module, "predict_case", predict_spy)
    mp.setattr(InferenceSettings, "from_config", classmethod(from_config_spy))
    return received, built


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    """`textseg train ... --iterations 2 --val-every 1`, with the precision and validation settings spied on."""
    from textseg_cli.evaluation import validation

    run = tmp_path_factory.mktemp("settings") / "run"
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = _spy_precision(mp)
        received, built = _spy_settings(mp, validation)
        code, out = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--labeled", "3",
                            "--iterations", "2", "--val-every", "1", "--out", run, "--device", "cpu",
                            "--set", "method.backbone.n_filters=4")
    assert code == 0, out
    return run, calls, received, built


def test_train_resolves_each_precision_once_and_validates_with_one_settings_object(trained):
    _, calls, received, built = trained
    assert calls == Counter({"train.precision": 1, "inference.precision": 1})
    assert len(built) == 1  # the trainer's validation settings
    assert len(received) == 4  # 2 validations x 2 validation cases
    assert all(s is received[0] for s in received) and isinstance(received[0], InferenceSettings)
    assert isinstance(received[0].precision, P.Precision)


def test_eval_resolves_the_precision_once_and_passes_one_settings_object(trained, tmp_path, monkeypatch):
    from textseg_cli.evaluation import run as run_mod

    run, *_ = trained
    calls = _spy_precision(monkeypatch)
    received, built = _spy_settings(monkeypatch, run_mod)
    code, out = run_cli("eval", run, "--out", tmp_path / "ev", "--checkpoint", "last")
    assert code == 0, out
    assert calls == Counter({"inference.precision": 1})
    assert len(built) == 1 and len(received) == 2  # the two validation cases
    assert all(s is received[0] for s in received) and received[0].stride == (16, 16, 8)


def test_predict_folder_passes_one_settings_object(trained, synthetic_data, tmp_path, monkeypatch):
    run, *_ = trained
    calls = _spy_precision(monkeypatch)
    received, built = _spy_settings(monkeypatch, predict_mod)
    written = predict_mod.predict_folder(run, synthetic_data, tmp_path / "masks", checkpoint="last",
                                         inference="whole")
    assert len(written) == len(received) == 10
    assert len(built) == 1 and all(s is received[0] for s in received) and received[0].mode == "whole"
    assert calls == Counter({"inference.precision": 1})

"""The "add a method" recipe: one module + one YAML beside it make a method that `textseg train`, `textseg models`,
evaluation's LCC, tables and the train flags all know, with no list elsewhere to edit."""

import importlib
import sys

import pytest
import torch
from conftest import run_cli

from textseg_cli.errors import ConfigError
from textseg_cli.inference.protocol import resolve_lcc
from textseg_cli.methods.fidelity import fidelity_rows
from textseg_cli.methods.flags import text_flag_sets
from textseg_cli.methods.registry import METHODS, display_name, list_methods, protocol_lcc
from textseg_cli.runs.config import build_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_MODULE = '''"""A method defined outside the package: the whole of it."""
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.methods.base import Method
from textseg_cli.methods.registry import register_method


@register_method("toy-recipe")
class ToyRecipe(Method):
    paper = "a one-convolution test method"
    display_name = "Toy (recipe)"
    official_code = "toy/official"
    official_commit = "abc1234"
    ledger = "docs/fidelity.md#toy"
    protocol_lcc = "toy/official test.py:1 (LCC always)"
    cli_flags = {"t1": None}
    config_path = "toy_recipe.yaml"  # beside this module
    needs_unlabeled = False

    def __init__(self, cfg, in_channels, num_classes, dim=3, **context):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        self.net = (nn.Conv3d if dim == 3 else nn.Conv2d)(in_channels, num_classes, 1)

    def training_step(self, batch, ctx):
        logits = self.net(batch.image_l).float()
        return {"loss": float(self.hparams["loss_scale"]) * F.cross_entropy(logits, batch.label_l.long())}

    def predict_logits(self, x, decoder=None):
        return self.net(x)
'''

TOY_CONFIG = """method:
  loss_scale: 0.5      # read by training_step: a KeyError unless this file is the method's config
train: {batch_labeled: 1, batch_unlabeled: 0}
val: {every: 0}
"""


@pytest.fixture
def toy_method(tmp_path):
    """Write the toy module and its YAML into a folder, import it from there; unregister it afterwards."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "toy_recipe_method.py").write_text(TOY_MODULE, encoding="utf-8")
    (folder / "toy_recipe.yaml").write_text(TOY_CONFIG, encoding="utf-8")
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("toy_recipe_method")
        yield module.ToyRecipe
    finally:
        METHODS.pop("toy-recipe", None)
        sys.modules.pop("toy_recipe_method", None)
        sys.path.remove(str(folder))


def test_toy_method_trains_from_the_cli_with_its_own_config(toy_method, synthetic_data, tmp_path):
    run = tmp_path / "run"
    code, out = run_cli("train", "--method", "toy-recipe", "--data", synthetic_data, "--iterations", "2",
                        "--device", "cpu", "--out", run)
    assert code == 0, out
    assert (run / "checkpoints" / "last.pt").is_file()
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert saved["method_name"] == "toy-recipe" and set(saved["method"]) == {"net.weight", "net.bias"}
    cfg = (run / "config.yaml").read_text(encoding="utf-8")
    assert "loss_scale: 0.5" in cfg and "batch_unlabeled: 0" in cfg


def test_toy_method_describes_itself(toy_method, synthetic_data):
    assert "toy-recipe" in list_methods()
    assert display_name("toy-recipe") == "Toy (recipe)"
    assert fidelity_rows(["toy-recipe"]) == [("toy-recipe", "toy/official", "abc1234", "docs/fidelity.md#toy")]
    assert protocol_lcc("toy-recipe") == "toy/official test.py:1 (LCC always)"
    assert resolve_lcc(None, "toy-recipe") == (True, "method protocol: toy/official test.py:1 (LCC always)")
    assert resolve_lcc(False, "toy-recipe")[0] is False
    cfg = build_config("toy-recipe", "synthetic", 3, [32, 32, 16])
    assert cfg["method"]["loss_scale"] == 0.5 and cfg["train"]["batch_unlabeled"] == 0
    # the flags it declares are accepted, and now named among the methods a flag applies to
    assert text_flag_sets("toy-recipe", t1=0.7) == ["method.t1=0.7"]
    with pytest.raises(ConfigError, match="--t1 applies to llm-segnet, toy-recipe, not to 'mcnet'"):
        text_flag_sets("mcnet", t1=0.7)
    code, out = run_cli("models", "--fidelity")
    assert code == 0 and "toy-recipe" in out and "toy/official" in out and "abc1234" in out


def test_a_missing_config_path_is_an_error(toy_method, monkeypatch):
    monkeypatch.setattr(toy_method, "config_path", "missing.yaml")
    with pytest.raises(ConfigError, match="config file of method 'toy-recipe' not found"):
        build_config("toy-recipe", "synthetic", 3, [32, 32, 16])


def test_shipped_methods_have_no_config_path_and_keep_their_packaged_config():
    from textseg_cli.runs.config import method_config, packaged_config

    for name, cls in list_methods().items():
        assert cls.config_path is None, name
        assert method_config(name) == packaged_config(name)
    assert "toy-recipe" not in list_methods()  # the toy fixture unregistered it

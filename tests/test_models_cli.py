from conftest import run_cli

from textseg_cli.runs.listing import list_models


def test_models_prints_the_published_parameter_counts():
    code, out = run_cli("models", "--in-channels", "1", "--classes", "2", "--patch", "112,112,80")
    assert code == 0, out
    for number in ("9,448,866", "7,376,896", "2,071,970", "12,347,716", "15,246,566"):
        assert number in out
    for name in ("vnet", "vnet_multi", "sup", "mcnet", "mcnet+", "unet2d", "tgcnet (2D)", "frozen"):
        assert name in out
    assert "11,220,833" in out  # tgcnet with ViT-L-14-336, counted at 224×224 in this 3D listing


def test_list_models_rows_and_registry_pickup():
    from textseg_cli.methods.registry import METHODS, register_method
    from textseg_cli.methods.base import Method
    from textseg_cli.models.registry import MODELS, register_model

    import torch.nn as nn

    @register_model("_test_tiny", "a test-only model")
    def _tiny(in_channels=1, num_classes=2, dim=3):
        return nn.Conv3d(in_channels, num_classes, 1)

    @register_method("_test_method")
    class _M(Method):
        paper = "test"

        def __init__(self, cfg, in_channels, num_classes, dim=3, **ctx):
            super().__init__(cfg, in_channels, num_classes, dim, **ctx)
            self.net = nn.Conv3d(in_channels, num_classes, 1)
            self.frozen = nn.Linear(3, 3).requires_grad_(False)

    try:
        rows = list_models(in_channels=4, num_classes=3)
        models = {r["name"]: r for r in rows["models"]}
        methods = {r["name"]: r for r in rows["methods"]}
        assert models["_test_tiny"]["total"] == 4 * 3 + 3
        assert methods["_test_method"]["total"] == 15 + 12 and methods["_test_method"]["trainable"] == 15
        assert models["vnet"]["total"] != 9_448_866  # 4 input channels, 3 classes
        assert methods["mcnet"]["parts"]["net.encoder"] == models["vnet"]["parts"]["encoder"]
        rows2d = list_models(patch_size="64,64")
        assert rows2d["dim"] == 2 and {r["name"]: r for r in rows2d["models"]}["vnet"]["total"] > 0
    finally:
        MODELS.pop("_test_tiny", None)
        METHODS.pop("_test_method", None)


def test_methods_refuse_a_dimensionality_they_do_not_train_on():
    import pytest

    from textseg_cli.runs.config import build_config
    from textseg_cli.errors import ConfigError
    from textseg_cli.methods.registry import build_method

    with pytest.raises(ConfigError, match=r"tgcnet trains on 2D images; this data set has dim 3 \(.*prep slices"):
        build_method("tgcnet", build_config("tgcnet", None, 3, [32, 32, 16]), 1, 2, dim=3)
    with pytest.raises(ConfigError, match=r"text-semiseg trains on 3D images; this data set has dim 2 \(TMR"):
        build_method("text-semiseg", build_config("text-semiseg", None, 2, [32, 32]), 1, 2, dim=2)

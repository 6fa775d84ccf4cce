"""`--inference best` against the references it follows (issue 28): the Gaussian-weighted sliding window equals
`monai.inferers.sliding_window_inference(mode="gaussian", sigma_scale=0.125)` and the mirroring TTA equals nnU-Net
v2's `nnUNetPredictor._internal_maybe_mirror_and_predict`, on the same network and volume.

Tiling: MONAI places windows every `int(roi * (1 - overlap))` voxels and pushes the last one back against the
border (`dense_patch_slices`), and pads an axis shorter than the roi symmetrically with zeros (extra voxel high);
that is textseg's rule (`window_starts`, `symmetric_pad_amounts`) whenever textseg's stride equals MONAI's interval.
With overlap 0.5 and even roi sides the interval is roi / 2 = textseg's default stride, so both tile identically;
the volumes below have sides that are not multiples of the stride and one side shorter than the roi.
These tests need MONAI and nnunetv2 (the `monai` / `nnunet` extras), not the official repositories.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from textseg_cli.inference.predict import predict_case
from textseg_cli.inference.sliding_window import mirror_axes_combinations, mirrored, sliding_window_inference
from textseg_cli.methods.base import Method

monai_inferers = pytest.importorskip("monai.inferers", reason="MONAI is not installed (pip install textseg[monai])")
nnunet_predict = pytest.importorskip("nnunetv2.inference.predict_from_raw_data",
                                     reason="nnunetv2 is not installed (pip install textseg[nnunet])")

FP32 = {"precision": "fp32", "fuse_bn": False, "channels_last": False}


class Net(Method):
    """Two 3x3(x3) convolutions with a ReLU: context-dependent and not flip-symmetric."""

    name = "parity-net"

    def __init__(self, dim=3, in_channels=1, num_classes=3):
        super().__init__({}, in_channels, num_classes, dim=dim)
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        torch.manual_seed(0)
        self.net = nn.Sequential(conv(in_channels, 8, 3, padding=1), nn.ReLU(), conv(8, num_classes, 3, padding=1))

    def predict_logits(self, x, decoder=None):
        return self.net(x)


@pytest.mark.parametrize("shape,roi", [((30, 27, 21), (16, 16, 12)), ((30, 10, 21), (16, 16, 12)),
                                       ((37, 29), (16, 12))], ids=["3d", "3d-short-axis", "2d"])
def test_gaussian_sliding_window_equals_monai(shape, roi):
    net = Net(dim=len(shape)).eval()
    image = torch.randn((1,) + shape, generator=torch.Generator().manual_seed(1))
    stride = tuple(r // 2 for r in roi)  # MONAI's interval int(roi * (1 - 0.5))
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(image[None], roi, 2, net.predict_proba, overlap=0.5,
                                                      mode="gaussian", sigma_scale=0.125, padding_mode="constant",
                                                      cval=0.0)[0]
        ours = sliding_window_inference(net.predict_proba, image, roi, stride, sw_batch_size=2, blend="gaussian")
        const = monai_inferers.sliding_window_inference(image[None], roi, 2, net.predict_proba, overlap=0.5,
                                                        mode="constant")[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # through predict_case with the run's settings (stride left to its default, half the patch)
    got = predict_case(net, image, dict(FP32, patch_size=list(roi), sw_batch_size=3, blend="gaussian"), "cpu")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the papers' constant weights are MONAI's mode="constant"
    paper = predict_case(net, image, dict(FP32, patch_size=list(roi)), "cpu")
    torch.testing.assert_close(paper, const, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, const, atol=1e-4)  # the weighting matters on this network


def _nnunet_mirroring(net: Method, ndim: int):
    """nnU-Net v2's own mirroring: its predictor with our network (returning probabilities, since textseg averages
    softmax probabilities where nnU-Net averages logits) and every spatial axis allowed."""
    predictor = nnunet_predict.nnUNetPredictor(use_mirroring=True, perform_everything_on_device=False,
                                               device=torch.device("cpu"), allow_tqdm=False)
    predictor.network = net.predict_proba
    predictor.allowed_mirroring_axes = tuple(range(ndim))
    return predictor._internal_maybe_mirror_and_predict


@pytest.mark.parametrize("ndim", [3, 2])
def test_mirroring_equals_nnunet(ndim):
    net = Net(dim=ndim).eval()
    x = torch.randn((3, 1) + (12, 10, 8)[:ndim], generator=torch.Generator().manual_seed(2))
    nn_mirror = _nnunet_mirroring(net, ndim)
    assert len(mirror_axes_combinations(ndim)) == 2 ** ndim
    with torch.no_grad():
        ref = nn_mirror(x)
        ours = mirrored(net.predict_proba, ndim, max_batch=2)(x)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    # over a whole volume: textseg's windows with our mirroring == the same windows with nnU-Net's
    image = torch.randn((1,) + (21, 17, 13)[:ndim], generator=torch.Generator().manual_seed(3))
    patch = (8, 8, 6)[:ndim]
    with torch.no_grad():
        ref_vol = sliding_window_inference(nn_mirror, image, patch, sw_batch_size=4, blend="gaussian")
    got = predict_case(net, image, dict(FP32, patch_size=list(patch), sw_batch_size=4, tta=True, blend="gaussian"),
                       "cpu")
    torch.testing.assert_close(got, ref_vol, atol=1e-6, rtol=1e-5)

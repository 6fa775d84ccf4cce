"""Edge cases of the metrics that the mutation check (scripts/mutation.sh metrics) found untested."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from textseg_cli.metrics.case import binary_metrics, check_empty_policy, evaluate_case
from textseg_cli.metrics.postprocess import largest_connected_component, lcc_batch, lcc_per_class
from textseg_cli.metrics.surface import hd95, normalize_spacing


def test_scalar_spacing_applies_to_every_axis():
    np.testing.assert_array_equal(normalize_spacing(2.5, 3), [2.5, 2.5, 2.5])
    assert normalize_spacing(2.5, 3).dtype == np.float64
    np.testing.assert_array_equal(normalize_spacing([1, 2, 3, 9], 3), [1.0, 2.0, 3.0])
    a = np.zeros((9, 9, 9), bool)
    b = np.zeros((9, 9, 9), bool)
    a[2, 2, 2] = True
    b[2, 2, 6] = True
    assert hd95(a, b, spacing=2.0) == pytest.approx(8.0)


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, np.inf, 1.0), (1.0, np.nan, 1.0)])
def test_zero_negative_and_non_finite_spacing_are_refused(spacing):
    with pytest.raises(ValueError, match="positive and finite"):
        normalize_spacing(spacing, 3)
    with pytest.raises(ValueError, match="fewer values"):
        normalize_spacing((1.0, 1.0), 3)


def test_default_policy_is_nan_and_errors_name_the_choices():
    empty, one = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    one[1, 1] = True
    row = binary_metrics(empty, one)
    assert row["dice"] == 0.0 and math.isnan(row["hd95"]) and math.isnan(row["asd"])
    with pytest.raises(ValueError, match="nan, penalty, zero"):
        check_empty_policy("median")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        evaluate_case(one, one, num_classes=1)


def test_lcc_of_single_voxel_components_keeps_one_voxel_not_background():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[4, 4] = True
    kept = largest_connected_component(mask)
    assert kept.sum() == 1 and kept[0, 0]  # ties: first in C order


def test_lcc_per_class_restricted_to_given_classes():
    labels = np.zeros((1, 12), np.uint8)
    labels[0, [0, 1, 2, 5]] = 1  # class 1: a 3-voxel and a 1-voxel component
    labels[0, [8, 10, 11]] = 2  # class 2: a 1-voxel and a 2-voxel component
    only2 = lcc_per_class(labels, classes=[2])
    np.testing.assert_array_equal(only2[0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 2, 2])
    both = lcc_per_class(labels)
    np.testing.assert_array_equal(both[0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 2])


def test_lcc_batch_keeps_dtype_and_device_and_empty_batches():
    t = torch.zeros(2, 6, dtype=torch.int64)
    t[0, [0, 1, 4]] = 1
    out = lcc_batch(t)
    assert out.dtype == torch.int64 and out.device == t.device
    assert out[0].tolist() == [1, 1, 0, 0, 0, 0] and out[1].sum() == 0
    empty = lcc_batch(torch.zeros(0, 6, dtype=torch.uint8))
    assert empty.shape == (0, 6) and empty.dtype == torch.uint8

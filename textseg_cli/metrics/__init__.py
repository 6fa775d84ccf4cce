"""Segmentation metrics equal to `medpy.metric.binary` (dc, jc, hd95, asd), computed with distance
transforms, plus the empty-mask policies and largest-connected-component post-processing.
See docs/evaluation.md for the definitions."""

from textseg_cli.metrics.case import (
           EMPTY_POLICIES,
           binary_metrics,
           evaluate_case,
           image_diagonal,
)
from textseg_cli.metrics.overlap import dice, jaccard
from textseg_cli.metrics.postprocess import (
           largest_connected_component,
           lcc_batch,
           lcc_per_class,
)
from textseg_cli.metrics.surface import asd, hd95, surface_distances

__all__ = ["EMPTY_POLICIES", "asd", "binary_metrics", "dice", "evaluate_case", "hd95", "image_diagonal",
           "jaccard", "largest_connected_component", "lcc_batch", "lcc_per_class", "surface_distances"]

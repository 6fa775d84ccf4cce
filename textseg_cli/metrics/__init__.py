"""Segmentation metrics equal to `medpy.metric.binary` (dc, jc, hd95, asd), computed with distance
transforms, plus the empty-mask policies and largest-connected-component post-processing.
`metrics.table.METRIC_TABLE` is the one list of metrics (name, title, unit, scale, direction, empty-mask values).
See docs/evaluation.md for the definitions."""

from textseg_cli.metrics.case import (
           DEFAULT_EMPTY_POLICY,
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
from textseg_cli.metrics.table import METRIC_TABLE, Metric, metric_names

__all__ = ["DEFAULT_EMPTY_POLICY", "EMPTY_POLICIES", "METRIC_TABLE", "Metric", "asd", "binary_metrics", "dice",
           "evaluate_case", "hd95", "image_diagonal", "jaccard", "largest_connected_component", "lcc_batch",
           "lcc_per_class", "metric_names", "surface_distances"]

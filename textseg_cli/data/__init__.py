"""Data stage: image I/O, the prepared-data format, splits, datasets and sampling."""

from textseg_cli.data.prepared import Case, PreparedDataset, load_prepared

__all__ = ["Case", "PreparedDataset", "load_prepared"]

"""The Python API behind every `textseg` command (notebooks and tests call the same code).

Each command's function is re-exported here; see each function's docstring.
"""

from __future__ import annotations

from textseg_cli.data.prepared import PreparedDataset, load_prepared  # noqa: F401

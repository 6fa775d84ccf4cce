"""The Python API behind every `textseg` command (notebooks and tests call the same code).

Each command's function is re-exported here; see each function's docstring.
"""

from __future__ import annotations

from textseg_cli.bench.benchmark import run_benchmark  # noqa: F401  (textseg bench)
from textseg_cli.data.prep.brats import prep_brats  # noqa: F401  (textseg prep brats)
from textseg_cli.data.prep.custom import prep_custom  # noqa: F401  (textseg prep custom)
from textseg_cli.data.prep.la import prep_la  # noqa: F401  (textseg prep la)
from textseg_cli.data.prep.lvit import prep_lvit  # noqa: F401  (textseg prep lvit)
from textseg_cli.data.prep.msd import prep_lung, prep_msd  # noqa: F401  (textseg prep msd / lung)
from textseg_cli.data.prep.nnunet import export_data, prep_nnunet  # noqa: F401  (export-data, prep nnunet)
from textseg_cli.data.prep.pancreas import prep_pancreas  # noqa: F401  (textseg prep pancreas)
from textseg_cli.data.prep.slices import prep_slices, restack_pairs  # noqa: F401  (textseg prep slices)
from textseg_cli.data.prep.synthetic import prep_synthetic  # noqa: F401  (textseg prep synthetic)
from textseg_cli.data.prep.synthetic2d import prep_synthetic_2d  # noqa: F401  (textseg prep synthetic --dim 2)
from textseg_cli.data.prepared import PreparedDataset, load_prepared  # noqa: F401
from textseg_cli.evaluation.folders import (  # noqa: F401  (textseg eval)
    evaluate_folders,
    evaluate_pairs,
    write_evaluation,
)
from textseg_cli.evaluation.run import evaluate_run  # noqa: F401  (textseg eval RUN_DIR)
from textseg_cli.experiments.experiment import run_experiment  # noqa: F401  (textseg experiment run)
from textseg_cli.experiments.plan import fingerprint, make_plan, write_plan  # noqa: F401  (textseg plan)
from textseg_cli.experiments.presets import preset_spec, write_preset  # noqa: F401  (textseg experiment preset)
from textseg_cli.experiments.table import experiment_table  # noqa: F401  (textseg experiment table)
from textseg_cli.inference.export import export_run  # noqa: F401  (textseg export)
from textseg_cli.inference.predict import predict_case, predict_folder  # noqa: F401  (textseg predict)
from textseg_cli.inference.sliding_window import (  # noqa: F401
    sliding_window_inference,
    whole_volume_inference,
)
from textseg_cli.reports.compare import compare_results  # noqa: F401  (textseg eval --compare)
from textseg_cli.reports.curves import plot_curves  # noqa: F401  (textseg plot)
from textseg_cli.reports.overlays import prepared_overlays, render_case  # noqa: F401  (prep overlays, eval --overlays)
from textseg_cli.runs.listing import list_models  # noqa: F401  (textseg models)
from textseg_cli.runs.load import load_run  # noqa: F401  (textseg train)
from textseg_cli.runtime.precision import resolve_precision  # noqa: F401  (--precision of train, eval, predict, bench)
from textseg_cli.text.describe import describe, describe_per_case, load_aux_texts  # noqa: F401  (textseg describe)
from textseg_cli.text.embeddings import load_embeddings  # noqa: F401
from textseg_cli.text.encode import encode  # noqa: F401  (textseg encode)

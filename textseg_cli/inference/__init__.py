"""Inference: sliding-window and whole-volume prediction, run evaluation and folder prediction.

- `sliding_window`: `sliding_window_inference`, `whole_volume_inference` (pure tensor functions)
- `predict`: `predict_case` (a `Method` on one image), `predict_folder` (`textseg predict`)
- `run_eval`: `evaluate_run` (`textseg eval RUN_DIR`)
"""

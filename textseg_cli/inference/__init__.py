"""Inference: what a trained method predicts on one image or a folder of images.

- `settings`: `InferenceSettings` (patch, stride, mode, precision, LCC), built once per command from a run's config
- `sliding_window`: `sliding_window_inference`, `whole_volume_inference` (pure tensor functions)
- `predict`: `predict_case` (a `Method` on one image), `predict_folder` (`textseg predict`)
- `replay`: the training data's preprocessing replayed on new images; `export`: TorchScript / torch.export
- `protocol`: LCC as each method's official test script applies it

Scoring predictions is `textseg_cli.evaluation` (`evaluation.run.evaluate_run` is `textseg eval RUN_DIR`).
"""

"""The text pipeline: prompt files (`prompts`), the cached LLM client (`llm`), `describe`
(task descriptions and per-case auxiliary prompts), BERT/CLIP encoders (`encoders`, `encode`),
the embedding file format (`embeddings`) and learnable CoOp prompts (`coop`).

Heavy dependencies (torch models, transformers, open_clip, openai) are imported only where used.
"""

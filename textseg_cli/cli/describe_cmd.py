"""`textseg describe`: LLM task descriptions of a data set, or per-case auxiliary prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console
from textseg_cli.errors import ConfigError


@app.command("describe")
def describe_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d",
                                          help="Prompt file name (pancreas, la, brats, lung, spleen, synthetic, "
                                               "or your own) or a path to a prompt YAML file."),
    per_case: Optional[Path] = typer.Option(None, "--per-case", metavar="DATA_DIR",
                                            help="Instead: write one auxiliary prompt per case of this prepared "
                                                 "folder (cases with a text) to DATA_DIR/aux_texts.json."),
    llm: str = typer.Option("auto", "--llm",
                            help="Model name (e.g. gpt-4), 'offline' for the bundled texts, or 'auto': the default "
                                 "model when an API key is set, else offline."),
    n: int = typer.Option(15, "--n", help="Number of descriptions."),
    min_words: int = typer.Option(60, "--min-words", help="Minimum words per description."),
    base_url: Optional[str] = typer.Option(None, "--base-url",
                                           help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 "
                                                "(default: $OPENAI_BASE_URL, else OpenAI)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env",
                                    help="Environment variable that holds the API key (never stored)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Output JSON (default: <dataset>_descriptions_<llm>.json; with "
                                            "--per-case: DATA_DIR/aux_texts.json)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a different existing output."),
    refresh: bool = typer.Option(False, "--refresh", help="Ignore cached replies and ask the LLM again."),
    temperature: Optional[float] = typer.Option(None, "--temperature",
                                                help="Sampling temperature (default 0.7; 0.2 with --per-case)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Reply length limit (server default)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed, for servers that support it."),
    retries: int = typer.Option(4, "--retries", help="Retries on rate limits, timeouts and server errors."),
    backoff: float = typer.Option(1.0, "--backoff", help="First retry delay in seconds (doubles each time)."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for one reply."),
    on_short: str = typer.Option("error", "--on-short",
                                 help="Too few or too short descriptions: 'error' or 'retry' (ask again)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir",
                                             help="Reply cache (default: $TEXTSEG_CACHE/llm or ~/.cache/textseg/llm)."),
    prompts_dir: Optional[Path] = typer.Option(None, "--prompts-dir",
                                               help="Extra folder of prompt files (searched first)."),
) -> None:
    """Ask an LLM for task descriptions of a target (LLM-SegNet), or for per-case auxiliary prompts.

    Replies are cached: running the same command again sends no request (use --refresh to ask
    again). Without an API key, or with --llm offline, the bundled descriptions are used.
    """
    from textseg_cli.text.describe import (  # lazy: keeps `textseg --help` torch-free
        describe,
        describe_per_case,
        resolve_llm,
    )

    common = dict(base_url=base_url, api_key_env=api_key_env, force=force, refresh=refresh, max_tokens=max_tokens,
                  seed=seed, retries=retries, on_short=on_short, backoff=backoff, timeout=timeout,
                  cache_dir=cache_dir, prompts_dir=prompts_dir)
    if per_case is not None:
        if dataset is not None:
            raise ConfigError("give either --dataset or --per-case, not both")
        res = describe_per_case(per_case, llm, out=out, temperature=0.2 if temperature is None else temperature,
                                **common)
        console.print(f"{len(res.record['aux_texts'])} auxiliary prompt(s) ({res.record['mode']}, "
                      f"model {res.record['model']}; {res.requests} request(s)) → {res.out}"
                      + ("" if res.written else " (unchanged)"), highlight=False)
        if res.record["skipped"]:
            console.print(f"skipped {len(res.record['skipped'])} case(s) without text", highlight=False)
        return
    if dataset is None:
        raise ConfigError("--dataset is required (or --per-case DATA_DIR)")
    model = resolve_llm(llm, api_key_env, base_url)
    if out is None:
        stem = Path(dataset).stem
        out = Path(f"{stem}_descriptions_{_slug(model)}.json")
    res = describe(dataset, model, n, min_words, out=out, temperature=0.7 if temperature is None else temperature,
                   **common)
    rec = res.record
    source = "bundled" if rec["model"] == "offline" else ("cache" if res.cached else f"{res.requests} request(s)")
    console.print(f"{len(rec['descriptions'])} descriptions of {rec['target']} (model {rec['model']}, from {source}; "
                  f"shortest {min(rec['word_counts'])} words) → {res.out}" + ("" if res.written else " (unchanged)"),
                  highlight=False)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-") or "llm"

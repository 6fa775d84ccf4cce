"""`textseg train`: train a registered method on a prepared data set (single process or under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console
from textseg_cli.errors import ConfigError

_TEXT = "Text-guided methods"
_TGC = "TGC-Net ablations (tgcnet)"


@app.command("train", context_settings={"help_option_names": ["-h", "--help"]})
def train_command(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Method name (see `textseg models`), "
                                         "e.g. sup, mcnet, mcnet+."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared data folder (from `textseg prep`)."),
    labeled: Optional[str] = typer.Option(None, "--labeled", "-l",
                                          help="Labeled cases: a count (8) or a percentage (10%) of splits.train, "
                                               "taken from its head; the rest is used unlabeled. Default: the prepared "
                                               "set's labeled.default in dataset.json (prep la: 8), "
                                               "else all."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Train on fold k of a set prepared with --folds K "
                                       "(its train/val replace splits.train/val)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "-n", help="Training iterations (overrides "
                                             "the method config; with --resume, extends the run)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder. Default: "
                                       "runs/<data>/<method>_<labeled>L_s<seed>."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for python, numpy, torch and sampling."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... Default: CUDA when "
                                         "available."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate every N iterations on the "
                                            "validation split (0 = off)."),
    select: Optional[str] = typer.Option(None, "--select", help="How best.pt is chosen: val (default: best Dice "
                                         "on the validation split) or legacy-test (best Dice on the TEST split, "
                                         "every --val-every iterations, default 200, as the official MC-Net/BCP/"
                                         "VCLIPSeg/Text-SemiSeg scripts; optimistic, and every table says so)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt "
                                "(model, optimiser, schedule, RNG and sampler state)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic kernels (slower)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 on CUDA and on CPUs with bf16 "
                                            "units, else fp32), fp32 or bf16; validation follows it."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: all cores); "
                                          "give concurrent runs on one CPU a share each."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out folder."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override any config key, e.g. "
                                             "--set optim.lr=0.005 --set train.batch_labeled=1 (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Extra YAML merged over the packaged method "
                                          "config (before --set)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    text_embeddings: Optional[Path] = typer.Option(None, "--text-embeddings", rich_help_panel=_TEXT,
                                                   help="Embedding file from `textseg encode` (CLIP class prompts "
                                                        "for vclipseg / text-semiseg / --text, BERT descriptions "
                                                        "for llm-segnet)."),
    text: Optional[str] = typer.Option(None, "--text", rich_help_panel=_TEXT,
                                       help="Add Text-SemiSeg's text modules to a V-Net method (uamt, dtc, "
                                            "mcnet, ...): tmr+csa, tmr or csa."),
    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", rich_help_panel=_TEXT,
                                                  help="CLIP weights of the learnable prompts (text-semiseg, "
                                                       "--text): openai, none or a checkpoint file."),
    tmr: Optional[str] = typer.Option(None, "--tmr", rich_help_panel=_TEXT,
                                      help="text-semiseg TMR: paper (default), official (one token per plane, "
                                           "as the published code) or off."),
    no_tmr: bool = typer.Option(False, "--no-tmr", rich_help_panel=_TEXT, help="text-semiseg without TMR."),
    text_fusion: Optional[str] = typer.Option(None, "--text-fusion", rich_help_panel=_TEXT,
                                              help="text-semiseg bottleneck fusion: tmr or repeat (Table 3)."),
    no_csa: bool = typer.Option(False, "--no-csa", rich_help_panel=_TEXT, help="text-semiseg without CSA."),
    no_dca: bool = typer.Option(False, "--no-dca", rich_help_panel=_TEXT, help="text-semiseg without DCA."),
    no_vwpm: bool = typer.Option(False, "--no-vwpm", rich_help_panel=_TEXT, help="vclipseg without VWPM."),
    no_vtcm: bool = typer.Option(False, "--no-vtcm", rich_help_panel=_TEXT, help="vclipseg without VTCM."),
    unsup_loss: Optional[str] = typer.Option(None, "--unsup-loss", rich_help_panel=_TEXT,
                                             help="llm-segnet unsupervised loss: usl (default), mse or nll."),
    usl_reading: Optional[str] = typer.Option(None, "--usl-reading", rich_help_panel=_TEXT,
                                              help="llm-segnet USL: paper (Eq. 8 and Eq. 4 as printed, default) or "
                                                   "textseg (the former reading: voxels counted once, soft MSE target)."),
    t1: Optional[float] = typer.Option(None, "--t1", rich_help_panel=_TEXT,
                                       help="llm-segnet USL confidence threshold (default 0.9)."),
    t2: Optional[float] = typer.Option(None, "--t2", rich_help_panel=_TEXT,
                                       help="llm-segnet USL complementary threshold (default 0.1)."),
    sse: Optional[str] = typer.Option(None, "--sse", rich_help_panel=_TGC, help="SSE: on, off or cnn-only."),
    clip_finetune: Optional[str] = typer.Option(None, "--clip-finetune", rich_help_panel=_TGC,
                                                help="CLIP tuning: none (frozen, features cached), qv or full."),
    date: Optional[str] = typer.Option(None, "--date", rich_help_panel=_TGC,
                                       help="DATE: injection, main-only, aux-only, llm-expanded or auto."),
    vlcm: Optional[str] = typer.Option(None, "--vlcm", rich_help_panel=_TGC, help="VLCM: gated, none, single or bi."),
    clip_weights: Optional[str] = typer.Option(None, "--clip-weights", rich_help_panel=_TGC,
                                               help="Frozen CLIP weights: an open_clip pretrained tag or a local "
                                                    "checkpoint path; `none` trains on a random CLIP (required: no default)."),
) -> None:
    """Train a method; writes RUN/config.yaml, env.json, log.csv and checkpoints/{last,best}.pt.

    Checkpoints are selected on the validation split (--select legacy-test: on the test split, as the official
    scripts, marked in every table). Ctrl-C saves a checkpoint; continue with
    --resume. Multi-GPU: torchrun --nproc_per_node=N $(which textseg) train ... (batch sizes are per process).
    """
    from textseg_cli.data.prepared import load_prepared  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.engine.setup import train  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.methods.flags import text_flag_sets  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.runs.config import build_config, dump_config  # lazy: keeps `textseg --help` torch-free

    emb = str(text_embeddings.resolve()) if text_embeddings else None
    sets = text_flag_sets(method, text_embeddings=emb, text=text,
                          clip_pretrained=clip_pretrained, tmr="off" if no_tmr else tmr, text_fusion=text_fusion,
                          csa=False if no_csa else None, dca=False if no_dca else None,
                          vwpm=False if no_vwpm else None, vtcm=False if no_vtcm else None,
                          unsup_loss=unsup_loss, usl_reading=usl_reading, t1=t1, t2=t2, sse=sse,
                          clip_finetune=clip_finetune, date=date,
                          vlcm=vlcm, clip_weights=clip_weights) + list(sets or []) + ([f"data.fold={fold}"] if fold is not None else [])
    if precision is not None:
        sets.append(f"train.precision={precision}")
    if select is not None:
        sets.append(f"val.select={select}")
        if select == "legacy-test" and val_every is None:
            val_every = 200  # the official scripts' cadence (train_mcnet_3d.py, LA_BCP_train.py: iter_num % 200)
    if print_config:
        if method is None or data is None:
            raise ConfigError("--print-config needs --method and --data")
        ds = load_prepared(data)
        flags = {"data.labeled": labeled, "train.iterations": iterations, "seed": seed, "val.every": val_every,
                 "deterministic": True if deterministic else None}
        cfg = build_config(method, ds.name, ds.dim, ds.patch_size, user_config=config, flags=flags, sets=sets or [])
        cfg["data"]["root"] = str(data.resolve())
        console.print(dump_config(cfg), highlight=False, markup=False, soft_wrap=True)
        return

    train(method, data, labeled=labeled, iterations=iterations, out=out, seed=seed, device=device,
          val_every=val_every, resume=resume, deterministic=deterministic, force=force, sets=sets or [],
          config=config, threads=threads)

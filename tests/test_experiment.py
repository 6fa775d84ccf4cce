"""`textseg experiment`: grids from one file, restartable runs, launchers, presets and tables (issue 16)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run_cli
from textseg_cli.errors import ConfigError
from textseg_cli.experiments.spec import load_experiment
from textseg_cli.methods.registry import display_name


def _spec(tmp_path: Path, data: Path, name: str = "exp", **over) -> Path:
    spec = {"name": "tiny", "data": str(data), "labeled": [2], "seeds": [1, 2], "iterations": 8, "device": "cpu",
            "threads": 1,
            "methods": [{"method": "sup", "set": ["train.checkpoint_every=3", "val.every=4"]},
                        {"method": "mcnet", "name": "MC-Net", "set": ["train.checkpoint_every=3", "val.every=4"]}]}
    spec.update(over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_expands_to_a_predictable_layout_and_checks_the_file(tmp_path, synthetic_data):
    exp = load_experiment(_spec(tmp_path, synthetic_data, labeled=[2, "50%"]))
    keys = [r.key for r in exp.runs()]
    assert keys == ["sup/2L_s1", "sup/2L_s2", "sup/50pctL_s1", "sup/50pctL_s2",
                    "mcnet/2L_s1", "mcnet/2L_s2", "mcnet/50pctL_s1", "mcnet/50pctL_s2"]
    assert exp.runs()[0].dir == tmp_path / "exp" / "runs" / "sup" / "2L_s1"
    assert exp.eval_dir(exp.runs()[0]) == exp.runs()[0].dir / "eval" / "val-best"
    for bad, msg in [({"methods": [{"method": "nope"}]}, "unknown method 'nope'"),
                     ({"seeds": [1, 1]}, "repeats a seed"), ({"labeled": ["ten"]}, "not a count"),
                     ({"eval": {"checkpoint": "best-on-test"}}, "expected best-on-val or last"),
                     ({"methods": ["sup", "sup"]}, "used twice"), ({"reference": "X"}, "names no method")]:
        with pytest.raises(ConfigError, match=msg):
            load_experiment(_spec(tmp_path, synthetic_data, name="bad", **bad))


def _interrupt_at(monkeypatch, method: str, seed: int, iteration: int):
    """Ctrl-C (SIGINT) during one run: the trainer saves checkpoints/last.pt and stops, as on a real interrupt."""
    from textseg_cli.engine import loop as trainer_mod

    orig = trainer_mod.Trainer._step

    def step(self):
        if (self.cfg["method"]["name"], self.cfg["seed"], self.iteration) == (method, seed, iteration):
            os.kill(os.getpid(), signal.SIGINT)
        return orig(self)

    monkeypatch.setattr(trainer_mod.Trainer, "_step", step)


def test_acceptance_interrupt_rerun_and_table(tmp_path, synthetic_data, monkeypatch, one_thread):
    """2 methods x 1 labeled x 2 seeds: interrupted in the last run, re-run redoes only that run (resumed from
    its checkpoint), and the table shows mean ± SD over the 2 seeds."""
    from textseg_cli.api import experiment_table, run_experiment

    spec = _spec(tmp_path, synthetic_data)
    _interrupt_at(monkeypatch, "mcnet", 2, 5)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, quiet=True, log=lambda s: None)
    monkeypatch.undo()
    exp = load_experiment(spec)
    status = {r.key: json.loads((exp.out / "status" / r.status_name).read_text(encoding="utf-8")) for r in exp.runs()}
    assert [status[k]["state"] for k in ("sup/2L_s1", "sup/2L_s2", "mcnet/2L_s1")] == ["done"] * 3
    assert status["mcnet/2L_s2"]["state"] == "interrupted"
    finished = {r.key: (exp.eval_dir(r) / "meta.json").stat().st_mtime_ns for r in exp.runs()[:3]}

    code, out = run_cli("experiment", "run", spec, "--quiet")
    assert code == 0, out
    assert "1 run(s) done, 3 already finished (skipped), 0 failed" in out
    assert {r.key: (exp.eval_dir(r) / "meta.json").stat().st_mtime_ns for r in exp.runs()[:3]} == finished
    last = exp.runs()[3]
    env = json.loads((last.dir / "env.json").read_text(encoding="utf-8"))
    assert [s["resumed"] for s in env["sessions"]] == [False, True]  # continued from last.pt, not restarted
    assert json.loads((exp.out / "status" / last.status_name).read_text(encoding="utf-8"))["resumed"] is True
    assert json.loads((exp.eval_dir(last) / "meta.json").read_text(encoding="utf-8"))["name"] == "MC-Net"  # eval RUN --name
    import torch

    assert torch.load(last.dir / "checkpoints" / "last.pt", weights_only=False)["iteration"] == 8

    code, out = run_cli("experiment", "run", spec, "--quiet")  # all finished: nothing redone
    assert code == 0 and "0 run(s) done, 4 already finished" in out

    md = experiment_table(spec, "md")
    per_run = {r.key: pd.read_csv(exp.eval_dir(r) / "summary.csv").query("metric == 'dice'")["mean"].iloc[0] * 100
               for r in exp.runs()}
    mc = [per_run["mcnet/2L_s1"], per_run["mcnet/2L_s2"]]
    assert f"| MC-Net | 2 | 2 | " in md
    row = next(line for line in md.splitlines() if line.startswith("| MC-Net"))
    assert f"{np.mean(mc):.2f} ± {np.std(mc, ddof=1):.2f}" in row
    assert "mean ± SD over seeds of each run's mean over cases (n = 2 seed(s) per row" in md
    assert "Split: val; checkpoint: best-on-val; LCC: off" in md and "Iterations: 8" in md
    assert "text encoder weights: none" in md and "over (seed, case) pairs pooled over seeds" in md
    csv = pd.read_csv(__import__("io").StringIO(experiment_table(exp.out, "csv")))  # the folder works too
    seeds = csv[csv["name"] == "MC-Net"]
    assert list(seeds["seed"].astype(str)) == ["1", "2", "mean"]
    assert seeds["dice"].iloc[:2].to_numpy() * 100 == pytest.approx(mc)


def test_failed_run_is_reported_and_the_rest_go_on(tmp_path, synthetic_data, one_thread):
    from textseg_cli.api import run_experiment

    methods = [{"method": "sup", "id": "broken", "set": ["optim.name=bogus"]},
               {"method": "sup", "set": ["train.checkpoint_every=2"]}]
    spec = _spec(tmp_path, synthetic_data, seeds=[1], iterations=2, methods=methods)
    out = run_experiment(spec, quiet=True, log=lambda s: None)
    assert list(out.failed) == ["broken/2L_s1"] and "optim.name 'bogus'" in out.failed["broken/2L_s1"]
    assert out.done == ["sup/2L_s1"]
    exp = load_experiment(spec)
    assert json.loads((exp.out / "status" / "broken__2L_s1.json").read_text(encoding="utf-8"))["state"] == "failed"
    shutil.rmtree(exp.out / "runs" / "sup")
    code, text = run_cli("experiment", "run", spec, "--fail-fast", "--quiet")
    assert code == 1 and "1 failed, 1 not started" in text  # --fail-fast: sup not reached


def test_gpus_run_one_child_per_gpu_with_its_own_visible_device(tmp_path, synthetic_data):
    """The per-GPU scheduler: at most one run per GPU at a time, each child sees only its GPU."""
    from textseg_cli.experiments.launch import child_command, run_on_gpus

    exp = load_experiment(_spec(tmp_path, synthetic_data, seeds=[1, 2, 3]))
    probe = ("import os, sys, time, json; time.sleep(0.3); "
             "open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])")
    out = run_on_gpus(exp, exp.runs(), ["0", "1"], log=lambda s: None,
                      command=lambda e, r: [sys.executable, "-c", probe, str(tmp_path / f"{r.entry.id}{r.seed}")])
    assert sorted(out.done) == sorted(r.key for r in exp.runs()) and not out.failed
    seen = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir() if p.name[-1].isdigit()}
    assert set(seen.values()) == {"0", "1"} and len(seen) == 6
    fail = run_on_gpus(exp, exp.runs()[:3], ["0"], fail_fast=True, log=lambda s: None,
                       command=lambda e, r: [sys.executable, "-c", "raise SystemExit(3)"])
    assert len(fail.failed) == 1 and "exited with code 3" in next(iter(fail.failed.values()))
    assert len(fail.not_started) == 2
    cmd = child_command(exp, exp.runs()[0])
    assert cmd[1:] == ["-m", "textseg_cli", "experiment", "run", str(exp.out / "experiment.yaml"), "--only",
                       "sup/2L_s1", "--quiet"]


def test_submitit_local_executor_runs_the_experiment(tmp_path, synthetic_data):
    pytest.importorskip("submitit")
    from textseg_cli.api import experiment_table, run_experiment

    spec = _spec(tmp_path, synthetic_data, seeds=[1], iterations=2, methods=[{"method": "sup", "name": "V-Net"}])
    out = run_experiment(spec, launcher="submitit-local", slurm_gpus=0, slurm_time_min=10, log=lambda s: None)
    assert out.done == ["sup/2L_s1"] and not out.failed, out.failed
    exp = load_experiment(spec)
    st = json.loads((exp.out / "status" / "sup__2L_s1.json").read_text(encoding="utf-8"))
    assert st["state"] == "done" and st["launcher"] == "submitit-local" and st["pid"] != os.getpid()
    assert "| V-Net | 2 | 1 |" in experiment_table(spec, "md")


def test_preset_la_dry_run_lists_every_method_at_4_8_and_16_with_3_seeds():
    from textseg_cli.experiments.presets import PRESETS

    code, out = run_cli("experiment", "preset", "la", "--dry-run")
    assert code == 0, out
    n_runs = len(PRESETS["la"]["methods"]) * 3 * 3
    assert f"x 3 labeled (4, 8, 16) x 3 seed(s) (1337, 1338, 1339) = {n_runs} runs" in out
    for m in PRESETS["la"]["methods"]:
        mid = m.replace("+", "_plus")
        for lab in (4, 8, 16):
            for seed in (1337, 1338, 1339):
                assert f"  {mid}/{lab}L_s{seed} " in out
    assert "MC-Net [mcnet]: patch 112x112x80, stride 18x18x4, 15000 iterations, batch 2+2, sgd 0.01 constant" in out
    assert "BCP [bcp]: patch 112x112x80, stride 18x18x4, 17000 iterations, batch 4+4" in out and "LCC on" in out


def test_preset_la_dry_run_shows_the_new_baselines_with_official_settings_and_published_numbers():
    """Issue 27: AD-MT and CrossMatch at 4, 8 and 16 labeled, their official settings, and the published numbers
    read from their configs' `published:` blocks (the "+Text" rows have none: they are not the published method)."""
    from textseg_cli.experiments.table import published_numbers
    from textseg_cli.experiments.spec import MethodEntry
    from textseg_cli.runs.config import packaged_config

    code, out = run_cli("experiment", "preset", "la", "--dry-run")
    assert code == 0, out
    lines = out.splitlines()
    for name, method, settings in (("AD-MT", "ad-mt", "15000 iterations, batch 2+2, sgd 0.01 poly"),
                                   ("CrossMatch", "crossmatch", "14001 iterations, batch 2+4, adamw 0.001 poly")):
        i = next(i for i, line in enumerate(lines) if line.startswith(f"  {name} [{method}]: "))
        assert settings in lines[i]
        pub = packaged_config(method)["published"]["la"]
        expected = [f"{lab} labeled " + " / ".join(f"{float(pub[lab][k]):g}" for k in ("dice", "jaccard", "hd95",
                                                                                           "asd"))
                    for lab in ("4", "8", "16") if lab in pub]
        assert expected and lines[i + 1].startswith("    published: ") and all(e in lines[i + 1] for e in expected)
        for lab in (4, 8, 16):
            for seed in (1337, 1338, 1339):
                assert f"  {method}/{lab}L_s{seed} " in out
        text = next(line for line in lines if line.startswith(f"  {name} + Text [{method}]: "))
        assert "method.text_addon=" in text
        assert not lines[lines.index(text) + 1].startswith("    published:")
    assert published_numbers(MethodEntry("ad-mt", "AD-MT + Text", "x", sets=["method.text_addon=tmr+csa"]), "la",
                             "8") is None
    assert published_numbers(MethodEntry("ad-mt", "AD-MT", "x"), "la", "8")["dice"] == 90.58


def test_preset_writes_a_loadable_file(tmp_path):
    code, out = run_cli("experiment", "preset", "pancreas", "--out", tmp_path / "p.yaml")
    assert code == 0, out
    exp = load_experiment(tmp_path / "p.yaml")
    assert exp.labeled == ["10%", "20%"] and exp.seeds == [1337, 1338, 1339] and exp.eval["checkpoint"] == "best-on-val"
    assert run_cli("experiment", "preset", "pancreas", "--out", tmp_path / "p.yaml")[0] == 2  # no overwrite
    code, out = run_cli("experiment", "preset", "kidney", "--out", tmp_path / "k.yaml")
    assert code == 2 and "unknown preset 'kidney'" in out


def test_dry_run_estimates_time_from_a_short_bench(tmp_path, synthetic_data, one_thread, monkeypatch):
    monkeypatch.setenv("TEXTSEG_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path, synthetic_data, seeds=[1], methods=["sup"])
    code, out = run_cli("experiment", "run", spec, "--dry-run", "--estimate")
    assert code == 0, out
    assert "textseg train --method sup" in out and "textseg eval" in out and "sup/2L_s1" in out
    assert "bench sup on cpu (1/1)" in out and out.index("sup/2L_s1  ") < out.index("bench sup")  # plan first
    assert "ESTIMATE, not a measurement (from a short bench of each method on cpu" in out
    assert "training + validation + evaluation" in out and not (tmp_path / "exp").exists()
    first = out.split("ESTIMATE")[1]
    code, again = run_cli("experiment", "run", spec, "--dry-run", "--estimate")  # the bench result is cached
    assert code == 0 and "bench sup: cached" in again and "bench sup on cpu" not in again, again
    assert again.split("ESTIMATE")[1] == first


def test_dry_run_prints_the_plan_without_benching(tmp_path, monkeypatch):
    """The LA preset's whole plan at once: no bench unless --estimate (issue 29: it used to bench first)."""
    import textseg_cli.experiments.experiment as experiment
    from textseg_cli.experiments.presets import PRESETS

    monkeypatch.setattr(experiment, "run_benchmark", lambda *a, **k: pytest.fail("--dry-run benched"))
    code, out = run_cli("experiment", "preset", "la", "--out", tmp_path / "la.yaml")
    assert code == 0, out
    code, out = run_cli("experiment", "run", tmp_path / "la.yaml", "--dry-run")
    assert code == 0, out
    n_runs = len(PRESETS["la"]["methods"]) * len(PRESETS["la"]["labeled"]) * 3
    assert f"= {n_runs} runs" in out and "ESTIMATE" not in out and "bench " not in out


# --- tables from finished evaluations (no training) ------------------------------------------------------
_EIGHT = ["sup", "uamt", "dtc", "mcnet", "mcnet+", "mlrp", "bcp", "llm-segnet"]


def _fake_results(tmp_path: Path, methods=_EIGHT, labeled=(8, 16), seeds=(1, 2, 3)) -> Path:
    """Evaluations written by the real writer at the places the experiment reads them."""
    from textseg_cli.evaluation.folders import write_evaluation

    spec = {"name": "LA Table 1 (8 -> 16 labeled)", "dataset": "la", "labeled": list(labeled), "seeds": list(seeds),
            "methods": [{"method": m, "name": display_name(m) + ("_x" if m == "mcnet+" else "")} for m in methods]}
    path = tmp_path / "la.yaml"
    path.write_text(yaml.safe_dump(spec))
    exp = load_experiment(path)
    rng = np.random.default_rng(0)
    for i, run in enumerate(exp.runs()):
        n = 20
        dice = np.clip(0.8 + 0.01 * (i // len(seeds)) + rng.normal(0, 0.02, n), 0, 1)
        df = pd.DataFrame({"case": [f"c{k}" for k in range(n)], "class": 1, "class_name": "foreground",
                           "dice": dice, "jaccard": dice * 0.9, "hd95": rng.uniform(3, 9, n),
                           "asd": rng.uniform(1, 3, n), "pred_empty": False, "ref_empty": False,
                           "pred_voxels": 100, "ref_voxels": 100})
        df.attrs.update(empty_policy="nan", lcc=run.entry.method == "bcp", distance_unit="mm")
        write_evaluation(df, exp.eval_dir(run), {"name": run.entry.method, "split": "val", "labeled": int(run.labeled),
                                                 "unlabeled": 80 - int(run.labeled), "n_train": 80,
                                                 "checkpoint_rule": "best (val Dice)", "run_dir": str(run.dir)},
                         show=False)
    return path


def test_table_markdown_marks_best_per_labeled_group_and_wilcoxon_vs_reference(tmp_path):
    from textseg_cli.api import experiment_table

    path = _fake_results(tmp_path, methods=["sup", "mcnet", "bcp"], labeled=(8,), seeds=(1, 2))
    md = experiment_table(path, "md", published=True)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["V-Net (sup.)"].endswith("| – | – | ref. |")
    assert "| 87.71 |" in rows["MC-Net"] and "| 89.62 |" in rows["BCP"]  # published Dice (configs)
    assert "MC-Net: Wu et al., MICCAI 2021 (MC-Net paper), Table 1: LA, 20 test cases" in md and "LCC: per method" in md
    assert "**" in rows["BCP"] and "| _" in rows["MC-Net"]
    p = float(rows["MC-Net"].rstrip(" |").split(" | ")[-1])
    assert 0 <= p <= 1
    code, out = run_cli("experiment", "table", path, "--reference", "BCP")
    assert code == 0 and "against BCP (ref.)" in out
    assert next(line for line in out.splitlines() if line.startswith("| BCP |")).endswith("| ref. |")
    assert run_cli("experiment", "table", path, "--reference", "nope")[0] == 2
    code, out = run_cli("experiment", "table", path, "--table", "xlsx")
    assert code == 2 and "--table" in out
    first = load_experiment(path).runs()[0]  # a run without any finite 95HD: its row averages fewer seeds
    pc = pd.read_csv(first.dir / "eval" / "val-best" / "per_case.csv").assign(hd95=float("nan"))
    pc.to_csv(first.dir / "eval" / "val-best" / "per_case.csv", index=False)
    assert "Fewer seeds than the row's" in experiment_table(path) and "V-Net (sup.) 8 95HD: 1 of 2" in \
        experiment_table(path)


def _pdflatex(tmp_path: Path, tex: str, width: str = "") -> tuple[int, str]:
    doc = ("\\documentclass{article}\n" + width + "\\usepackage{booktabs,threeparttable}\n\\begin{document}\n"
           + tex + "\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1500)
    return proc.returncode, (tmp_path / "t.log").read_text(errors="replace") if (tmp_path / "t.log").exists() else ""


def test_latex_table_of_8_methods_x_2_labeled_compiles_and_fits_the_page(tmp_path):
    from textseg_cli.api import experiment_table

    tex = experiment_table(_fake_results(tmp_path), "latex", published=True)
    assert r"\caption{LA Table 1 (8 $\rightarrow$ 16 labeled)" in tex and r"\label{tab:la-table-1-8-16-labeled}" in tex
    assert "->" not in tex and r"\begin{tablenotes}" in tex and r"\toprule" in tex
    assert tex.count(r"\textbf{") >= 8 and tex.count(r"\underline{") >= 8  # best / second per column and group
    assert r"MC-Net+\_x" in tex and r"\multicolumn{8}{l}{\textit{16 labeled}}" in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base texlive-latex-recommended "
                    "texlive-latex-extra)")
    code, log = _pdflatex(tmp_path, tex)
    assert code == 0, log[-2000:]
    assert "Overfull \\hbox" not in log  # fits the default article text width


def test_compare_group_by_method_aggregates_seeds_and_takes_display_names(tmp_path):
    """`eval --compare --group-by method`: seeds of one method are one row (mean ± SD over runs), not
    "mcnet", "mcnet (2)"; NAME=PATH sets a row's display name."""
    path = _fake_results(tmp_path, methods=["sup", "mcnet"], labeled=(8,), seeds=(1, 2))
    exp = load_experiment(path)
    dirs = [exp.eval_dir(r) for r in exp.runs()]
    code, plain = run_cli("eval", "--compare", *dirs)
    assert code == 0 and "mcnet (2)" in plain
    targets = [f"{r.entry.name}={exp.eval_dir(r)}" for r in exp.runs()]
    code, md = run_cli("eval", "--compare", *targets, "--group-by", "method", "--std")
    assert code == 0, md
    means = {}
    for r in exp.runs():
        s = pd.read_csv(exp.eval_dir(r) / "summary.csv").query("metric == 'dice'")["mean"].iloc[0] * 100
        means.setdefault(r.entry.name, []).append(s)
    mc = means["MC-Net"]
    row = next(line for line in md.splitlines() if line.startswith("| MC-Net |"))
    assert f"{np.mean(mc):.2f} ± {np.std(mc, ddof=1):.2f}" in row and "(2)" not in md
    assert "mean ± SD over runs (seeds) of each run's mean over cases (runs per row: V-Net (sup.): 2, MC-Net: 2)" in md
    code, out = run_cli("eval", "--compare", *dirs, "--group-by", "seed")
    assert code == 2 and "--group-by 'seed'" in out


def test_slurm_launcher_maps_the_options_to_submitit(tmp_path, synthetic_data, monkeypatch):
    submitit = pytest.importorskip("submitit")
    import submitit.slurm.slurm as slurm_mod

    from textseg_cli.experiments.launch import submitit_executor

    exp = load_experiment(_spec(tmp_path, synthetic_data))
    if shutil.which("srun") is None:  # no Slurm here: a usage error naming the launcher, not a traceback
        code, out = run_cli("experiment", "run", tmp_path / "exp.yaml", "--launcher", "slurm")
        assert code == 2 and "--launcher slurm" in out and "srun" in out
        monkeypatch.setattr(slurm_mod.shutil, "which", lambda name: "/usr/bin/" + name)
    ex = submitit_executor(exp, "slurm", partition="gpu", time_min=90, gpus_per_run=1, cpus_per_run=8)
    params = ex._executor.parameters
    assert (params["partition"], params["time"], params["gpus_per_node"], params["cpus_per_task"]) == ("gpu", 90, 1, 8)
    assert params["job_name"] == "textseg-tiny" and ex.folder == (exp.out / "submitit").resolve()


@pytest.mark.benchmark  # ~1-2 min on a busy CPU (a subprocess, a kill, a resume); the SIGINT test is the fast one
def test_hard_kill_mid_run_is_resumed_from_its_last_checkpoint(tmp_path, synthetic_data, one_thread):
    """SIGKILL (no chance to clean up: the status file still says "running") during a run; the next
    `experiment run` resumes that run from checkpoints/last.pt and finishes it."""
    import time

    import torch

    spec = _spec(tmp_path, synthetic_data, seeds=[1], iterations=12,
                 methods=[{"method": "sup", "set": ["train.checkpoint_every=1", "val.every=0"]}])
    exp = load_experiment(spec)
    run = exp.runs()[0]
    last = run.dir / "checkpoints" / "last.pt"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "textseg_cli", "experiment", "run", str(spec), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    assert last.exists(), "the run never wrote a checkpoint"
    killed_at = torch.load(last, weights_only=False)["iteration"]
    assert 1 <= killed_at < 12
    assert json.loads((exp.out / "status" / run.status_name).read_text(encoding="utf-8"))["state"] == "running"
    from textseg_cli.experiments.runner import run_state

    assert run_state(exp, run) == "partial"
    code, out = run_cli("experiment", "run", spec, "--quiet")
    assert code == 0 and "1 run(s) done" in out, out
    assert torch.load(last, weights_only=False)["iteration"] == 12
    assert [s["resumed"] for s in json.loads((run.dir / "env.json").read_text(encoding="utf-8"))["sessions"]] == [False, True]


def test_eval_compare_latex_compiles(tmp_path):
    """The `eval --compare --table latex` float (was: notes in \\multicolumn cells wider than the page, a
    literal `->` printed as "¿", no caption) compiles without overfull lines."""
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed")
    from textseg_cli.api import compare_results

    exp = load_experiment(_fake_results(tmp_path, methods=["sup", "mcnet", "bcp"], labeled=(8,), seeds=(1,)))
    tex = compare_results([f"{r.entry.name}={exp.eval_dir(r)}" for r in exp.runs()], table="latex", std=True)
    assert r"$\rightarrow$" in tex and "->" not in tex and r"\caption{" in tex
    code, log = _pdflatex(tmp_path, tex)
    assert code == 0, log[-2000:]
    assert "Overfull \\hbox" not in log

"""Claims in README.md and docs/*.md that are facts of the code, checked against the code, so the docs cannot drift.

(a) `test_tutorial_commands_run`: the fenced `textseg ...` commands of docs/tutorial.md, extracted from the
markdown itself, run in order in a temporary folder through the CLI (in-process, `textseg_cli.cli.run`) at tiny
sizes. The size overrides are applied uniformly (`SIZE_OVERRIDES`); commands that need the network are listed
in `SKIPPED` with the reason, and the few documented substitutions in `REWRITES`.
(b) the other tests compare tables and lists of the docs with what the code does: the defaults table of
docs/training.md with configs/defaults.yaml, the schedules and LCC of docs/methods.md with each method's resolved
LA config and class, the preset and per-method settings tables of docs/experiments.md with experiments/presets.py
and the resolved configs, README's command list with the Typer app and README's method list with the registry.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import typer.main
import yaml

from textseg_cli.cli import app, run
from textseg_cli.experiments.experiment import plan
from textseg_cli.experiments.presets import PRESETS, write_preset
from textseg_cli.experiments.spec import load_experiment
from textseg_cli.methods.registry import list_methods, protocol_lcc
from textseg_cli.runs.config import build_config, packaged_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


# ---------------------------------------------------------------- markdown helpers

def fenced_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks of a markdown text, in order: continuation lines joined,
    comments dropped, heredocs not supported (none in the tutorial)."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(" ".join(shlex.quote(w) if w != "&&" else w for w in words))
    return out


def md_table(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header line starts with `header_start`, keyed by the header cells."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            keys = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                rows.append(dict(zip(keys, cells)))
            return rows
    raise AssertionError(f"no table with header {header_start!r}")


def _num(text: str) -> float:
    return float(text.replace(",", ""))


# ---------------------------------------------------------------- (a) the tutorial, run

# Commands of docs/tutorial.md that the test does not run, and why (matched by their first words).
SKIPPED = {
    "textseg describe --dataset mine.yaml --llm gpt-4": "asks an LLM over the network (an OpenAI-compatible server)",
    "textseg encode --encoder bert": "downloads a BERT model and reads `describe`'s output (network)",
}
# Documented substitutions: (words in the tutorial, replacement, where the tutorial itself says so).
REWRITES = [
    (["--window-preset", "abdomen", "--crop", "body"], [],
     "step 1: 'For the step-0 folder ... leave out --window-preset abdomen --crop body'"),
    (["--pretrained", "openai"], ["--pretrained", "none"],
     "step 2: 'without network access --pretrained none gives random CLIP weights'"),
]
# Tiny sizes, applied to every command of that kind (flag → value; an existing flag's value is replaced).
SIZE_OVERRIDES = {
    ("prep", "synthetic"): {"--cases": "10", "--size": "32,32,32"},
    ("train",): {"--iterations": "2", "--threads": "1"},
}
# What the reader provides by hand: the prompt file of step 2 and the new image of step 5.
MINE_YAML = {"name": "mine", "target": "liver", "modality": "CT",
             "structures": "the stomach, the right kidney and the inferior vena cava",
             "class_names": ["background", "liver"]}


def _rewrite(words: list[str]) -> list[str]:
    for old, new, _why in REWRITES:
        for i in range(len(words) - len(old) + 1):
            if words[i:i + len(old)] == old:
                words = words[:i] + new + words[i + len(old):]
                break
    for key, flags in SIZE_OVERRIDES.items():
        if tuple(words[1:1 + len(key)]) == key:
            for flag, value in flags.items():
                if flag in words:
                    words[words.index(flag) + 1] = value
                else:
                    words += [flag, value]
    return words


def _shell(words: list[str]) -> None:
    """The non-textseg lines of the tutorial: `mkdir -p` and `cp` (with globs), nothing else."""
    if words[0] == "mkdir":
        for d in words[1:]:
            if d != "-p":
                Path(d).mkdir(parents=True, exist_ok=True)
    elif words[0] == "cp":
        *srcs, dst = words[1:]
        files = [f for s in srcs for f in sorted(glob.glob(s))]
        assert files, f"cp: nothing matches {srcs}"
        for f in files:
            shutil.copy(f, dst)
    else:
        raise AssertionError(f"docs/tutorial.md runs {words[0]!r}: teach this test to run it or list it in SKIPPED")


def test_tutorial_commands_run(tmp_path, monkeypatch):
    lines = fenced_commands((DOCS / "tutorial.md").read_text())
    textseg_lines = [line for line in lines if line.startswith("textseg ")]
    assert len(textseg_lines) >= 15, "the tutorial's commands were not found"
    for skipped in SKIPPED:
        assert any(line.startswith(skipped) for line in lines), f"SKIPPED names a command the tutorial lost: {skipped}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(MINE_YAML))
    ran = []
    for line in lines:
        if any(line.startswith(s) for s in SKIPPED):
            continue
        for part in line.split(" && "):
            words = [os.path.expandvars(w) for w in shlex.split(part)]
            if words[0] != "textseg":
                _shell(words)
                continue
            argv = _rewrite(words)[1:]
            if "new_scan.nii.gz" in argv and not Path("new_scan.nii.gz").exists():
                shutil.copy(max(Path("imgs").glob("*.nii.gz")), "new_scan.nii.gz")
            code = run(argv)
            assert code == 0, f"`textseg {' '.join(argv)}` (from docs/tutorial.md: {line}) exited {code}"
            ran.append(argv[0])
    assert {"prep", "encode", "train", "plot", "eval", "predict", "export", "export-data"} <= set(ran)
    # what the tutorial says each step leaves behind
    for promised in ("data/mine/dataset.json", "runs/mine/mcnet/checkpoints/best.pt", "runs/mine/vclipseg/config.yaml",
                     "curves.png", "ev/mcnet/summary.csv", "results.md", "masks/new_scan.nii.gz",
                     "masks/new_scan_probs.nii.gz", "runs/mine/vclipseg/export/model.torchscript.pt",
                     "nnUNet_preprocessed/Dataset501_Mine/splits_final.json"):
        assert (tmp_path / promised).exists(), f"docs/tutorial.md promises {promised}"


# ---------------------------------------------------------------- (b) facts of the code

def test_training_defaults_table_matches_defaults_yaml():
    rows = {r["key"]: r["default"] for r in md_table((DOCS / "training.md").read_text(), "| key | default |")}
    d = packaged_config("defaults")
    assert _num(rows["`train.iterations`"]) == d["train"]["iterations"]
    assert [int(x) for x in rows["`train.batch_labeled`, `train.batch_unlabeled`"].split(",")] == \
        [d["train"]["batch_labeled"], d["train"]["batch_unlabeled"]]
    lr, momentum, wd = (float(x) for x in rows["`optim.lr`, `momentum`, `weight_decay`"].split(","))
    assert (lr, momentum, wd) == (d["optim"]["lr"], d["optim"]["momentum"], d["optim"]["weight_decay"])
    assert rows["`optim.schedule`"] == d["optim"]["schedule"]
    assert _num(rows["`val.every`"]) == d["val"]["every"]
    seed, det = (x.strip() for x in rows["`seed`, `deterministic`"].split(","))
    assert (int(seed), det == "true") == (d["seed"], d["deterministic"])


def _la_config(method: str) -> dict:
    return build_config(method, "la", 3, None)


def _schedule_claims(cell: str) -> dict[str, float]:
    """Iterations, lr and batch stated in a methods.md schedule cell ("6,000 it., batch 4 labeled, lr 0.01 ...")."""
    claims: dict[str, float] = {}
    la = re.search(r"LA profile ([\d,]+)", cell)
    its = re.search(r"([\d,]+(?: \+ [\d,]+)*) it\.", cell)
    if la:
        claims["iterations"] = _num(la.group(1))
    elif its:
        claims["iterations"] = sum(_num(x) for x in its.group(1).split(" + "))
    lr = re.search(r"(?:lr|AdamW) ([\d.e-]+)", cell)
    if lr:
        claims["lr"] = float(lr.group(1))
    batch = re.search(r"batch (\d+(?: \+ \d+)*)", cell)
    if batch:
        claims["batch"] = sum(int(x) for x in batch.group(1).split(" + "))
    return claims


@pytest.mark.parametrize("header", ["| method | networks (parameters", "| method | networks | evaluated by default"])
def test_methods_tables_match_configs_and_lcc(header):
    rows = md_table((DOCS / "methods.md").read_text(), header)
    schedule_col = next(k for k in rows[0] if k.startswith("schedule"))
    assert len(rows) >= 3
    for row in rows:
        method = row["method"].strip("`")
        cfg = _la_config(method)
        claims = _schedule_claims(row[schedule_col])
        assert "iterations" in claims, f"docs/methods.md: no iteration count for {method}"
        assert claims["iterations"] == cfg["train"]["iterations"], f"docs/methods.md iterations of {method}"
        if "lr" in claims:
            assert claims["lr"] == pytest.approx(cfg["optim"]["lr"]), f"docs/methods.md lr of {method}"
        if "batch" in claims:
            assert claims["batch"] == cfg["train"]["batch_labeled"] + cfg["train"]["batch_unlabeled"], method
        says_lcc = "LCC" in row["evaluated by default"]
        assert says_lcc == bool(protocol_lcc(method)), f"docs/methods.md: LCC of {method} vs its protocol_lcc"


def test_experiments_preset_table_matches_presets():
    rows = md_table((DOCS / "experiments.md").read_text(), "| preset | labeled |")
    assert {r["preset"] for r in rows} == set(PRESETS)
    registered = set(list_methods())
    for row in rows:
        p = PRESETS[row["preset"]]
        assert [x.strip() for x in row["labeled"].split(",")] == [str(x) for x in p["labeled"]], row["preset"]
        listed = [x.strip() for x in row[next(k for k in row if k.startswith("methods"))].split(",")]
        assert listed == [m for m in p["methods"] if m.removesuffix("+text") in registered], row["preset"]


@pytest.fixture(scope="module")
def la_plan():
    with tempfile.TemporaryDirectory() as d:
        exp = load_experiment(write_preset("la", Path(d) / "la.yaml"))
        rows = {}
        for row in plan(exp, exp.runs()):
            rows.setdefault(row["run"].entry.id, row)
        yield rows


def test_experiments_la_settings_table_matches_resolved_configs(la_plan):
    text = (DOCS / "experiments.md").read_text()
    rows = md_table(text, "| id | iterations | batch | optimiser |")
    patch, stride = re.search(r"all rows: patch\s+(\S+),\s+sliding-window\s+stride\s+(\S+);", text).groups()
    assert {(r["patch"], r["stride"]) for r in la_plan.values()} == {(patch.replace("×", "x"), stride.replace("×", "x"))}
    assert [r["id"].strip("`") for r in rows] == list(la_plan), "docs/experiments.md: the LA preset's rows"
    for row in rows:
        got = la_plan[row["id"].strip("`")]
        assert (_num(row["iterations"]), row["batch"], row["optimiser"], row["augment"], row["LCC"]) == \
            (got["iterations"], got["batch"], got["optim"], got["augment"], "on" if got["lcc"] else "off"), row["id"]
        # the augment column is the config's flags; LCC is the method class's protocol line
        assert (row["LCC"] == "on") == bool(protocol_lcc(got["run"].entry.method)), row["id"]
        assert (row["augment"] == "rotflip") == bool(got["cfg"]["data"]["augment"].get("rotflip")), row["id"]


def test_experiments_dry_run_excerpt_is_real_output():
    from conftest import run_cli  # the console's file redirected as for every CLI test (capsys alone saw '' when an
    # earlier test of the session had bound the rich console to another stream)

    text = (DOCS / "experiments.md").read_text()
    block = text.split("Excerpt of `textseg experiment preset la --dry-run`", 1)[1].split("```", 2)[1]
    with tempfile.TemporaryDirectory() as d:
        cwd = os.getcwd()
        os.chdir(d)
        try:
            code, out = run_cli("experiment", "preset", "la", "--dry-run")
            assert code == 0, out
        finally:
            os.chdir(cwd)
    flat = " ".join(out.split())  # rich wraps long lines at spaces
    flat = flat.replace(os.path.realpath(d) + "/", "./").replace(d + "/", "./")
    for line in block.strip().splitlines():
        if line.strip() != "...":
            assert " ".join(line.split()) in flat, f"docs/experiments.md dry-run excerpt line not in the output: {line}"


def test_readme_command_list_matches_the_app():
    text = (ROOT / "README.md").read_text()
    block = text.split("```", 2)[1]
    listed: set[str] = set()
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 2 and words[0] == "textseg":
            listed.add(words[1])
            if words[1] in ("prep", "experiment") and len(words) > 2:
                listed.update(f"{words[1]} {w}" for w in words[2].split("|") if re.fullmatch(r"[a-z-]+", w))
    group = typer.main.get_command(app)
    registered: set[str] = set()
    for name, cmd in group.commands.items():
        registered.add(name)
        registered.update(f"{name} {sub}" for sub in getattr(cmd, "commands", {}) or {})
    # `experiment preset` is documented in docs/experiments.md, the README names only run/table
    assert listed - registered == set(), "README lists commands the app does not have"
    assert registered - listed - {"experiment preset"} == set(), "commands missing from README's command list"


def test_readme_methods_list_matches_the_registry():
    text = (ROOT / "README.md").read_text()
    para = text.split("All registered methods", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"`([a-z0-9+-]+)`", para)
    listed = [m for m in listed if m != "--method"]
    assert sorted(listed) == sorted(list_methods()), "README's method list vs the registry"
    baselines = re.search(r"`--method ([a-z0-9+|-]+)`", text.split("Baselines run the same", 1)[1]).group(1)
    assert set(baselines.split("|")) <= set(list_methods())

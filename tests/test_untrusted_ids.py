"""Files from other people are untrusted input (issue 25, points 2 and 3).

Case IDs (prepared dataset.json, split files, nnU-Net splits_final.json) and experiment `id:`s become file and
folder names: a hostile one must not make `eval`, `export-data` or `predict` write outside their output folder,
and `prep check` must report it. `eval RUN` must not silently score cases the run trained on.

Every test works inside ROOT/sandbox and checks that nothing else under ROOT changed (ROOT holds planted
`x.nii.gz` files a path like `../../../x` would overwrite).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import fingerprint_outside, run_cli
from raw_fakes import phantom_ct, write_image

from textseg_cli.errors import DataError
from textseg_cli.storage.files import child_path

TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=4", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1"]
PLANTED = ("x.nii.gz", "x_0000.nii.gz", "abs_x.nii.gz", "abs_x_0000.nii.gz")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ROOT/sandbox/{data, run}: a tiny synthetic set (train 2 / val 1 / test 1) and a 2-iteration mcnet run
    on it (1 labeled + 1 unlabeled training case); ROOT holds the planted files."""
    root = tmp_path_factory.mktemp("untrusted")
    sandbox = root / "sandbox"
    data, run = sandbox / "data", sandbox / "run"
    code, text = run_cli("prep", "synthetic", "--out", data, "--cases", "4", "--val", "1", "--test", "1",
                         "--size", "32,32,16", "--patch", "32,32,16")
    assert code == 0, text
    code, text = run_cli("train", "--method", "mcnet", "--data", data, "--labeled", "1", "--iterations", "2",
                         "--val-every", "2", "--out", run, *TINY)
    assert code == 0, text
    for name in PLANTED:
        (root / name).write_bytes(b"precious " + name.encode())
    return root, sandbox, data, run


@contextlib.contextmanager
def _untouched_outside(world):
    root, sandbox = world[0], world[1]
    before = fingerprint_outside(root, sandbox)
    yield
    assert fingerprint_outside(root, sandbox) == before, "a file outside the sandbox was written"


def _spec(data: Path) -> dict:
    return json.loads((data / "dataset.json").read_text(encoding="utf-8"))


def _rename(spec: dict, renames: dict[str, str]) -> dict:
    """The same data set with some case IDs replaced (the image/label paths stay valid)."""
    spec = json.loads(json.dumps(spec))
    for c in spec["cases"]:
        c["id"] = renames.get(c["id"], c["id"])
    spec["splits"] = {k: [renames.get(c, c) for c in v] if isinstance(v, list) else v
                      for k, v in spec["splits"].items()}
    return spec


def _hostile_copy(data: Path, dst: Path, renames: dict[str, str]) -> Path:
    shutil.copytree(data, dst)
    (dst / "dataset.json").write_text(json.dumps(_rename(_spec(data), renames)), encoding="utf-8")
    return dst


@contextlib.contextmanager
def _edited(data: Path, spec: dict):
    """Replace the run's dataset.json for the block (the run itself stays as trained)."""
    path = data / "dataset.json"
    original = path.read_bytes()
    path.write_text(json.dumps(spec), encoding="utf-8")
    try:
        yield
    finally:
        path.write_bytes(original)


def _split(data: Path, name: str) -> list[str]:
    return list(_spec(data)["splits"][name])


# --- point 2: case IDs are file names -------------------------------------------------------------------------------
def test_prep_check_reports_every_unsafe_case_id(world):
    root, sandbox, data, _ = world
    ids = [c["id"] for c in _spec(data)["cases"]]
    evil = _hostile_copy(data, sandbox / "evil_check", {ids[0]: "../../../x", ids[1]: "a/b", ids[2]: str(root / "abs_x")})
    with _untouched_outside(world):
        code, text = run_cli("prep", "check", evil)
    assert code == 2, text
    lines = [ln for ln in text.splitlines() if "bad case id" in ln]
    assert len(lines) == 3, text  # one line per problem
    assert any("'../../../x'" in ln for ln in lines) and any("'a/b'" in ln for ln in lines)
    assert any(str(root / "abs_x") in ln for ln in lines)
    assert "3 unsafe" in text and "ok" not in text.split()


@pytest.mark.parametrize("bad", ["../../../x", "ABS"])
def test_eval_refuses_a_hostile_case_id_and_writes_nothing_outside(world, bad):
    root, sandbox, data, run = world
    bad = str(root / "abs_x") if bad == "ABS" else bad
    tag = "abs" if bad.startswith("/") else "rel"
    val = _split(data, "val")[0]
    with _edited(data, _rename(_spec(data), {val: bad})), _untouched_outside(world):
        code, text = run_cli("eval", run, "--split", "val", "--checkpoint", "last", "--out",
                             sandbox / f"ev_hostile_{tag}", "--device", "cpu")
    assert code == 2, text
    assert bad in text and "dataset.json" in text


@pytest.mark.parametrize("bad", ["../../../x", "ABS"])
def test_export_data_refuses_a_hostile_case_id(world, bad):
    root, sandbox, data, _ = world
    bad = str(root / "abs_x") if bad == "ABS" else bad
    tag = "abs" if bad.startswith("/") else "rel"
    evil = _hostile_copy(data, sandbox / f"evil_export_{tag}", {_split(data, "test")[0]: bad})
    with _untouched_outside(world):
        code, text = run_cli("export-data", evil, "--format", "nnunet", "--out", sandbox / f"exp_{tag}")
    assert code == 2, text
    assert bad in text


def test_predict_on_a_prepared_folder_refuses_a_hostile_case_id(world):
    root, sandbox, data, run = world
    evil = _hostile_copy(data, sandbox / "evil_predict", {_split(data, "test")[0]: "../../../x"})
    with _untouched_outside(world):
        code, text = run_cli("predict", run, "--images", evil, "--out", sandbox / "p1" / "pred", "--checkpoint", "last",
                             "--device", "cpu")
    assert code == 2, text
    assert "../../../x" in text


def test_split_file_with_a_hostile_id_is_refused_by_name(world, tmp_path):
    images, labels = tmp_path / "i", tmp_path / "l"
    for i in range(3):
        hu, lab = phantom_ct((16, 16, 6), seed=i)
        write_image(images / f"p{i}.nii.gz", hu, (1.0, 1.0, 2.0))
        write_image(labels / f"p{i}.nii.gz", lab, (1.0, 1.0, 2.0))
    (tmp_path / "split.yaml").write_text("train: [p2, p0]\ntest: [p1, ../../../x]\n")
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", tmp_path / "out",
                         "--modality", "MR", "--split-file", tmp_path / "split.yaml", "--workers", "1")
    assert code == 2, text
    assert "'../../../x' holds '/'" in text and "split.yaml" in text  # named as unsafe, not merely unknown
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_experiment_id_must_be_a_plain_folder_name(world, tmp_path):
    for i, bad in enumerate(["..", "../../../x", "a/b"]):
        spec = {"name": "t", "dataset": "la", "labeled": [2], "seeds": [1], "out": str(tmp_path / f"exp{i}"),
                "methods": [{"method": "sup", "id": bad}]}
        path = tmp_path / f"exp{i}.yaml"
        path.write_text(yaml.safe_dump(spec))
        with _untouched_outside(world):
            code, text = run_cli("experiment", "run", path, "--dry-run", "--no-estimate")
        assert code == 2, (bad, text)
        assert "methods[0]" in text and repr(bad) in text, text
    assert not any((tmp_path / f"exp{i}").exists() for i in range(3))


def test_child_path_keeps_per_case_files_inside_their_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    assert child_path(folder, "case_01", ".nii.gz") == folder / "case_01.nii.gz"
    (tmp_path / "elsewhere.nii.gz").write_bytes(b"x")
    (folder / "linked.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    for name, suffix in [("../x", ".nii.gz"), ("a/b", ""), (str(tmp_path / "abs"), ".png"), ("..", ""), ("", ""),
                         ("linked", ".nii.gz")]:
        with pytest.raises(DataError, match="not lie directly inside"):
            child_path(folder, name, suffix)


# --- point 3: eval must not score the run's own training cases ------------------------------------------------------
def test_eval_refuses_training_cases_unless_allowed_and_marks_the_result(world):
    root, sandbox, data, run = world
    cases = json.loads((run / "cases.json").read_text(encoding="utf-8"))
    trained = cases["labeled"] + cases["unlabeled"]
    assert len(cases["labeled"]) == 1 and len(cases["unlabeled"]) == 1  # mcnet uses the unlabeled one
    spec = _spec(data)
    moved = json.loads(json.dumps(spec))
    moved["splits"]["train"] = [c for c in spec["splits"]["train"] if c not in trained]
    moved["splits"]["val"] = sorted(spec["splits"]["val"] + trained)
    with _edited(data, moved), _untouched_outside(world):
        code, text = run_cli("eval", run, "--split", "val", "--checkpoint", "last", "--out", sandbox / "ev_leak",
                             "--device", "cpu")
        assert code == 2, text
        assert all(c in text for c in trained) and "training cases of this run" in text and str(run) in text
        assert "--allow-train-cases" in text
        assert not (sandbox / "ev_leak").exists()

        code, text = run_cli("eval", run, "--split", "val", "--checkpoint", "last", "--out", sandbox / "ev_leak",
                             "--device", "cpu", "--table", "md", "--allow-train-cases")
        assert code == 0, text
    meta = json.loads((sandbox / "ev_leak" / "meta.json").read_text(encoding="utf-8"))
    assert sorted(meta["train_cases_evaluated"]) == sorted(trained)
    assert "cases the run trained on" in (sandbox / "ev_leak" / "table.md").read_text(encoding="utf-8")
    code, text = run_cli("eval", "--compare", sandbox / "ev_leak", "--table", "csv")
    assert code == 0 and "n_train_cases_evaluated" in text, text
    code, text = run_cli("eval", "--compare", sandbox / "ev_leak", "--table", "latex")
    assert code == 0 and "cases the run trained on" in text, text

    # the unchanged data set: nothing to mark
    code, text = run_cli("eval", run, "--split", "val", "--checkpoint", "last", "--out", sandbox / "ev_clean",
                         "--device", "cpu", "--table", "md")
    assert code == 0, text
    assert json.loads((sandbox / "ev_clean" / "meta.json").read_text(encoding="utf-8"))["train_cases_evaluated"] == []
    assert "trained on" not in (sandbox / "ev_clean" / "table.md").read_text(encoding="utf-8")


def test_eval_of_a_run_without_cases_json_warns_and_goes_on(world):
    root, sandbox, data, run = world
    old = sandbox / "run_without_cases"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("eval", "*.lock"))
    (old / "cases.json").unlink()
    code, text = run_cli("eval", old, "--split", "val", "--checkpoint", "last", "--out", sandbox / "ev_old",
                         "--device", "cpu")
    assert code == 0, text
    assert "no readable cases.json" in text
    meta = json.loads((sandbox / "ev_old" / "meta.json").read_text(encoding="utf-8"))
    assert meta["train_cases_evaluated"] is None and meta["n_cases"] == 1

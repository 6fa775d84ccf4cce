"""`textseg train` under torchrun: 2 CPU processes with the gloo backend."""

import csv
import json
import os
import subprocess
import sys

import torch


def test_torchrun_two_gloo_processes(tmp_path):
    from textseg_cli.data.prep.synthetic import prep_synthetic

    data = tmp_path / "data"
    prep_synthetic(data, n_cases=6, size=(32, 32, 16), n_val=1, n_test=1, patch_size=(32, 32, 16))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "textseg_cli",
           "train", "--method", "mcnet", "--data", str(data), "--labeled", "2", "--iterations", "4", "--out", str(run),
           "--device", "cpu", "--val-every", "4", "--set", "method.backbone.n_filters=4",
           "--set", "train.batch_labeled=1", "--set", "train.batch_unlabeled=1", "--set", "train.log_every=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    envj = json.loads((run / "env.json").read_text(encoding="utf-8"))
    assert envj["world_size"] == 2 and len(envj["sessions"]) == 1  # only rank 0 wrote
    rows = list(csv.DictReader(open(run / "log.csv", newline="")))
    assert [int(r["iteration"]) for r in rows] == [2, 4] and rows[-1]["val_dice"] != ""
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["rng"]["world_size"] == 2
    # each rank draws its own patches: the per-rank sampler streams differ
    r0, r1 = ckpt["rng"]["ranks"]
    assert r0["sampler"]["rng"] != r1["sampler"]["rng"]
    assert "best.pt" in os.listdir(run / "checkpoints")

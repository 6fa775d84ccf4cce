"""Background batch prefetching: same batches as the sampler, exact checkpoints, data-wait logging."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from textseg_cli.data.prefetch import BatchPrefetcher, prefetch_depth, with_prefetch
from textseg_cli.data.sampling import Augment, TwoStreamSampler
from textseg_cli.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _sampler(seed=7):
    rng = np.random.default_rng(0)
    imgs_l = [rng.standard_normal((1, 20, 18, 12)).astype(np.float32) for _ in range(3)]
    labs_l = [rng.integers(0, 2, (20, 18, 12)).astype(np.uint8) for _ in range(3)]
    imgs_u = [rng.standard_normal((1, 22, 16, 12)).astype(np.float32) for _ in range(4)]
    return TwoStreamSampler(imgs_l, labs_l, imgs_u, (8, 8, 8), 2, 2, seed=[seed, 0],
                            augment=Augment(flip=True, rot90=True), ids_l=["a", "b", "c"], ids_u=list("defg"))


def _same(b1, b2):
    assert torch.equal(b1.image_l, b2.image_l) and torch.equal(b1.label_l, b2.label_l)
    assert torch.equal(b1.image_u, b2.image_u) and list(b1.ids_l) == list(b2.ids_l) and list(b1.ids_u) == list(b2.ids_u)


def test_prefetched_batches_are_bit_identical_and_checkpoints_exact():
    plain, ahead = _sampler(), BatchPrefetcher(_sampler(), depth=3)
    for _ in range(4):
        _same(plain.next_batch(), ahead.next_batch())
    # the thread has drawn 3 batches more than were handed out; the checkpoint is where the loop is
    state = ahead.state_dict()
    assert state["rng"] == plain.state_dict()["rng"] and state["cycle_u"] == plain.state_dict()["cycle_u"]
    resumed = BatchPrefetcher(_sampler(seed=99), depth=2)
    resumed.load_state_dict(state)
    for _ in range(5):
        expected = plain.next_batch()
        _same(expected, resumed.next_batch())
        _same(expected, ahead.next_batch())
    ahead.close()
    resumed.close()


def test_prefetch_setting():
    assert prefetch_depth("auto", torch.device("cpu")) == 0 and prefetch_depth("auto", torch.device("cuda")) == 2
    assert prefetch_depth(3, torch.device("cpu")) == 3 and prefetch_depth(False, torch.device("cuda")) == 0
    s = _sampler()
    assert with_prefetch(s, "auto", torch.device("cpu")) is s
    assert isinstance(with_prefetch(s, 1, torch.device("cpu")), BatchPrefetcher)
    with pytest.raises(ConfigError, match="train.prefetch"):
        prefetch_depth("soon", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_prefetch_pins_memory_for_cuda():
    batch = with_prefetch(_sampler(), "auto", torch.device("cuda")).next_batch()
    assert batch.image_l.is_pinned() and batch.label_l.is_pinned()


def test_training_with_prefetch_resumes_exactly(tmp_path):
    from textseg_cli.data.prep.synthetic import prep_synthetic
    from textseg_cli.engine.setup import train

    data = tmp_path / "data"
    prep_synthetic(data, n_cases=6, size=(24, 24, 16), n_val=1, n_test=1, patch_size=(16, 16, 16))
    sets = ["method.backbone.n_filters=4", "train.batch_labeled=1", "train.batch_unlabeled=1", "train.log_every=1",
            "val.every=0"]
    args = dict(labeled="2", seed=3, device="cpu", quiet=True)

    def losses(run):
        with open(run / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert all(float(r["data_wait_s"]) >= 0 and 0 <= float(r["data_wait_share"]) <= 1 for r in rows)
        return [float(r["loss"]) for r in rows]

    train("mcnet", data, out=tmp_path / "plain", iterations=4, sets=sets + ["train.prefetch=0"], **args)
    train("mcnet", data, out=tmp_path / "ahead", iterations=2, sets=sets + ["train.prefetch=2"], **args)
    train(resume=True, out=tmp_path / "ahead", iterations=4, quiet=True)
    assert losses(tmp_path / "ahead") == losses(tmp_path / "plain")  # same batches, same checkpointed stream

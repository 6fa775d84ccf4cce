"""CUDA readiness (issue 18) with CPU stand-ins: DDP parameter coverage of every method."""

from __future__ import annotations

import json

import pytest
import torch
from method_matrix import SPECS, batch, build, ctx, ddp_worker, params_without_grad, write_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

# one configuration per method, plus those that left parameters without a gradient before (issue 18.3):
# LLM-SegNet's U-Net deep-supervision heads, CLIP's logit_scale under full fine-tuning, MLRP's CSA heads
FAST = sorted({next(s.id for s in SPECS if s.method == m) for m in {s.method for s in SPECS}}
              | {"llm-segnet-unet3d", "tgcnet-clip-full", "mlrp+csa"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("matrix"))


@pytest.mark.parametrize("spec_id", FAST)
def test_every_trainable_parameter_gets_a_gradient(spec_id, inputs):
    """DDP (find_unused_parameters=False) stops at step 2 when a trainable parameter gets no gradient."""
    spec = next(s for s in SPECS if s.id == spec_id)
    torch.manual_seed(0)
    method = build(spec, inputs)
    method.train()
    for it in range(2):  # two steps: BCP switches phase, EMA teachers update in between
        method.zero_grad(set_to_none=True)
        method.training_step(batch(spec, it), ctx(it))["loss"].backward()
        assert params_without_grad(method) == [], f"step {it + 1}"
        method.on_after_optimizer_step(ctx(it))


@pytest.mark.benchmark
def test_every_method_trains_two_steps_under_two_process_gloo_ddp(tmp_path):
    """All of SPECS (every method, text add-on and ablation switch that changes the trainable parameters)
    for 2 steps with 2 gloo processes; the ranks end with the same weights."""
    import torch.multiprocessing as mp

    folder = write_inputs(tmp_path / "inputs")["root"]
    ids = [s.id for s in SPECS]
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), folder, ids, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1))
    failed = {i: r0.get(i) or r1.get(i) for i in ids if r0.get(i, "missing") or r1.get(i, "missing")}
    assert failed == {}
    for i in ids:
        assert r0[i + ":checksum"] == pytest.approx(r1[i + ":checksum"], rel=1e-6), i


# --- deformable attention samples in float32 (issue 18.5) -------------------------------------------

def test_deformable_attention_samples_in_fp32_under_bf16_autocast(monkeypatch):
    """On CUDA, autocast leaves grid_sample to its inputs' dtype, and the grid was cast to the bf16 value.
    CPU stand-in: record what reaches grid_sample under CPU bf16 autocast (which would upcast it later)."""
    from textseg_cli.models.tgcnet import msdeform_attn as mda

    torch.manual_seed(0)
    shapes = [(24, 24), (12, 12), (6, 6)]
    attn = mda.MSDeformAttn(d_model=32, levels=3, heads=4, points=4)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)  # non-trivial fractional offsets
    s = sum(h * w for h, w in shapes)
    query, value = torch.randn(1, s, 32), torch.randn(1, s, 32)
    ref = mda.reference_points(shapes, 1)

    calls, real = [], mda.F.grid_sample

    def recording(v, g, **kw):
        calls.append((v.dtype, g.dtype, g.detach().clone()))
        return real(v, g, **kw)

    monkeypatch.setattr(mda.F, "grid_sample", recording)
    attn(query, ref, value, shapes)  # fp32 reference
    exact = [c[2] for c in calls]
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, value, shapes)
    assert [(c[0], c[1]) for c in calls] == [(torch.float32, torch.float32)] * 3
    for (_, _, g), e in zip(calls, exact):  # positions are not rounded to bf16 on the way
        assert torch.allclose(g, e, atol=1e-6)
    assert out.dtype == torch.bfloat16  # the layer still hands bf16 on under autocast


# --- decisions taken from losses agree across DDP ranks (issue 18.7) --------------------------------

@pytest.mark.benchmark  # ~40 s: two processes import the package and build both methods
def test_mcf_and_dca_decisions_agree_across_gloo_ranks(tmp_path):
    """Each rank's own losses favour a different network; the choice must be one for the whole job
    (the mean of the losses: network 1), as a single process seeing all patches would make it."""
    import torch.multiprocessing as mp
    from method_matrix import decision_worker

    folder = write_inputs(tmp_path / "inputs")["root"]
    mp.spawn(decision_worker, args=(2, str(tmp_path / "init"), folder, str(tmp_path)), nprocs=2, join=True)
    d0, d1 = (json.loads((tmp_path / f"decisions{r}.json").read_text(encoding="utf-8")) for r in (0, 1))
    assert d0 == d1 == {"mcf_good_is_resnet": 1.0, "dca_better": 1, "dca_worse": 0}


def test_decisions_follow_the_process_group_mean(inputs, monkeypatch):
    """Fast stand-in for the gloo test: the other ranks are simulated by the reduction's result."""
    import textseg_cli.methods.mcf as mcf_mod
    from textseg_cli.methods.distributed import global_mean

    v = torch.tensor([0.3, 0.2])
    assert torch.equal(global_mean(v), v)  # one process: nothing changes
    spec = next(s for s in SPECS if s.id == "mcf")
    m = build(spec, inputs)
    local = float(m.training_step(batch(spec), ctx(0))["good_student_is_resnet"])
    seen = []

    def other_ranks_disagree(values):  # the job-wide mean favours the network this rank did not pick
        seen.append(values.shape)
        return values.flip(0)

    monkeypatch.setattr(mcf_mod, "global_mean", other_ranks_disagree)
    assert float(m.training_step(batch(spec), ctx(0))["good_student_is_resnet"]) == 1.0 - local
    assert seen == [torch.Size([2])]


# --- label-derived maps and LCC off the hot path (issue 18.4) -------------------------------------------

def test_dtc_signed_distance_comes_with_the_sampled_patch(inputs, monkeypatch):
    """The sampler makes DTC's SDF when it draws the patch (after crop, rot90 and flips); the step no longer
    copies labels to the host for scipy, and its loss is bit-identical to the in-step computation."""
    import numpy as np

    import textseg_cli.methods.dtc as dtc_mod
    from textseg_cli.data.sampling import Augment, TwoStreamSampler

    spec = next(s for s in SPECS if s.id == "dtc")
    method = build(spec, inputs)
    rng = np.random.default_rng(0)
    labels = [np.zeros((40, 36, 20), np.uint8) for _ in range(3)]
    for lab in labels:
        lab[rng.integers(0, 10):30, 5:rng.integers(20, 36), 4:16] = 1
    images = [rng.normal(size=(1, *lab.shape)).astype(np.float32) for lab in labels]
    sampler = TwoStreamSampler(images, labels, images[:2], (32, 32, 16), 2, 2, seed=[0, 0],
                               augment=Augment(flip=True, rot90=True), label_targets=method.label_targets)
    b = sampler.next_batch()
    assert torch.equal(b.extra["sdf_l"], dtc_mod.sdf_targets(b.label_l, 2))

    torch.manual_seed(1)
    in_step = method.training_step(type(b)(b.image_l, b.label_l, b.image_u), ctx(0))
    monkeypatch.setattr(dtc_mod, "normalized_sdf", lambda *a: pytest.fail("SDF computed inside the step"))
    torch.manual_seed(1)
    sampled = method.training_step(b, ctx(0))
    for k in ("loss", "loss_sdf", "loss_consistency"):
        assert torch.equal(sampled[k], in_step[k]), k


def _blobs(shape, seed, classes=2):
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.normal(size=shape), sigma=(0,) + (1.5,) * (len(shape) - 1))
    x = (x - x.mean()) / x.std()
    lab = (x > 0.1).astype(np.int64) + (x > 1.0 if classes > 2 else 0)
    return torch.from_numpy(lab)


def test_device_lcc_equals_scipy_voxel_for_voxel():
    from textseg_cli.metrics.postprocess import lcc_batch, lcc_batch_device

    cases = [_blobs((3, 24, 20, 12), 0), _blobs((2, 24, 20, 12), 1, classes=3), _blobs((4, 40, 36), 2),
             torch.zeros(2, 8, 8, 4, dtype=torch.long)]
    tie = torch.zeros(1, 9, 9, 3, dtype=torch.long)  # two equal components: the first in C order stays
    tie[0, 1:3, 1:3, 1], tie[0, 6:8, 6:8, 1] = 1, 1
    for lab in cases + [tie, tie.bool()]:
        ref = lcc_batch(lab)
        dev = lcc_batch_device(lab)
        assert dev.dtype == ref.dtype and torch.equal(dev, ref)
    assert int(lcc_batch(tie).sum()) == 4 and bool(lcc_batch(tie)[0, 1, 1, 1])
    assert int((cases[0] != lcc_batch(cases[0])).sum()) > 0  # the blobs do have stray components


def test_lcc_of_a_device_tensor_stays_on_the_device(monkeypatch):
    """Stand-in for a CUDA tensor: `meta` cannot be copied to the host, so the old `.cpu().numpy()` path fails."""
    import textseg_cli.metrics.postprocess as pp
    from textseg_cli.methods.ssl_common import threshold_pseudo_label

    seen = []
    monkeypatch.setattr(pp, "lcc_batch_device", lambda t: seen.append(t.device.type) or t.clone())
    probs = torch.rand(2, 2, 8, 8, 4, device="meta")
    out = threshold_pseudo_label(probs, 0.5, lcc=True)
    assert seen == ["meta"] and out.device.type == "meta"


# --- CSA prototypes in float32 (issue 18.7) ---------------------------------------------------------

def test_csa_prototypes_are_float32_under_bf16_autocast():
    """The projection head hands bf16 features on under autocast; the prototypes (a sum over the whole
    feature grid) must not be computed in bf16. Reference: the same features, upcast, without autocast."""
    from textseg_cli.methods.text_losses import csa_loss

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 16, 12, 12, 8, generator=g).bfloat16()  # what the head gives under autocast
    probs = [torch.softmax(torch.randn(2, 2, 24, 24, 16, generator=g), 1) for _ in range(2)]
    text = torch.randn(2, 16, generator=g)
    ref = csa_loss(feats.float(), probs, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = csa_loss(feats, probs, text)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)


# --- TGC-Net's CLIP feature cache (issue 18.7) -------------------------------------------------------

def test_clip_cache_keys_images_without_copying_them_to_the_host(monkeypatch):
    from textseg_cli.models.tgcnet.clip_backbone import FeatureCache

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    keys = FeatureCache.image_keys("m", x)
    assert len(set(keys)) == 3 and keys == FeatureCache.image_keys("m", x.clone())
    assert keys[0] == FeatureCache.key("m", x[0])
    y = x.clone()
    y[1, 2, 31, 0] = torch.nextafter(y[1, 2, 31, 0], torch.tensor(2.0))  # one ulp in one pixel
    assert FeatureCache.image_keys("m", y) == [keys[0], FeatureCache.image_keys("m", y)[1], keys[2]]
    assert FeatureCache.image_keys("m", y)[1] != keys[1]
    assert FeatureCache.image_keys("m", x.half())[0] != keys[0] and FeatureCache.image_keys("n", x)[0] != keys[0]

    def no_host_copy(self, *a, **k):  # the old key copied every image of every step to the host
        if self.numel() > 64:
            raise AssertionError(f"a {tuple(self.shape)} tensor was copied to the host to compute its key")
        return real_cpu(self, *a, **k)

    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: pytest.fail("numpy() of an image"))
    assert FeatureCache.image_keys("m", x) == keys


def test_clip_cache_is_bounded_in_bytes_and_kept_in_pinned_host_memory(monkeypatch):
    from textseg_cli.models.tgcnet.clip_backbone import FeatureCache

    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stand-in: a CUDA machine
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self)
    entry = torch.zeros(64, 16, 16, dtype=torch.float16)  # 32 KiB
    cache = FeatureCache(max_items=100, max_bytes=3 * entry.numel() * 2 + 10)
    for i in range(5):
        cache.put(f"k{i}", entry + i)
    assert len(cache) == 3 and cache.nbytes == 3 * entry.numel() * 2
    assert cache.get("k0") is None and torch.equal(cache.get("k4"), entry + 4)  # least recently used went
    cache.put("t", (torch.zeros(8, 64), torch.ones(8, dtype=torch.bool)))  # text entries: (features, valid)
    assert cache.nbytes <= cache.max_bytes and "k1" not in cache._store
    assert len(pinned) == 7 and all(v.device.type == "cpu" for v in (cache.get("k4"), *cache.get("t")))


# --- the inference copy used for validation (issue 18.7) ---------------------------------------------

@pytest.mark.parametrize("spec_id", ["uamt", "tgcnet"])
def test_inference_copy_shares_all_but_the_folded_convs(spec_id, inputs):
    """The BatchNorm-folded copy used to predict was a full second copy of the method (frozen CLIP, text
    embeddings, unfolded layers and all); now only the folded convs are new tensors."""
    from textseg_cli.inference.fusion import fuse_conv_bn

    spec = next(s for s in SPECS if s.id == spec_id)
    method = build(spec, inputs)
    fused, count = fuse_conv_bn(method)
    mine = {t.data_ptr() for t in (*method.parameters(), *method.buffers())}
    new = [t for t in (*fused.parameters(), *fused.buffers()) if t.data_ptr() not in mine]
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    folded = [m for m in convs if all(p.data_ptr() not in mine for p in m.parameters())]
    assert len(folded) == count and len(new) == sum(len(list(m.parameters())) for m in folded)
    if spec_id == "tgcnet":  # the frozen CLIP tower is the bulk of the method: shared, not copied
        assert all(p.data_ptr() in mine for p in fused.net.clip.parameters())
        total = sum(t.numel() for t in (*method.parameters(), *method.buffers()))
        assert sum(t.numel() for t in new) < 0.5 * total


def test_trainer_drops_the_inference_copy_after_each_validation(tmp_path, monkeypatch):
    import textseg_cli.inference.fusion as fusion
    from textseg_cli.data.prep.synthetic import prep_synthetic
    from textseg_cli.engine.setup import train
    from textseg_cli.engine.loop import Trainer

    data = tmp_path / "data"
    prep_synthetic(data, n_cases=5, size=(32, 32, 16), n_val=1, n_test=1, patch_size=(16, 16, 16))
    held, real_step = [], Trainer._step

    def step(self):
        held.append(self.method in fusion._CACHE)
        return real_step(self)

    monkeypatch.setattr(Trainer, "_step", step)
    train("mcnet", data, labeled="2", iterations=3, out=tmp_path / "run", device="cpu", quiet=True,
          sets=["method.backbone.n_filters=4", "train.batch_labeled=1", "train.batch_unlabeled=1", "val.every=1",
                "val.at_start=true"])
    assert held == [False, False, False]

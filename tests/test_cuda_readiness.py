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
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
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
    d0, d1 = (json.loads((tmp_path / f"decisions{r}.json").read_text()) for r in (0, 1))
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

"""Text-SemiSeg's default TMR against a hand computation of its documented formula, and the paper-table presets
(issue 26).

The paper's Eq. 2 is dimensionally ambiguous and the published layer gives the text no forward effect (one token
per plane), so textseg's default TMR (`models.text_fusion.TMR`, `method.tmr: paper`) is textseg's interpretation,
listed as such in docs/fidelity.md. It has no official counterpart to compare with; what is tested here is that
the module computes the formula its docstring and the ledger document, step by step with plain torch ops on small
float64 tensors (own multi-head attention, layer norm and sine-cosine table, no call into the module's code):

  per plane (coronal: mean over Y, sagittal: over X, axial: over Z; weights w_c, w_s, w_a):
    t_n = W_in P_n + b_in + PE(n)                      (P_n the pooled C-vector at plane position n)
    A   = LN(t + MHA(t, t, t))
    α   = softmax_n(Q(F_t) K(A)ᵀ / √d)                 (K × N)
    o_n = W_out (N · mean_k α_kn · V(A)_n) + b_out      (broadcast along the pooled axis)
  TMR(F_v) = F_v + Σ_planes w · o.

The tables that reproduce published numbers (`textseg experiment preset`) run the published layer instead.
"""

from __future__ import annotations

import math

import torch

from textseg_cli.experiments.presets import PRESETS, preset_spec, write_preset
from textseg_cli.experiments.spec import commands, load_experiment
from textseg_cli.methods.text_addon import bottleneck_grid, tmr_setting
from textseg_cli.models.text_fusion import TMR
from textseg_cli.runs.config import build_config


def _linear(x, lin):
    return x @ lin.weight.T + lin.bias


def _sincos(h, w, d):
    """PE(n) for position n = (r, c) in row-major order: [sin(r ω_j), cos(r ω_j), sin(c ω_j), cos(c ω_j)], ω_j =
    10000^(−j / (d/4)), j < d/4."""
    q = d // 4
    rows = []
    for r in range(h):
        for c in range(w):
            om = [10000 ** (-j / q) for j in range(q)]
            rows.append([math.sin(r * o) for o in om] + [math.cos(r * o) for o in om]
                        + [math.sin(c * o) for o in om] + [math.cos(c * o) for o in om])
    return torch.tensor(rows, dtype=torch.float64)


def _mha(t, mha):
    """Multi-head self-attention written out: in-projection split into q, k, v and heads, softmax(q kᵀ/√d_h) v."""
    d = t.shape[-1]
    h = mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(d)
    bq, bk, bv = mha.in_proj_bias.split(d)
    q, k, v = t @ wq.T + bq, t @ wk.T + bk, t @ wv.T + bv
    dh = d // h
    heads = []
    for i in range(h):
        s = slice(i * dh, (i + 1) * dh)
        att = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(dh), dim=-1)
        heads.append(att @ v[:, s])
    return torch.cat(heads, dim=-1) @ mha.out_proj.weight.T + mha.out_proj.bias


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def hand_tmr(tmr, fv, text):
    """The documented formula for one volume fv (C, X, Y, Z) and text (K, d)."""
    d = text.shape[-1]
    out = fv.clone()
    # (plane, pooled axis of (X, Y, Z), its weight): w_c, w_s, w_a in this order
    for (pool_axis, w) in zip((1, 0, 2), tmr.plane_weights):
        pooled = fv.mean(dim=1 + pool_axis)  # (C, a, b)
        c, a, b = pooled.shape
        tokens = torch.stack([_linear(pooled[:, i, j], tmr.proj_in) for i in range(a) for j in range(b)])
        tokens = tokens + _sincos(a, b, d)
        att_in = _layer_norm(tokens + _mha(tokens, tmr.self_attn), tmr.norm)
        alpha = torch.softmax(_linear(text, tmr.q) @ _linear(att_in, tmr.k).T / math.sqrt(d), dim=-1)  # (K, N)
        n = alpha.shape[1]
        weight = n * alpha.mean(dim=0)
        o = torch.stack([_linear(weight[i] * _linear(att_in[i], tmr.v), tmr.proj_out) for i in range(n)])  # (N, C)
        plane = o.T.reshape(c, a, b).unsqueeze(1 + pool_axis)
        out = out + w * plane.expand_as(fv)
    return out


def test_default_tmr_equals_a_hand_computation_of_its_documented_formula():
    torch.manual_seed(0)
    tmr = TMR(channels=4, text_dim=8, heads=2).double().eval()
    with torch.no_grad():  # nothing left at its trivial initial value: LN affine, biases and distinct plane weights
        tmr.norm.weight.normal_(1.0, 0.3)
        tmr.norm.bias.normal_(0.0, 0.3)
        tmr.self_attn.in_proj_bias.normal_(0.0, 0.3)
        tmr.plane_weights.copy_(torch.tensor([0.2, -0.7, 1.3]))
    fv = torch.randn(2, 4, 2, 3, 5, dtype=torch.float64)  # X, Y, Z all different: a swapped axis changes shapes
    text = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        got = tmr(fv, text)
        for i in range(fv.shape[0]):
            # 1e-7: the module builds its fixed sine-cosine table in float32 (3e-8 from the float64 one here)
            assert torch.allclose(got[i], hand_tmr(tmr, fv[i], text), rtol=0, atol=1e-7)
        # the text has a forward effect in this reading (it has none in the published layer but for the count K)
        assert not torch.allclose(got, tmr(fv, torch.randn(3, 8, dtype=torch.float64)), atol=1e-6)


def test_paper_table_presets_run_text_semiseg_with_the_official_tmr(tmp_path):
    tables = [name for name, p in PRESETS.items() if "text-semiseg" in p["methods"]]
    assert tables == ["pancreas", "brats"]
    # the packaged default stays textseg's interpretation
    assert build_config("text-semiseg", "pancreas", 3, None)["method"]["tmr"] == "paper"
    for name in tables:
        entry = next(m for m in preset_spec(name)["methods"] if m["method"] == "text-semiseg")
        assert entry["set"] == ["method.tmr=official", "train.precision=fp32"]
        cfg = build_config("text-semiseg", name, 3, None, sets=entry["set"])
        assert tmr_setting(cfg["method"]) == "official"
        assert bottleneck_grid(cfg["data"]["patch_size"]) == (6, 6, 6)  # the official layer's 6³ (MC_CLIP.py:204-205)
        # the written preset keeps it, and the runs' command lines carry it
        exp = load_experiment(write_preset(name, tmp_path / f"{name}.yaml"))
        e = next(m for m in exp.methods if m.method == "text-semiseg")
        assert e.sets == ["method.tmr=official", "train.precision=fp32"]
        run = next(r for r in exp.runs() if r.entry.method == "text-semiseg")
        assert "--set method.tmr=official" in commands(exp, run, True)[0]
        # other methods get only the official codes' fp32 training precision
        assert all(m.sets == ["train.precision=fp32"] for m in exp.methods
                   if m.method != "text-semiseg" and not m.id.endswith("_plustext"))  # "+Text" rows: text_addon too
        assert "--set train.precision=fp32" in commands(exp, run, True)[0]

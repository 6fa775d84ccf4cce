"""The code fallbacks of the methods equal their shipped configs (issue 26).

A method reads its hyper-parameters as `hp.get("ema_decay", 0.99)`: the literal is what runs when a user's config
leaves the key out. Each such literal (and the weight/ramp defaults passed to `ssl_common.ramped_weight`) is found
with `ast` in `textseg_cli/methods/<module>.py` and compared with the value the method's packaged config ships
(`runs.config.build_config(method)`, no data-set profile), so changing a constant on one side only fails here.
The values themselves are compared with the official code by tests/parity/test_config_parity.py, which also
checks BCP's region weights against the official `mix_loss` calls; `test_bcp_region_weights` pins them here too.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

import torch

from textseg_cli.data.batch import Batch
from textseg_cli.methods import bcp as bcp_module
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method, list_methods
from textseg_cli.runs.config import build_config

_HELPERS = {"backbone_kwargs": ["backbone"], "text_hparams": ["text"]}  # helpers that return a sub-section
_MISS = object()


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):  # 2 / 3
            return _literal(node.left) / _literal(node.right)
        raise


def _path(node: ast.AST, env: dict[str, list[str]]) -> list[str] | None:
    """The `method.*` config path an expression reads, or None."""
    if isinstance(node, ast.Attribute) and node.attr == "hparams":
        return []
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):  # hp.get("x") or {}
        return _path(node.values[0], env)
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id == "dict" and node.args:
            return _path(node.args[0], env)
        if isinstance(f, ast.Name) and f.id in _HELPERS and node.args:
            base = _path(node.args[0], env)
            return None if base is None else base + _HELPERS[f.id]
        if isinstance(f, ast.Attribute) and f.attr == "get" and node.args and isinstance(node.args[0], ast.Constant):
            base = _path(f.value, env)
            return None if base is None else base + [node.args[0].value]
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        base = _path(node.value, env)
        return None if base is None else base + [node.slice.value]
    return None


def code_fallbacks(module) -> list[tuple[tuple[str, ...], Any, str]]:
    """[(path under `method`, fallback literal, file:line)] of one methods module."""
    src = inspect.getsource(module)
    tree = ast.parse(src)
    name = Path(module.__file__).name
    out = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        env = {a.arg: [] for a in fn.args.args if a.arg in ("hp", "hparams")}
        nodes = sorted((n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.Call))),
                       key=lambda n: (n.lineno, n.col_offset))
        for n in nodes:
            if isinstance(n, ast.Assign):
                p = _path(n.value, env)
                for t in n.targets:
                    if isinstance(t, ast.Name):
                        if p is not None:
                            env[t.id] = p
                        else:
                            env.pop(t.id, None)
                continue
            f = n.func
            if isinstance(f, ast.Attribute) and f.attr == "get" and len(n.args) == 2 \
                    and isinstance(n.args[0], ast.Constant):
                base = _path(f.value, env)
                try:
                    default = _literal(n.args[1])
                except ValueError:
                    continue
                if base is not None:
                    out.append((tuple(base + [n.args[0].value]), default, f"{name}:{n.lineno}"))
            elif isinstance(f, ast.Name) and f.id == "ramped_weight" and _path(n.args[0], env) is not None:
                for key, arg in zip(("weight", "rampup", "per"), n.args[2:]):
                    out.append((("consistency", key), _literal(arg), f"{name}:{n.lineno}"))
    return out


# keys whose code default is the only value (the shipped config leaves them out on purpose), with the reason
CODE_ONLY = {
    ("tgcnet", ("class_template",)): "prompt template of multi-class data sets; no official code, paper only",
}


def _cases():
    cases = []
    for method, cls in list_methods().items():
        module = inspect.getmodule(cls)
        for path, default, where in code_fallbacks(module):
            cases.append((method, path, default, where))
    return cases


CASES = _cases()


def test_the_scan_finds_the_audited_fallbacks():
    found = {(m, p) for m, p, _, _ in CASES}
    assert set(CODE_ONLY) <= found, "stale CODE_ONLY entries"
    assert {("uamt", ("ema_decay",)), ("bcp", ("cuboid_ratio",)), ("bcp", ("unlabeled_weight",)),
            ("lvit-unet", ("dice_weight",)), ("lvit-unet", ("bce_weight",)), ("dtc", ("sdf_sharpness",)),
            ("mcnet", ("consistency", "temperature")), ("mcf", ("disagreement_weight",)),
            ("text-semiseg", ("dca_start",)), ("uamt", ("consistency", "weight"))} <= found


@pytest.mark.parametrize("method,path,default,where", CASES,
                         ids=[f"{m}-{'.'.join(map(str, p))}-{w}" for m, p, _, w in CASES])
def test_code_fallback_equals_the_shipped_config(method, path, default, where):
    node: Any = build_config(method)["method"]
    for part in path:
        node = node.get(part, _MISS) if isinstance(node, dict) else _MISS
    if node is _MISS:
        assert (method, path) in CODE_ONLY, (f"{where}: method.{'.'.join(path)} has a code fallback {default!r} but "
                                             f"configs/{method}.yaml does not ship the key")
        return
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(node, (int, float)):
        assert node == pytest.approx(default, rel=1e-6), f"{where}: fallback {default!r}, config {node!r}"
    elif isinstance(default, tuple):
        assert list(node) == list(default), f"{where}: fallback {default!r}, config {node!r}"
    else:
        assert node == default, f"{where}: fallback {default!r}, config {node!r}"


def test_bcp_region_weights(monkeypatch):
    """BCP self-training (bcp.py docstring, BCP LA_BCP_train.py:254-255): the region taken from a labeled image
    weighs 1, the region from an unlabeled image `method.unlabeled_weight`, in both mixed images."""
    cfg = build_config("bcp", "la", 3, [16, 16, 16],
                       sets=["method.backbone.n_filters=2", "method.unlabeled_weight=0.25",
                             "method.pretrain_iterations=1", "optim.step_offset=1"])
    m = build_method("bcp", cfg, 1, 2, dim=3, patch_size=[16, 16, 16])
    seen = []
    real = bcp_module.mix_loss

    def recording(logits, outside, inside, mask, w_outside, w_inside):
        seen.append((outside, inside, float(w_outside), float(w_inside)))
        return real(logits, outside, inside, mask, w_outside, w_inside)

    monkeypatch.setattr(bcp_module, "mix_loss", recording)
    g = torch.Generator().manual_seed(0)
    lab = (torch.rand(4, 16, 16, 16, generator=g) > 0.5).long()
    batch = Batch(torch.randn(4, 1, 16, 16, 16, generator=g), lab, torch.randn(4, 1, 16, 16, 16, generator=g))
    m.training_step(batch, StepContext(iteration=1, max_iterations=2, device=torch.device("cpu")))
    (out_in, in_in, wo_in, wi_in), (out_out, in_out, wo_out, wi_out) = seen
    assert torch.equal(out_in, lab[:2]) and (wo_in, wi_in) == (1.0, 0.25)  # X_in: labeled outside, unlabeled inside
    assert torch.equal(in_out, lab[2:]) and (wo_out, wi_out) == (0.25, 1.0)  # X_out: unlabeled outside, labeled in

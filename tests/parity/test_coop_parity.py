"""Parity of Text-SemiSeg's text source (learnable CoOp prompts) with the published `model/CoOp.py`.

Written against taozh2017/Text-SemiSeg@18ceced684b84b1ac2d5f0b6905951292a81e71a. Run with
`TEXTSEG_OFFICIAL=DIR pytest -m parity tests/parity/test_coop_parity.py` (DIR/Text-SemiSeg a work tree).

The official trainer builds `PromptMaker(args, prompts, clip, n_ctx=args.n_ctx)` (trainer.py:58-72) over OpenAI's
`clip.load("ViT-B/32")` (model/CLIP/clip); textseg's default is `text_addon.build_text_source` (CoOp over the
open_clip ViT-B/32 text tower, `method.text.normalize: true`). Both are given the same seeded random CLIP weights
(no download: an open_clip ViT-B/32 with OpenAI's QuickGELU activation, seeded, passed through the official
`build_model` as `clip.load` does, and the resulting weights copied back into the open_clip model) and the same
seed before the context vectors are drawn; compared: the context initialisation, the prompts' token ids, the text
features and their gradient with respect to the context vectors. The class names come from each code's own
source: the official trainer's `prompts` lists (read with `ast`, not restated) and textseg's `prompts/*.yaml`.

Two run-time shims, neither a difference of method:
- the official folder holds code and text only, so OpenAI's BPE vocabulary file (`bpe_simple_vocab_16e6.txt.gz`,
  read when `model/CLIP/clip/simple_tokenizer.py` is imported) is taken from open_clip, which ships the same file
  (the token ids of the prompts are compared below); `pkg_resources`, imported by clip.py only for a version
  check, is given `packaging`;
- the official `TextEncoder` casts the prompts to fp16 (`x.half()`, CoOp.py:23) because `clip.load` keeps fp16
  weights on the GPU; on the CPU `clip.load` returns fp32 weights (clip.py:139-141) and the cast would fail, so it
  is a no-op for float32 tensors while the official forward runs. textseg runs the tower in fp32 on purpose.
"""

from __future__ import annotations

import ast
import copy
import gzip
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import packaging.version
import pytest
import torch
from _text_helpers import assert_close, official_imports, official_repo

from textseg_cli.methods import text_addon
from textseg_cli.runs.config import build_config
from textseg_cli.text.prompts import load_prompts

pytestmark = pytest.mark.parity

COMMIT = "18ceced684b84b1ac2d5f0b6905951292a81e71a"
# the official trainer's data set keys (`"Lung" in args.dataset`, trainer.py:61-66) → textseg's prompt files
DATASETS = {"Pancreas": "pancreas", "BraTS": "brats", "Lung": "lung"}


@pytest.fixture(scope="module")
def repo():
    return official_repo("Text-SemiSeg", COMMIT)


def official_prompt_lists(repo: Path) -> dict[str, tuple[list[str], int]]:
    """{data set key: (class names, line)} from trainer.py's `if "<key>" in args.dataset: prompts = [...]` chain."""
    found = {}
    for node in ast.walk(ast.parse((repo / "trainer.py").read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Constant) and isinstance(node.test.ops[0], ast.In)
                and ast.unparse(node.test.comparators[0]) == "args.dataset"):
            continue
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and [ast.unparse(t) for t in stmt.targets] == ["prompts"]
                    and isinstance(stmt.value, ast.List)):
                found[node.test.left.value] = ([ast.literal_eval(e) for e in stmt.value.elts], stmt.lineno)
    return found


def official_default(repo: Path, flag: str) -> int:
    """The default of `--<flag>` in train.py's argparse."""
    m = re.search(rf"add_argument\('--{flag}',\s*type=int,\s*default=(\d+)", (repo / "train.py").read_text())
    assert m, f"--{flag} not found in train.py"
    return int(m.group(1))


def test_class_names_are_the_official_trainers(repo):
    lists = official_prompt_lists(repo)
    assert set(lists) == set(DATASETS), sorted(lists)
    for key, name in DATASETS.items():
        names, line = lists[key]
        assert load_prompts(name).class_names == names, f"prompts/{name}.yaml vs trainer.py:{line} {names}"


@pytest.fixture(scope="module")
def official_coop(repo):
    """(the official CoOp module, the official CLIP building function), imported with the two shims."""
    mp = pytest.MonkeyPatch()
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    real_open = gzip.open
    mp.setattr(gzip, "open", lambda f, *a, **k: real_open(
        bpe if Path(str(f)).name == bpe.name and not Path(str(f)).exists() else f, *a, **k))
    mp.setitem(sys.modules, "pkg_resources", SimpleNamespace(packaging=packaging))
    try:
        with official_imports(repo) as imp:
            coop = imp("model.CoOp")
            clip_model = imp("model.CLIP.clip.model")
            clip_api = imp("model.CLIP.clip")
    finally:
        mp.undo()
    return coop, clip_model, clip_api


@pytest.fixture(scope="module")
def clip_pair(official_coop):
    """(official CLIP as `clip.load(device="cpu")` returns it, open_clip model with the same weights, tokenizer)."""
    _, clip_model, _ = official_coop
    torch.manual_seed(0)
    ours = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()  # OpenAI's activation
    off = clip_model.build_model(copy.deepcopy(ours.state_dict())).float()  # clip.py:139-141 (fp16 round trip)
    missing, unexpected = ours.load_state_dict(off.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return off, ours, open_clip.get_tokenizer("ViT-B-32")


def _no_half(monkeypatch):
    real = torch.Tensor.half
    monkeypatch.setattr(torch.Tensor, "half", lambda self, *a, **k: self if self.dtype == torch.float32
                        else real(self, *a, **k))


@pytest.mark.parametrize("dataset", ["lung", "pancreas"])
def test_coop_text_features_and_gradients_parity(repo, official_coop, clip_pair, monkeypatch, dataset):
    coop, _, clip_api = official_coop
    off_clip, our_clip, tokenizer = clip_pair
    key = next(k for k, v in DATASETS.items() if v == dataset)
    names = official_prompt_lists(repo)[key][0]
    n_ctx = official_default(repo, "n_ctx")

    # official: trainer.py:58-72 (PromptMaker with CSC=True, class token at the end, n_ctx from train.py)
    torch.manual_seed(5)
    maker = coop.PromptMaker(args=SimpleNamespace(device="cpu"), prompts=names, clip_model=off_clip, n_ctx=n_ctx)
    # textseg: Text-SemiSeg's packaged text settings, the class names of prompts/<dataset>.yaml
    cfg = build_config("text-semiseg", dataset, 3, [96, 96, 96], sets=["method.text.clip_pretrained=none"])
    assert int(cfg["method"]["text"]["n_ctx"]) == n_ctx and cfg["method"]["text"]["normalize"] is True
    monkeypatch.setitem(text_addon._CLIP_CACHE, ("ViT-B-32", "None"), (our_clip, tokenizer))
    torch.manual_seed(5)
    source = text_addon.build_text_source(cfg["method"], {"dataset_name": dataset, "class_names": None}, 2,
                                          "text-semiseg")
    ours = source.coop

    # same prompts and tokens ("X X X X {name}."), same context initialisation N(0, 0.02) from the same seed
    assert ours.class_names == names
    assert torch.equal(ours.tokens.long(), maker.tokenized_prompts.long())
    assert torch.equal(ours.tokens.long(), clip_api.tokenize([f"{' '.join(['X'] * n_ctx)} {n}." for n in names]).long())
    assert torch.equal(ours.ctx.detach(), maker.prompt_learner.ctx.detach())
    assert ours.ctx.shape == (len(names), n_ctx, 512)  # class-specific context (CSC=True)

    # same text features (L2-normalised per class, CoOp.py:199) and the same gradient w.r.t. the context
    weights = torch.randn(len(names), 512, generator=torch.Generator().manual_seed(9))
    with monkeypatch.context() as m:
        _no_half(m)
        ref = maker()
        (ref * weights).sum().backward()
    source.train()
    got = source()
    (got * weights).sum().backward()
    assert got.dtype == torch.float32 and ref.dtype == torch.float32
    assert_close(got.detach(), ref.detach(), atol=1e-5, what="text features")
    g_off, g_ours = maker.prompt_learner.ctx.grad, ours.ctx.grad
    assert g_off is not None and float(g_off.norm()) > 0
    err, ref_norm = float((g_ours - g_off).norm()), float(g_off.norm())
    assert err <= 1e-4 * ref_norm, f"context gradient: ||diff|| {err:.3g} vs ||grad|| {ref_norm:.3g}"

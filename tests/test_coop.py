"""Learnable CoOp prompts over a frozen CLIP ViT-B/32 text tower (random weights, offline)."""

from __future__ import annotations

import pytest
import torch

from textseg_cli.text.coop import CoOpTextEncoder

CLASSES = ["background", "left atrium"]


@pytest.fixture(scope="module")
def clip_parts():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture
def coop(clip_parts):
    torch.manual_seed(1)
    model, tok = clip_parts
    return CoOpTextEncoder(model, tok, CLASSES, n_ctx=4)


def test_shape_and_only_context_is_a_parameter(coop):
    feats = coop()
    assert feats.shape == (2, 512) and feats.dtype == torch.float32
    assert [name for name, _ in coop.named_parameters()] == ["ctx"]
    assert coop.ctx.shape == (2, 4, 512)  # class-specific, 4 vectors of the text width
    assert list(coop.state_dict()) == ["ctx"]  # checkpoints hold no frozen tower weights
    assert 0.015 < coop.ctx.std().item() < 0.025 and abs(coop.ctx.mean().item()) < 0.005


def test_gradient_reaches_only_the_context_and_training_moves_features(coop):
    tower_params = [p for m in coop.tower.modules() for p in m.parameters()] + coop.tower.tensors()
    assert tower_params and not any(p.requires_grad for p in tower_params)
    with torch.no_grad():
        before = coop()
    opt = torch.optim.SGD(coop.parameters(), lr=10.0)
    coop()[1].pow(2).sum().backward()  # a loss on class 1's feature only
    assert all(p.grad is None for p in tower_params)
    g = coop.ctx.grad.abs().sum(dim=(1, 2))
    assert g[1] > 0 and g[0] == 0  # each class's context gets gradient from its own feature only
    opt.step()
    with torch.no_grad():
        after = coop()
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1], atol=1e-5)


def test_word_embeddings_as_context_reproduce_clip(coop, clip_parts):
    model, tok = clip_parts
    ids = tok([f"X X X X {c}." for c in CLASSES])
    with torch.no_grad():
        coop.ctx.copy_(model.token_embedding(ids)[:, 1:5])
        ref = model.encode_text(ids)
        assert torch.allclose(coop(), ref, atol=1e-5)


def test_different_context_gives_different_features(coop):
    with torch.no_grad():
        a = coop().clone()
        coop.ctx.add_(0.05 * torch.randn_like(coop.ctx))
        b = coop()
    assert not torch.allclose(a, b, atol=1e-4)
    tokens_out = coop(return_tokens=True)
    assert tokens_out[0].shape == (2, 512) and tokens_out[1].shape == (2, 77, 512)


def test_tower_stays_fp32_under_autocast_and_dtype_changes(coop):
    coop.to(torch.bfloat16)
    assert coop.ctx.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in coop.tower.modules() for p in m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = coop()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

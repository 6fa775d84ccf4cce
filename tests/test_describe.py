"""`textseg describe` against a local OpenAI-compatible server (real sockets, real openai client)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from fake_openai_server import FakeOpenAIServer

from textseg_cli.errors import ConfigError, TextsegError
from textseg_cli.text.describe import (count_words, describe, describe_per_case, load_aux_texts, offline_aux_prompt,
                                       parse_descriptions, select_descriptions)
from textseg_cli.text.prompts import load_aux_template

KEY = "sk-test-secret-123"
FILLER = ("with a consistent lobulated outline, homogeneous enhancement, clear fat planes towards the "
          "duodenum and stomach, a stable relationship with the splenic vein and the superior mesenteric "
          "vessels, and partial volume effects at thin margins that need careful attention during contouring, "
          "while the surrounding fat, bowel loops and large vessels remain outside the target region")


def feature(i: int) -> str:
    return f"The pancreas shows feature number {i} in the retroperitoneum {FILLER} across slice {i}."


def numbered_reply(n: int = 15) -> str:
    items = "\n".join(f"{i}. **Feature {i}:** {feature(i)}" for i in range(1, n + 1))
    return f"Here are {n} crucial features for segmenting the pancreas:\n\n{items}\n\nThese features together help."


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("TEXTSEG_PROMPTS", raising=False)


@pytest.fixture
def server():
    with FakeOpenAIServer(default_content=numbered_reply()) as s:
        yield s


def _describe(server, out, *extra):
    return run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--base-url", server.url,
                   "--out", out, "--backoff", "0.01", *extra)


# --- parsing -------------------------------------------------------------------------------------

def test_parse_numbered_list_drops_preamble_and_closing_remark():
    items = parse_descriptions(numbered_reply(15))
    assert len(items) == 15
    assert items[0].startswith("Feature 1: The pancreas shows feature number 1")
    assert "**" not in items[0] and not items[-1].endswith("help.")


@pytest.mark.parametrize("reply", [
    # markdown headings followed by a paragraph
    "\n\n".join(f"### {i}. Aspect {i}\n{feature(i)}" for i in range(1, 4)),
    # bold titles on their own line, paragraph after a blank line
    "Sure!\n\n" + "\n\n".join(f"**Aspect {i}**\n\n{feature(i)}" for i in range(1, 4)),
    # bullets with wrapped continuation lines
    "\n".join(f"- {feature(i)[:60]}\n  {feature(i)[60:]}" for i in range(1, 4)),
    # "Description N:" labels and 1) numbering mixed with blank lines
    "\n\n".join(f"Description {i}: {feature(i)}" for i in range(1, 4)),
    "\n".join(f"{i}) {feature(i)}" for i in range(1, 4)),
    # plain paragraphs with an introduction line
    "Here are the descriptions:\n\n" + "\n\n".join(feature(i) for i in range(1, 4)),
])
def test_parse_formats(reply):
    items = parse_descriptions(reply)
    assert len(items) == 3
    for i, item in enumerate(items, start=1):
        assert f"feature number {i} " in item and item.endswith(f"slice {i}.")
        assert "**" not in item and "#" not in item


def test_numbers_inside_wrapped_lines_do_not_start_items():
    reply = "1. The head measures\n12.5 mm on average in adults.\n2. The tail is thin."
    assert parse_descriptions(reply) == ["The head measures 12.5 mm on average in adults.", "The tail is thin."]


def test_select_descriptions_counts_and_lengths():
    long = [feature(i) for i in range(5)]
    chosen, problem = select_descriptions(long + ["too short"], 5, 40)
    assert chosen == long and problem is None
    chosen, problem = select_descriptions(long[:3] + [long[0], "short one"], 5, 40)
    assert chosen is None and "4 distinct" in problem and "3 of at least 40 words" in problem
    assert count_words("A well-defined, 3-cm mass.") == 4


# --- describe against the local server -----------------------------------------------------------

def test_describe_writes_15_and_second_run_sends_nothing(server, tmp_path):
    out = tmp_path / "desc.json"
    code, text = _describe(server, out)
    assert code == 0, text
    assert len(server.requests) == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["authorization"] == f"Bearer {KEY}"
    assert req["json"]["model"] == "gpt-4" and req["json"]["temperature"] == 0.7
    assert "Generate 15 descriptive crucial features" in req["json"]["messages"][-1]["content"]

    raw = out.read_text(encoding="utf-8")
    assert KEY not in raw  # the key is never written
    rec = json.loads(raw)
    assert rec["model"] == "gpt-4" and rec["base_url"] == server.url
    assert rec["prompt"] == req["json"]["messages"] and rec["parameters"] == {"temperature": 0.7}
    assert rec["raw_reply"] == numbered_reply() and rec["timestamp"]
    assert len(rec["descriptions"]) == 15 and min(rec["word_counts"]) >= 60

    code, text = _describe(server, out)  # cached: no request, identical file kept
    assert code == 0 and "from cache" in text and "unchanged" in text
    assert len(server.requests) == 1
    server.default_content = numbered_reply().replace("help.", "help a lot.")
    code, text = _describe(server, out, "--refresh")  # a different new reply needs --force
    assert code == 2 and "--force" in text and len(server.requests) == 2
    code, _ = _describe(server, out, "--refresh", "--force")
    assert code == 0 and len(server.requests) == 3


def test_cache_key_covers_model_prompt_and_parameters(server, tmp_path):
    kw = dict(dataset="pancreas", llm="gpt-4", base_url=server.url, backoff=0.01)
    a = describe(**kw)
    b = describe(**kw)
    c = describe(**kw, temperature=0.3)
    d = describe(**kw, n=15, min_words=50)
    e = describe(**{**kw, "llm": "local-model"})
    assert len(server.requests) == 4 and not a.cached and b.cached and b.requests == 0
    assert len({a.record["cache_key"], c.record["cache_key"], d.record["cache_key"], e.record["cache_key"]}) == 4


def test_retries_on_429_5xx_and_timeouts(server, tmp_path):
    server.push(status=429, times=2)
    server.push(status=503)
    code, text = _describe(server, tmp_path / "a.json")
    assert code == 0, text
    assert len(server.requests) == 4 and text.count("retry") == 3
    server.push(delay=1.5)  # longer than --timeout: a timeout, then success
    code, text = _describe(server, tmp_path / "b.json", "--refresh", "--timeout", "0.5")
    assert code == 0, text
    assert "timeout" in text and len(server.requests) == 6


def test_exhausted_retries_give_one_line_error(server, tmp_path):
    server.push(status=500, times=3)
    code, text = _describe(server, tmp_path / "a.json", "--retries", "2")
    assert code == 2 and len(server.requests) == 3
    err = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "server error 500" in err[0] and "3 attempt" in err[0]
    assert not (tmp_path / "a.json").exists()


def test_insufficient_quota_is_not_retried(server, tmp_path):
    server.push(status=429, body={"error": {"message": "You exceeded your quota", "code": "insufficient_quota"}})
    code, text = _describe(server, tmp_path / "a.json")
    assert code == 2 and "quota" in text and len(server.requests) == 1


@pytest.mark.parametrize("setup, fragment", [
    (lambda s: None, "model 'gpt-5' not found"),
    (lambda s: s.push(status=400), "refused"),
    (lambda s: s.push(status=403), "refused"),
    (lambda s: s.push(status=401), "rejected the API key"),
    (lambda s: s.push(content="", finish_reason="content_filter"), "content filter"),
    (lambda s: s.push(body={"unexpected": True}), "malformed reply"),
])
def test_server_errors_are_clear(server, tmp_path, setup, fragment):
    setup(server)
    model = "gpt-5" if "gpt-5" in fragment else "gpt-4"
    code, text = run_cli("describe", "--dataset", "pancreas", "--llm", model, "--base-url", server.url,
                         "--out", tmp_path / "x.json", "--backoff", "0.01")
    assert code == 2 and fragment in text and "Traceback" not in text
    assert len(server.requests) == 1  # none of these is retried


def test_missing_key_and_unreachable_server(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    code, text = run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--base-url",
                         "https://llm.invalid/v1", "--out", tmp_path / "x.json")
    assert code == 2 and "OPENAI_API_KEY is not set" in text
    code, text = run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--api-key-env", "MY_KEY",
                         "--base-url", "https://llm.invalid/v1", "--out", tmp_path / "x.json")
    assert code == 2 and "MY_KEY is not set" in text
    # a loopback server needs no key; nothing listens on port 9 (discard)
    code, text = run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--base-url",
                         "http://127.0.0.1:9/v1", "--retries", "1", "--backoff", "0.01", "--out", tmp_path / "x.json")
    assert code == 2 and "cannot connect" in text and "2 attempt" in text


def test_api_key_env_and_base_url_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OTHER_KEY", "sk-other")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    code, text = run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--api-key-env", "OTHER_KEY",
                         "--out", tmp_path / "x.json")
    assert code == 0, text
    assert server.requests[0]["authorization"] == "Bearer sk-other"
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8"))["base_url"] == server.url


def test_short_reply_error_or_retry(server, tmp_path):
    server.push(content=numbered_reply(10))
    code, text = _describe(server, tmp_path / "a.json")
    assert code == 2 and "10 distinct" in text and "--on-short retry" in text and len(server.requests) == 1
    # with retry the cached short reply is reused and a second draw is requested
    code, text = _describe(server, tmp_path / "a.json", "--on-short", "retry")
    assert code == 0, text
    rec = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert len(rec["descriptions"]) == 15 and len(rec["rejected_replies"]) == 1
    assert len(server.requests) == 2
    code, _ = _describe(server, tmp_path / "a.json", "--on-short", "retry")
    assert code == 0 and len(server.requests) == 2  # both draws cached
    # too short: every item under --min-words
    server.push(content="\n".join(f"{i}. The pancreas, point {i}." for i in range(1, 16)))
    code, text = _describe(server, tmp_path / "b.json", "--refresh")
    assert code == 2 and "0 of at least 60 words" in text


def test_more_items_than_needed_takes_the_first_n(server, tmp_path):
    server.push(content=numbered_reply(17))
    res = describe("pancreas", "gpt-4", n=15, base_url=server.url, backoff=0.01)
    assert res.record["parsed_items"] == 17 and len(res.record["descriptions"]) == 15
    assert "feature number 15 " in res.record["descriptions"][-1]


def test_offline_and_auto_without_key(tmp_path, monkeypatch):
    code, text = run_cli("describe", "--dataset", "la", "--llm", "offline", "--out", tmp_path / "la.json")
    assert code == 0, text
    rec = json.loads((tmp_path / "la.json").read_text(encoding="utf-8"))
    assert rec["model"] == "offline" and len(rec["descriptions"]) == 15 and rec["base_url"] is None
    monkeypatch.delenv("OPENAI_API_KEY")
    code, text = run_cli("describe", "--dataset", "la", "--n", "5", "--out", tmp_path / "auto.json")
    assert code == 0 and "not set" in text and "offline" in text
    assert json.loads((tmp_path / "auto.json").read_text(encoding="utf-8"))["descriptions"] == rec["descriptions"][:5]
    code, text = run_cli("describe", "--dataset", "la", "--llm", "offline", "--n", "16", "--out", tmp_path / "x.json")
    assert code == 2 and "15 distinct" in text
    with pytest.raises(ConfigError, match="no bundled descriptions"):
        describe("generic", "offline")


# --- per-case auxiliary prompts ------------------------------------------------------------------

def _prepared(tmp_path: Path, texts: dict[str, str | None]) -> Path:
    root = tmp_path / "prep2d"
    root.mkdir()
    cases = []
    for cid, text in texts.items():
        c = {"id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz", "shape": [8, 8],
             "spacing": [1.0, 1.0]}
        if text is not None:
            c["text"] = text
        cases.append(c)
    spec = {"format": "textseg-prepared/1", "name": "qata", "dim": 2, "modality": "X-ray", "channel_names": ["xray"],
            "class_names": ["background", "infection"], "cases": cases,
            "splits": {"train": list(texts), "val": [], "test": []}, "preprocessing": [],
            "source": {"layout": "test"}, "tool_version": "test"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


PRIMARY = "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."


def test_offline_aux_rule_is_deterministic_and_documented():
    tpl = load_aux_template()
    aux = offline_aux_prompt(PRIMARY, "X-ray", tpl)
    assert aux == "CXR: Bilateral lung opacities, 2 opacity regions, all left lung and lower right lung."
    assert offline_aux_prompt(PRIMARY, "X-ray", tpl) == aux
    assert offline_aux_prompt("The nuclei density in the upper right is high.", "histology", tpl) == \
        "H&E histology: dense nuclei in upper right region."
    assert offline_aux_prompt("Two lesions, upper left and lower right.", None, tpl) == \
        "Image: 2 lesions, upper left and lower right."


def test_per_case_offline(tmp_path):
    root = _prepared(tmp_path, {"a": PRIMARY, "b": "One infected area, lower left lung.", "c": None})
    code, text = run_cli("describe", "--per-case", root, "--llm", "offline")
    assert code == 0, text
    rec = json.loads((root / "aux_texts.json").read_text(encoding="utf-8"))
    assert rec["mode"] == "offline-rules" and rec["skipped"] == ["c"]
    assert set(rec["aux_texts"]) == {"a", "b"} and rec["primary_texts"]["a"] == PRIMARY
    assert load_aux_texts(root) == rec["aux_texts"]
    code, text = run_cli("describe", "--per-case", root, "--llm", "offline")
    assert code == 0 and "unchanged" in text


def test_per_case_with_llm_is_cached_per_text(server, tmp_path):
    root = _prepared(tmp_path, {"a": PRIMARY, "b": "One infected area, lower left lung.", "c": None})
    server.default_content = 'Auxiliary prompt: "CXR with diffuse left and focal right lower opacities."'
    res = describe_per_case(root, "gpt-4", base_url=server.url, backoff=0.01)
    assert len(server.requests) == 2 and res.requests == 2
    assert res.record["aux_texts"]["a"] == "CXR with diffuse left and focal right lower opacities."
    assert res.record["model"] == "gpt-4" and res.record["base_url"] == server.url
    sent = server.requests[0]["json"]["messages"][-1]["content"]
    assert PRIMARY in sent and "X-ray" in sent
    again = describe_per_case(root, "gpt-4", base_url=server.url, backoff=0.01)
    assert again.cached and again.requests == 0 and not again.written and len(server.requests) == 2
    # a changed text costs exactly one new request
    spec = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    spec["cases"][1]["text"] = "One infected area, upper left lung."
    (root / "dataset.json").write_text(json.dumps(spec))
    res = describe_per_case(root, "gpt-4", base_url=server.url, backoff=0.01, out=tmp_path / "aux2.json")
    assert len(server.requests) == 3 and res.out == tmp_path / "aux2.json"
    # empty reply → clear error naming the case
    server.push(content="")
    with pytest.raises(TextsegError, match="case 'a'.*empty reply"):
        describe_per_case(root, "gpt-4", base_url=server.url, refresh=True, out=tmp_path / "aux3.json")


def test_per_case_without_texts_is_an_error(tmp_path):
    root = _prepared(tmp_path, {"a": None})
    code, text = run_cli("describe", "--per-case", root, "--llm", "offline")
    assert code == 2 and "no case has a 'text'" in text and "dataset.json" in text

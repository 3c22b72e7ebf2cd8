"""scripts/bench_http.py on a tiny-model server: the tool variants it compares do the same work
(the same prompt tokens, the same completion tokens), and each timed round finds its prompts in the
prefix cache when asked to (warm) and none of them when not (cold)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_http.py"
MAX_TOKENS = 32


def _load():
    spec = importlib.util.spec_from_file_location("bench_http", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bench = _load()


def test_tools_and_their_text_do_the_same_work_from_a_warm_cache(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = bench.main(["--checkpoint", str(tiny_ckpt), "--slots", "4", "--streams", "4", "--requests", "4",
                     "--max-tokens", str(MAX_TOKENS), "--max-len", "512", "--rounds", "1",
                     # a pool holding both variants' prompts, so no eviction decides what a
                     # variant finds cached (the default pool is 4 x 512 positions)
                     "--kv-memory", "32MiB",
                     "--variants", "http-half-tools,http-half-tools-text", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    tools = data["results"]["http-half-tools"][-1]["requests"]
    text = data["results"]["http-half-tools-text"][-1]["requests"]
    # Every other request (from the first) offered the tools, or their generic rendering as text.
    assert [r["kind"] for r in tools] == ["tools", "plain"] * 2 and [r["kind"] for r in text] == ["tools-text",
                                                                                                   "plain"] * 2
    # The server's rendering of the tools is the text the bench sends, token for token: the same prompts.
    assert [r["prompt"] for r in tools] == [r["prompt"] for r in text]
    assert all(t["prompt"] > p["prompt"] + 100 for t, p in zip(tools[::2], tools[1::2]))  # the tools' schemas
    # Each tool request made a call; the unconstrained ones ran to max_tokens (ignore_eos).
    assert all(r["calls"] >= 1 for r in tools[::2]) and not any(r["calls"] for r in text)
    assert all(r["completion"] == MAX_TOKENS for r in tools[1::2] + text)
    # Warm: the untimed 1-token pass put each prompt in the prefix cache (all but its last token);
    # the round before it (the other variant's) had left only the prefixes they share.
    for r in tools + text:
        assert r["cached"] == r["prompt"] - 1, r
    assert data["work"]["http-half-tools"]["tools"]["prompt"] == data["work"]["http-half-tools-text"]["tools-text"][
        "prompt"]
    assert "the tool requests' prompts match" in capsys.readouterr().out


def test_cold_prompts_share_no_prefix_across_rounds_and_variants():
    chats = bench.chats(4)
    a, b, c = bench.cold_prompts(chats, 0, 0), bench.cold_prompts(chats, 1, 0), bench.cold_prompts(chats, 0, 1)
    for batch in (a, b, c):
        assert [m[1:] for m in batch] == chats and all(m[0]["role"] == "system" for m in batch)
    assert len({m[0]["content"] for m in a + b + c}) == 3  # one system turn per round and variant


def test_cold_rounds_find_no_prompt_cached_and_tools_match_their_text_token_for_token(tiny_ckpt, tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--checkpoint", str(tiny_ckpt), "--slots", "4", "--streams", "4", "--requests", "4",
                       "--max-tokens", "24", "--max-len", "512", "--rounds", "2", "--cache", "cold",
                       "--variants", "http-half-tools,http-half-tools-text", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for r in range(2):
        tools, text = (results[v][r]["requests"] for v in ("http-half-tools", "http-half-tools-text"))
        assert [x["prompt"] for x in tools] == [x["prompt"] for x in text]
        for x in tools + text:
            # Each request shares with the others of its round at most their common start (the
            # round's system turn, and the tools): never its whole prompt.
            assert x["cached"] < x["prompt"] - 1, x
        assert min(x["cached"] for x in tools + text) < 40  # a first request found its round's prefix new


def test_the_issue_25_line_compares_tools_with_their_text_and_says_when_the_work_differs():
    same = {"tools": {"prompt": 900, "completion": 100}, "plain": {"prompt": 80, "completion": 100}}
    same_text = {"tools-text": {"prompt": 900, "completion": 100}, "plain": {"prompt": 80, "completion": 100}}
    line = bench.tool_cost_line({"http-half-tools": 45.0, "http-half-tools-text": 50.0},
                                {"http-half-tools": same, "http-half-tools-text": same_text}, [0.8, 1.0])
    assert "= 0.90 (rounds: 0.80, 1.00) (cost 10 %)" in line and "prompts match" in line
    assert "completion tokens match" in line
    other = {"tools-text": {"prompt": 700, "completion": 100}, "plain": {"prompt": 80, "completion": 90}}
    line = bench.tool_cost_line({"http-half-tools": 50.0, "http-half-tools-text": 50.0},
                                {"http-half-tools": same, "http-half-tools-text": other})
    assert "prompts DIFFER (900 vs 700" in line and "completion tokens DIFFER" in line
    assert bench.tool_cost_line({"http": 1.0}, {"http": {}}) is None

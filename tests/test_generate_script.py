"""scripts/generate.py: the JSONL contract, error records, ordering and slot-count invariance."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "generate.py"


def run_script(tmp_path, ckpt, lines, *extra):
    inp, out = tmp_path / "in.jsonl", tmp_path / f"out{len(list(tmp_path.iterdir()))}.jsonl"
    inp.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(ckpt), "--input", str(inp),
                           "--output", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    return [json.loads(x) for x in out.read_text().splitlines()], summary


def test_capital_of_france_matches_hf_greedy_ids(tmp_path, real_ckpt, reference):
    case = next(c for c in reference["cases"] if c["id"] == "capital")
    line = {"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}
    [rec], summary = run_script(tmp_path, real_ckpt, [line], "--max-len", "192", "--max-prompt-len", "64",
                                "--slots", "2")
    assert rec["id"] == "a" and "Paris" in rec["text"]
    assert rec["token_ids"] == case["greedy_ids"][: len(rec["token_ids"])]
    assert rec["finish_reason"] == "stop"
    assert rec["prompt_tokens"] == len(case["prompt_ids"]) and rec["completion_tokens"] == len(rec["token_ids"])
    assert summary["requests"] == 1 and summary["completion_tokens"] == rec["completion_tokens"]


def test_slots_8_and_slots_1_give_the_same_greedy_outputs_in_input_order(tmp_path, tiny_ckpt):
    rng = np.random.default_rng(3)
    lines = []
    for i in range(32):
        kind = i % 3
        base = {"id": f"r{i}", "temperature": 0, "max_tokens": int(rng.integers(4, 24))}
        if kind == 0:
            base["prompt"] = f"Request number {i}: tell me about item {i * 7}."
        elif kind == 1:
            base["messages"] = [{"role": "user", "content": f"Question {i}?"}]
        else:
            base["token_ids"] = rng.integers(17, 49152, int(rng.integers(1, 50))).tolist()
        lines.append(base)
    out8, s8 = run_script(tmp_path, tiny_ckpt, lines, "--slots", "8", "--max-len", "128")
    out1, s1 = run_script(tmp_path, tiny_ckpt, lines, "--slots", "1", "--max-len", "128")
    assert [r["id"] for r in out8] == [f"r{i}" for i in range(32)]
    assert out8 == out1
    assert s8["requests"] == 32 and s8["errors"] == 0 and s8["completion_tokens"] == s1["completion_tokens"]
    assert all(r["finish_reason"] in ("stop", "length") for r in out8)


def test_bad_lines_get_precise_errors_and_the_rest_still_run(tmp_path, tiny_ckpt):
    lines = [
        {"id": "ok1", "prompt": "hello", "max_tokens": 3, "temperature": 0},
        "{not json",
        {"prompt": "no id"},
        {"id": "two", "prompt": "x", "token_ids": [1]},
        {"id": "temp", "prompt": "x", "temperature": -1},
        {"id": "vocab", "token_ids": [1, 49152]},
        {"id": "role", "messages": [{"role": "wizard", "content": "hi"}]},
        {"id": "long", "prompt": "x", "max_tokens": 500},
        {"id": "empty", "prompt": ""},
        {"id": "huge", "prompt": "x" * 5000},
        {"id": "i" * 300, "prompt": "x"},
        {"id": "ok2", "token_ids": [5, 6], "max_tokens": 2, "temperature": 0},
    ]
    out, summary = run_script(tmp_path, tiny_ckpt, lines, "--max-len", "128", "--max-line-bytes", "4096")
    assert len(out) == len(lines)
    assert out[0]["id"] == "ok1" and out[0]["completion_tokens"] == 3
    assert out[1]["line"] == 2 and "invalid JSON" in out[1]["error"]
    assert out[2]["line"] == 3 and "id" in out[2]["error"]
    assert "exactly one of prompt, messages, token_ids" in out[3]["error"]
    assert "temperature must be a finite number >= 0" in out[4]["error"]
    assert "token id 49152 at index 1 is outside the vocabulary" in out[5]["error"]
    assert "unknown role 'wizard'" in out[6]["error"]
    assert "exceeds the context of 128 tokens" in out[7]["error"]
    assert "empty" in out[8]["error"]
    assert out[9] == {"line": 10, "error": "line of 5028 bytes exceeds --max-line-bytes=4096"}
    assert out[10]["line"] == 11 and "\"id\" has 300 characters; at most 256" in out[10]["error"]
    assert out[11]["id"] == "ok2" and len(out[11]["token_ids"]) == 2
    assert summary["errors"] == 10 and summary["requests"] == 12

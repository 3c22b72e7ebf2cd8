"""scripts/bench_serving.py on a real tiny-model server: fixed concurrency, Poisson arrivals, bad address."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import time

import numpy as np
import pytest

from .servers import ServerProcess, free_port

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_serving.py"
MAX_LEN, MAX_PROMPT = 96, 48  # 7 of the 8 chat prompts fit in 48 tokens


def _load():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load()


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = ServerProcess(tiny_ckpt, "--slots", "4", "--max-len", str(MAX_LEN), "--max-prompt-len", str(MAX_PROMPT))
    yield s
    assert s.stop() == 0


def _check_summary(s: dict, n: int) -> None:
    assert s["requests"] == s["completed"] == n and s["failed"] == 0 and s["errors"] == {}
    assert s["request_throughput"] > 0 and s["output_tokens_per_s"] > 0 and s["input_tokens_per_s"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        st = s[key]
        assert 0 < st["median"] <= st["p90"] <= st["p99"], (key, st)
    assert s["ttft_ms"]["count"] == s["e2e_ms"]["count"] == n
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]
    g = s["goodput"]
    assert 0 <= g["requests_per_s"] <= s["request_throughput"] and 0 <= g["fraction"] <= 1


def test_fixed_concurrency_exact_lengths_and_goodput(server, tmp_path, capsys):
    out = tmp_path / "c.json"
    rc = bench.main(["--address", server.address, "--num-requests", "6", "--concurrency", "3", "--prompt-len", "12",
                     "--prompt-dist", "uniform", "--output-len", "8", "--output-dist", "uniform", "--seed", "5",
                     "--slo-ttft-ms", "1e7", "--slo-tpot-ms", "1e7", "--json", str(out), "--per-request"])
    assert rc == 0
    data = json.loads(out.read_text())
    s, recs = data["summary"], data["requests"]
    _check_summary(s, 6)
    assert data["config"]["concurrency"] == 3 and data["config"]["seed"] == 5
    # ignore_eos: every request produced exactly the output length it asked for.
    assert all(r["output_tokens"] == r["max_tokens"] and r["finish_reason"] == "length" for r in recs)
    assert s["exact_output_len"] == 6 and s["output_tokens"] == sum(r["max_tokens"] for r in recs)
    assert all(4 <= r["max_tokens"] <= 12 and 6 <= r["prompt_tokens"] <= 18 for r in recs)  # uniform +-50%
    assert s["input_tokens"] == sum(r["prompt_tokens"] for r in recs)
    assert all(len(r["itl_ms"]) == r["output_tokens"] - 1 for r in recs)
    # Generous SLOs: everything is good, goodput equals throughput.
    assert s["goodput"]["fraction"] == 1.0
    assert s["goodput"]["requests_per_s"] == pytest.approx(s["request_throughput"])
    table = capsys.readouterr().out
    assert "| TTFT |" in table and "| ITL |" in table and "goodput" in table


def test_poisson_rate_chat_and_impossible_slo(server, tmp_path):
    out = tmp_path / "r.json"
    rc = bench.main(["--address", server.address, "--num-requests", "6", "--rate", "8", "--chat", "--output-len", "6",
                     "--output-dist", "exponential", "--slo-ttft-ms", "0.001", "--warmup", "0", "--json", str(out),
                     "--per-request"])
    assert rc == 0
    data = json.loads(out.read_text())
    s, recs = data["summary"], data["requests"]
    _check_summary(s, 6)
    assert all(r["output_tokens"] == r["max_tokens"] and r["prompt_tokens"] > 0 for r in recs)
    # Arrivals follow the seeded exponential gaps: sorted start times close to the planned schedule.
    gaps = np.random.default_rng(1).exponential(1 / 8, 6)
    planned = np.cumsum(gaps) - gaps[0]
    starts = [r["start_s"] for r in recs]
    assert starts == sorted(starts) and starts[0] < 0.5
    assert all(p - 0.01 <= t <= p + 1.0 for p, t in zip(planned, starts))
    assert s["goodput"]["good_requests"] == 0 and s["goodput"]["requests_per_s"] == 0


def test_lengths_are_seeded_and_bounded():
    a = bench.sample_lengths(np.random.default_rng(3), 20, "exponential", 0.5, 50, 40)
    b = bench.sample_lengths(np.random.default_rng(3), 20, "exponential", 0.5, 50, 40)
    assert a == b and all(1 <= x <= 40 for x in a)
    assert bench.sample_lengths(np.random.default_rng(0), 7, "fixed", 0.5, 3, 40) == [7, 7, 7]
    u = bench.sample_lengths(np.random.default_rng(0), 10, "uniform", 0.2, 100, 40)
    assert all(8 <= x <= 12 for x in u)


def test_unreachable_address_fails_fast_with_a_clear_error(tmp_path, capsys):
    t0 = time.monotonic()
    rc = bench.main(["--address", f"127.0.0.1:{free_port()}", "--num-requests", "2", "--connect-timeout", "3",
                     "--json", str(tmp_path / "x.json")])
    assert rc == 2 and time.monotonic() - t0 < 15
    assert "cannot reach a jserve server" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_failed_requests_are_counted_by_status_code_not_fatal(server, tmp_path, capsys):
    out = tmp_path / "f.json"
    rc = bench.main(["--address", server.address, "--num-requests", "3", "--concurrency", "3", "--output-len", "40",
                     "--timeout", "0.001", "--warmup", "0", "--json", str(out)])
    assert rc == 1
    s = json.loads(out.read_text())["summary"]
    assert s["failed"] == 3 and s["completed"] == 0 and s["errors"] == {"DEADLINE_EXCEEDED": 3}
    assert s["ttft_ms"] is None and s["request_throughput"] == 0
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err

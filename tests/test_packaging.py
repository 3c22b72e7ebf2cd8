"""The wheel ships what an installed jserve needs at run time: the CPU kernels' C++ sources
(``python -m jserve.cpu_kernels build`` compiles them where the package is installed) and the
gRPC stubs. The wheel is built by setuptools' own PEP 517 backend, as ``pip install .`` builds
it, from a copy of the package's sources (no network: grpcio-tools, which needs setuptools, is a
dependency already installed)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_kernels_sources_and_the_grpc_stubs(tmp_path):
    from jserve import cpu_kernels

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "protos", src / "protos")
    # what a clean clone has: no built library, no generated stubs, no caches
    shutil.copytree(ROOT / "jserve", src / "jserve", ignore=shutil.ignore_patterns("__pycache__", "_kernels", "v1"))
    build = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", build], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = src / "dist" / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"jserve/csrc/{p.name}" for p in (ROOT / "jserve" / "csrc").iterdir() if p.suffix in (".h", ".cc")}
    assert {f"jserve/csrc/{s}" for s in cpu_kernels._SOURCES} <= sources  # the build's inputs are in csrc/
    assert sources - names == set(), "C++ sources missing from the wheel"
    assert {"jserve/v1/jserve_pb2.py", "jserve/v1/jserve_pb2_grpc.py"} <= names
    assert not any("/_kernels/" in n for n in names)  # the library is built where it is installed

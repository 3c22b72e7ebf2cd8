"""Generates the gRPC stubs from protos/ whenever the package is built or installed."""

import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


def generate_stubs() -> list[str]:
    """Write the stubs into the source tree; returns their packages (``["jserve.v1"]``)."""
    from grpc_tools import protoc

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    for proto in protos:
        rel = proto.relative_to(ROOT / "protos")
        args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}", str(rel)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")
    # protos/jserve/v1/*.proto become the subpackage jserve.v1 of this package.
    dirs = sorted({p.relative_to(ROOT / "protos").parent for p in protos})
    for d in dirs:
        (ROOT / d / "__init__.py").touch()
    return [".".join(d.parts) for d in dirs]


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        # The packages were found before the stubs existed (a clean clone has no jserve/v1): add them,
        # or a wheel ships without the gRPC stubs.
        for package in generate_stubs():
            if package not in self.packages:
                self.packages.append(package)
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})

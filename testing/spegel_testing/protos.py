# -*- test-case-name: tests.unit.test_containerd_protos -*-
"""
Regenerate the checked-in gRPC/protobuf stubs in C{spegel/containerd/api/} from our .proto subset,
with their type stubs (C{.pyi}, by mypy-protobuf) for mypy.

Usage, from the checkout root::

    .venv/bin/python -m spegel_testing.protos

The .proto files live beside this module, under C{proto/spegel/containerd/api/}: they are inputs
of this tool, not of the node, so they ship with it in the testing distribution.  That directory
is the proto root joined with the Python package path, so protoc names every generated module and
every generated import C{spegel.containerd.api.<name>_pb2}: the stubs import correctly as they
come out of protoc, with no rewriting.  The output depends only on the .proto files and the
pinned grpcio-tools and mypy-protobuf versions, which is what lets
L{tests.unit.test_containerd_protos} detect drift, in the modules and in their type stubs alike.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from importlib import resources

from grpc_tools import protoc

from spegel.containerd import api

_HERE = os.path.dirname(os.path.abspath(__file__))

#: The proto root given to protoc (C{-I}).
PROTO_ROOT = os.path.join(_HERE, "proto")

#: Where the stubs are checked in: the Python package the generated imports name.
API_PACKAGE_DIR = os.path.dirname(os.path.abspath(api.__file__))

#: The package path below L{PROTO_ROOT} (and below any output root) holding protos and stubs.
_PACKAGE_PATH = os.path.join("spegel", "containerd", "api")

_GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")

#: mypy-protobuf's protoc plugins (message stubs, gRPC service stubs): console scripts installed
#: beside this interpreter, which is where pip put them with the pinned mypy-protobuf.
_STUB_PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


class RegenerationFailed(Exception):
    """
    protoc rejected the .proto files; its diagnostics went to stderr.
    """


def proto_files() -> list[str]:
    """
    Every .proto file of the subset, relative to L{PROTO_ROOT}, sorted.
    """
    directory = os.path.join(PROTO_ROOT, _PACKAGE_PATH)
    return sorted(
        os.path.join(_PACKAGE_PATH, name) for name in os.listdir(directory) if name.endswith(".proto")
    )


def is_generated(filename: str) -> bool:
    """
    Whether C{filename} (a base name) is a generated stub rather than hand-written.
    """
    return filename.endswith(_GENERATED_SUFFIXES)


def _plugin_path(name: str) -> str:
    """
    The path of mypy-protobuf's protoc plugin C{name}.

    @raise RegenerationFailed: if mypy-protobuf is not installed in this interpreter's environment.
    """
    path = os.path.join(sysconfig.get_path("scripts"), name)
    if not os.access(path, os.X_OK):
        raise RegenerationFailed(f"{path} not found: install spegel-testing's pinned mypy-protobuf")
    return path


def generate(output_root: str) -> dict[str, bytes]:
    """
    Run protoc over the subset, writing the stubs under C{output_root}/spegel/containerd/api/.

    @return: each generated file's base name mapped to its bytes.
    @raise RegenerationFailed: if protoc exits non-zero.
    """
    # The well-known types (any, empty, timestamp) ship inside grpc_tools; protoc needs them
    # on its include path, as `python -m grpc_tools.protoc` would add them.
    well_known = str(resources.files("grpc_tools") / "_proto")
    argv = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        *(f"--plugin={name}={_plugin_path(name)}" for name in _STUB_PLUGINS),
        f"--python_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"--mypy_out=quiet:{output_root}",
        f"--mypy_grpc_out=quiet:{output_root}",
        *proto_files(),
    ]
    # protoc resolves the relative .proto paths against the include path, not the cwd.
    status = protoc.main(argv)
    if status != 0:
        raise RegenerationFailed(f"protoc exited with status {status}")
    generated_dir = os.path.join(output_root, _PACKAGE_PATH)
    result = {}
    for name in sorted(os.listdir(generated_dir)):
        if is_generated(name):
            with open(os.path.join(generated_dir, name), "rb") as f:
                result[name] = f.read()
    return result


def checked_in() -> dict[str, bytes]:
    """
    The stubs currently in L{API_PACKAGE_DIR}, by base name.
    """
    result = {}
    for name in sorted(os.listdir(API_PACKAGE_DIR)):
        if is_generated(name):
            with open(os.path.join(API_PACKAGE_DIR, name), "rb") as f:
                result[name] = f.read()
    return result


def regenerate() -> list[str]:
    """
    Regenerate the stubs into L{API_PACKAGE_DIR}, removing stubs of protos that no longer exist.

    @return: the base names of the files written.
    """
    with tempfile.TemporaryDirectory(prefix="spegel-protoc-") as output_root:
        fresh = generate(output_root)
    for name in checked_in():
        if name not in fresh:
            os.unlink(os.path.join(API_PACKAGE_DIR, name))
    for name, data in fresh.items():
        # Write through a temporary file so an interrupted run never leaves a torn module.
        target = os.path.join(API_PACKAGE_DIR, name)
        with tempfile.NamedTemporaryFile("wb", dir=API_PACKAGE_DIR, delete=False) as f:
            f.write(data)
        shutil.move(f.name, target)
        os.chmod(target, 0o644)
    return sorted(fresh)


def main() -> int:
    for name in regenerate():
        print(os.path.join(API_PACKAGE_DIR, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())

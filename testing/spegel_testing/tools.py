# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
The Go-built tools the end-to-end tests and benchmarks run against: containerd 2.x (with its
C{ctr}) and C{crictl}, built from the Go module proxy at pinned versions and cached by version.

Debian ships containerd 1.6 only; clusters run 2.x.  So C{.ci/setup} runs
C{python -m spegel_testing.tools}, which builds every tool missing from the cache
(C{$SPEGEL_TOOLS_DIR}, by default L{DEFAULT_TOOLS_DIR}, outside the checkout so a fresh clone
in CI reuses it) and does nothing when all are there.  Each build goes into
C{<cache>/<name>-<version>/} and is renamed into place only when complete, so a killed build
is never taken for a finished one.

containerd's own C{go.mod} carries C{exclude} directives, which C{go install module@version}
refuses; so containerd is built from a throw-away module that requires it at the pinned version
(C{go mod tidy} then resolves its dependencies as a dependency's, as any importer's would).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from attrs import frozen

TOOLS_DIR_ENV = "SPEGEL_TOOLS_DIR"
DEFAULT_TOOLS_DIR = "/var/cache/spegel-ci/tools"

CONTAINERD_MODULE = "github.com/containerd/containerd/v2"
CRI_TOOLS_MODULE = "sigs.k8s.io/cri-tools"


@frozen
class GoTool:
    """
    One tool built from the Go module proxy.

    @ivar name: the cache directory's prefix (C{containerd}, C{crictl}).
    @ivar module: the Go module that provides the commands.
    @ivar version: the pinned version, without the C{v}.
    @ivar commands: the packages to build, relative to C{module}; each gives one binary.
    @ivar link_variables: package variables set at link time, as C{(variable, value)} with
        C{{version}} in the value replaced, so the binary reports a clean version (a build from
        the module cache otherwise says C{+unknown}, or nothing).
    """

    name: str
    module: str
    version: str
    commands: tuple[str, ...]
    link_variables: tuple[tuple[str, str], ...] = ()

    @property
    def directory_name(self) -> str:
        return f"{self.name}-{self.version}"

    def path(self, tools_dir: str | None = None) -> str:
        """
        The directory holding this tool's binaries.
        """
        return os.path.join(tools_dir or tools_directory(), self.directory_name)

    def binary(self, command: str, tools_dir: str | None = None) -> str:
        return os.path.join(self.path(tools_dir), command)

    def built(self, tools_dir: str | None = None) -> bool:
        return all(
            os.access(self.binary(os.path.basename(c), tools_dir), os.X_OK) for c in self.commands
        )


def _containerd(version: str) -> GoTool:
    return GoTool(
        name="containerd",
        module=CONTAINERD_MODULE,
        version=version,
        # The shim runs containers (ctr run, CRI pods); containerd finds it on PATH.
        commands=("cmd/containerd", "cmd/ctr", "cmd/containerd-shim-runc-v2"),
        link_variables=((f"{CONTAINERD_MODULE}/version.Version", "{version}"),),
    )


#: containerd 2.x releases every end-to-end test also runs against (beside Debian's 1.6): the
#: first with the transfer service as the CRI's pull path and C{/content/create} events (2.1),
#: and the newest.
CONTAINERD_2 = (_containerd("2.1.9"), _containerd("2.4.2"))

CRICTL = GoTool(name="crictl", module=CRI_TOOLS_MODULE, version="1.37.0", commands=("cmd/crictl",))

#: Renders and lints the chart (charts/spegel) in the tests.
HELM = GoTool(
    name="helm",
    module="helm.sh/helm/v3",
    version="3.22.0",
    commands=("cmd/helm",),
    link_variables=(
        ("helm.sh/helm/v3/internal/version.version", "v{version}"),
        ("helm.sh/helm/v3/internal/version.gitTreeState", "clean"),
    ),
)

TOOLS = (*CONTAINERD_2, CRICTL, HELM)


def tools_directory() -> str:
    return os.environ.get(TOOLS_DIR_ENV) or DEFAULT_TOOLS_DIR


class BuildFailed(Exception):
    """
    A tool could not be built; the message has the Go command's output.
    """


def build(tool: GoTool, tools_dir: str | None = None, *, go: str = "go") -> str:
    """
    Build C{tool} into its cache directory, unless it is there already.

    @return: the tool's directory.
    @raise BuildFailed: naming the tool, with the tail of Go's output.
    """
    destination = tool.path(tools_dir)
    if tool.built(tools_dir):
        return destination
    go_path = shutil.which(go)
    if go_path is None:
        raise BuildFailed(f"cannot build {tool.directory_name}: no Go toolchain ('{go}') on PATH")
    # Absolute: the commands run in the scratch module's folder.
    go = os.path.abspath(go_path)
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{tool.directory_name}.", dir=parent) as work:
        module_dir = os.path.join(work, "module")
        out_dir = os.path.join(work, "bin")
        os.makedirs(module_dir)
        os.makedirs(out_dir)
        with open(os.path.join(module_dir, "go.mod"), "w") as f:
            f.write(f"module spegel.test/tools\n\ngo 1.24\n\nrequire {tool.module} v{tool.version}\n")
        imports = "\n".join(f'\t_ "{tool.module}/{c}"' for c in tool.commands)
        with open(os.path.join(module_dir, "tools.go"), "w") as f:
            f.write(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")
        ldflags = "-s -w" + "".join(
            f" -X {variable}={value.format(version=tool.version)}" for variable, value in tool.link_variables
        )
        environment = {**os.environ, "CGO_ENABLED": os.environ.get("CGO_ENABLED", "1")}
        for args in (
            [go, "mod", "tidy"],
            [go, "build", "-trimpath", "-ldflags", ldflags, "-o", out_dir + "/"]
            + [f"{tool.module}/{c}" for c in tool.commands],
        ):
            result = subprocess.run(
                args, cwd=module_dir, env=environment, capture_output=True, text=True
            )
            if result.returncode != 0:
                output = (result.stdout + result.stderr).strip().splitlines()[-15:]
                raise BuildFailed(
                    f"building {tool.directory_name} failed at 'go {args[1]}':\n"
                    + "\n".join(output)
                )
        if os.path.lexists(destination):
            # An older build of this version lacking a command added since: replaced whole.
            os.rename(destination, os.path.join(work, "replaced"))
        os.rename(out_dir, destination)
    return destination


def main(argv: list[str] | None = None) -> int:
    """
    Build every tool missing from the cache; one line per tool.
    """
    tools_dir = tools_directory()
    status = 0
    for tool in TOOLS:
        if tool.built(tools_dir):
            print(f"{tool.directory_name}: cached in {tool.path(tools_dir)}")
            continue
        started = time.monotonic()
        print(f"{tool.directory_name}: building from the Go module proxy...", flush=True)
        try:
            build(tool, tools_dir)
        except (BuildFailed, OSError) as e:
            print(f"{tool.directory_name}: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{tool.directory_name}: built in {time.monotonic() - started:.0f}s")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

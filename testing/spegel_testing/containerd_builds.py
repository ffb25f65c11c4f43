# -*- test-case-name: tests.unit.test_tools, tests.e2e.test_rig_real -*-
"""
Which containerd builds the tests run against: Debian's 1.6 on C{PATH} and the 2.x releases
C{.ci/setup} builds (L{spegel_testing.tools}), each a L{ContainerdBuild} saying its version and
what that version does differently; L{per_containerd} makes one test case class per build.
The daemon that runs a build is L{spegel_testing.containerd.ContainerdDaemon}.
"""

from __future__ import annotations

import functools
import re
import subprocess
from typing import TypeVar, cast

from attrs import frozen

from spegel_testing import tools
from spegel_testing.process import ProcessFailed

CONTAINERD = "containerd"
CTR = "ctr"

_VERSION = re.compile(r"\b(\d+)\.(\d+)\.(\d+)")


@frozen
class ContainerdBuild:
    """
    One containerd to test against: its binaries and the version they are.

    @ivar version: C{major.minor.patch}.
    @ivar containerd: the daemon's path (or name on C{PATH}).
    @ivar ctr: its client's.
    @ivar missing: why the binaries are not there (not built yet), or L{None}.
    """

    version: str
    containerd: str = CONTAINERD
    ctr: str = CTR
    missing: str | None = None

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor, _ = self.version.split(".", 2)
        return int(major), int(minor)

    @property
    def label(self) -> str:
        """
        What test names carry: C{containerd_2_4}.
        """
        major, minor = self.major_minor
        return f"containerd_{major}_{minor}"

    @property
    def config_version(self) -> int:
        """
        The configuration format this containerd reads natively.
        """
        return 3 if self.major_minor >= (2, 0) else 2

    @property
    def publishes_content_create(self) -> bool:
        """
        containerd 2.1 added C{/content/create} events, sent as each blob is committed.
        """
        return self.major_minor >= (2, 1)

    def check(self) -> None:
        """
        @raise ProcessFailed: when the binaries are not there, saying how to build them.
        """
        if self.missing is not None:
            raise ProcessFailed(self.missing)

    def __str__(self) -> str:
        return f"containerd {self.version}"


@functools.lru_cache(maxsize=None)
def system_containerd() -> ContainerdBuild:
    """
    The containerd on C{PATH} (Debian's 1.6), asking it for its version.
    """
    try:
        output = subprocess.run(
            [CONTAINERD, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except OSError as e:
        return ContainerdBuild("0.0.0", missing=f"no containerd on PATH ({e}): run bash .ci/setup")
    match = _VERSION.search(output)
    if match is None:
        return ContainerdBuild("0.0.0", missing=f"cannot tell the version of containerd: {output!r}")
    return ContainerdBuild(".".join(match.groups()))


def built_containerd(tool: tools.GoTool) -> ContainerdBuild:
    """
    A containerd 2.x from the tools cache, or one that says it is missing.
    """
    build = ContainerdBuild(
        tool.version, containerd=tool.binary("containerd"), ctr=tool.binary("ctr")
    )
    if not tool.built():
        return ContainerdBuild(
            tool.version,
            containerd=build.containerd,
            ctr=build.ctr,
            missing=f"containerd {tool.version} is not built in {tool.path()}: run bash .ci/setup",
        )
    return build


def containerd_builds() -> tuple[ContainerdBuild, ...]:
    """
    Every containerd the end-to-end tests run against: Debian's, then the 2.x builds.
    """
    return (system_containerd(), *(built_containerd(t) for t in tools.CONTAINERD_2))


def newest_containerd() -> ContainerdBuild:
    """
    The newest containerd that is built, for a demo or a benchmark that runs one.
    """
    ready = [b for b in containerd_builds() if b.missing is None]
    if not ready:
        return system_containerd()
    return max(ready, key=lambda b: b.major_minor)


_T = TypeVar("_T", bound=type)


def per_containerd(template: _T) -> dict[str, _T]:
    """
    One subclass of the test case C{template} per containerd (L{containerd_builds}), named
    C{<template>_containerd_<major>_<minor>} and with C{containerd_build} set, so a test's name
    says which containerd ran it.  Put them in the module and remove the template, so trial
    collects each once::

        globals().update(per_containerd(PullTests))
        del PullTests

    A build that is missing makes its tests fail (L{ContainerdBuild.check}), never skip.
    """
    classes: dict[str, _T] = {}
    for build in containerd_builds():
        name = f"{template.__name__}_{build.label}"
        # A subclass of the template: a _T, which type() cannot say.
        classes[name] = cast(_T, type(
            name,
            (template,),
            {"containerd_build": build, "__module__": template.__module__, "__qualname__": name},
        ))
    return classes


def crictl() -> str:
    """
    The path of crictl, built by C{.ci/setup}.

    @raise ProcessFailed: when it is not built.
    """
    if not tools.CRICTL.built():
        raise ProcessFailed(f"crictl is not built in {tools.CRICTL.path()}: run bash .ci/setup")
    return tools.CRICTL.binary("crictl")


# -*- test-case-name: tests.unit.test_preflight, tests.e2e.test_preflight_real -*-
"""
Can this node's containerd work with spegel?  A preflight that says what is wrong, one line
each, with the fix.

A node is only useful to spegel when its containerd reads the mirror configuration spegel
writes, keeps the layers it pulls, and actually pulls through the mirror.  Each of those can be
switched off in containerd's configuration, silently:

- C{config_path} unset, or naming another folder than the one spegel writes: containerd never
  reads spegel's C{hosts.toml}, so nothing goes through spegel (fatal).
- C{discard_unpacked_layers = true}: layers are deleted once unpacked, so the node has nothing
  to share (a warning: the node still pulls through its peers).
- containerd 2.1+ with a C{:}-separated C{config_path} list: the CRI plugin pulls through the
  transfer service, which takes C{config_path} as one folder, so the mirrors are silently
  ignored, unless C{use_local_image_pull = true} or another setting the transfer service lacks
  sends the CRI back to its local pull path (fatal).
- the namespace spegel serves holds no images: a wrong C{--containerd-namespace}, or a new node
  (a warning).

containerd's configuration file and containerd itself (over its socket) are read by
L{spegel.containerd.settings}, whose names are importable from here too.  What containerd runs
with wins over the file (a file changed without a restart is reported as such); the file alone
tells C{use_local_image_pull}.  What it cannot read it says it could not check, rather than
guess.

The checks (L{check_configuration}, L{check_containerd}, L{check_applied}) are pure;
L{run_preflight} and the node's L{PreflightService} read and check (blocking: the C{spegel
configuration} command calls it directly, the node from a thread).
"""

from __future__ import annotations

import os
from typing import Any

from attrs import evolve, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from spegel.containerd.settings import (
    DEFAULT_CONTAINERD_CONFIG,
    ContainerdFacts,
    ImagePullSettings,
    PreflightError,
    image_pull_settings,
    parse_version,
    probe_containerd,
    read_containerd_config,
    running_settings_from_cri_status,
    running_settings_from_exports,
)

# The command, the node and the tests import the readers' names from here too.
__all__ = [
    "CHECKS", "DEFAULT_CONTAINERD_CONFIG", "ContainerdFacts", "ImagePullSettings", "PreflightError",
    "PreflightService", "Problem", "check_applied", "check_configuration", "check_containerd",
    "image_pull_settings", "parse_version", "probe_containerd",
    "read_containerd_config", "run_preflight", "running_settings_from_cri_status",
    "running_settings_from_exports", "unreachable", "unreadable",
]

_log = Logger()

#: Every check's name, as the C{check} label of C{spegel_preflight_problems}.
CHECKS = (
    "config_unreadable",
    "config_path_unset",
    "config_path_elsewhere",
    "config_path_list_ignored",
    "discard_unpacked_layers",
    "config_not_applied",
    "containerd_unreachable",
    "containerd_version_unknown",
    "no_images",
)


@frozen
class Problem:
    """
    One thing wrong, as one line with the fix.

    @ivar check: which check (one of L{CHECKS}).
    @ivar fatal: spegel cannot work on this node until it is fixed.
    """

    check: str
    fatal: bool
    message: str

    def __str__(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: {self.message}"


def _same_folder(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def check_configuration(
    settings: ImagePullSettings, certs_dir: str, version: tuple[int, int] | None
) -> list[Problem]:
    """
    What is wrong with containerd's CRI image settings for a spegel writing C{certs_dir}.

    @param version: containerd's C{(major, minor)}, or L{None} when unknown (the checks that
        depend on it then assume the stricter 2.1+).
    """
    problems = []
    config_path = settings.config_path
    if config_path is None:
        problems.append(
            Problem(
                "config_path_unset",
                True,
                f"containerd's registry config_path is not set in {settings.source}, so it never "
                f"reads the hosts.toml spegel writes: set config_path = '{certs_dir}' under "
                f"{_registry_section(version)} and restart containerd",
            )
        )
    else:
        folders = config_path.split(":")
        if not any(_same_folder(folder, certs_dir) for folder in folders):
            problems.append(
                Problem(
                    "config_path_elsewhere",
                    True,
                    f"containerd reads registry configuration from {config_path!r} "
                    f"({settings.source}), not from {certs_dir!r} where spegel writes: point "
                    "--containerd-registry-config-path at the former, or config_path at the latter",
                )
            )
        elif len(folders) > 1 and (version is None or version >= (2, 1)) and settings.local_pull_forced_by is None:
            known = settings.local_pull_known
            problems.append(
                Problem(
                    "config_path_list_ignored",
                    known,
                    f"config_path {config_path!r} is a list; containerd 2.1+ pulls through its "
                    "transfer service, which takes one folder only, so the mirrors are ignored"
                    + ("" if known else " (unless use_local_image_pull is set: the configuration file was not readable)")
                    + f": set config_path = '{certs_dir}', or use_local_image_pull = true under "
                    "[plugins.'io.containerd.cri.v1.images']",
                )
            )
    if settings.discard_unpacked_layers:
        problems.append(
            Problem(
                "discard_unpacked_layers",
                False,
                f"discard_unpacked_layers = true ({settings.source}): containerd deletes layers "
                "once unpacked, so this node has nothing to share with its peers: set it to "
                f"false under {_discard_section(version)}",
            )
        )
    return problems


def _registry_section(version: tuple[int, int] | None) -> str:
    if version is not None and version < (2, 0):
        return "[plugins.\"io.containerd.grpc.v1.cri\".registry]"
    return "[plugins.'io.containerd.cri.v1.images'.registry]"


def _discard_section(version: tuple[int, int] | None) -> str:
    if version is not None and version < (2, 0):
        return "[plugins.\"io.containerd.grpc.v1.cri\".containerd]"
    return "[plugins.'io.containerd.cri.v1.images']"


def check_containerd(facts: ContainerdFacts, namespace: str) -> list[Problem]:
    """
    What is doubtful in what containerd said.
    """
    problems = []
    if parse_version(facts.version) is None:
        problems.append(
            Problem(
                "containerd_version_unknown",
                False,
                f"cannot tell containerd's version from {facts.version!r}: checking as for 2.1+",
            )
        )
    if facts.images == 0:
        problems.append(
            Problem(
                "no_images",
                False,
                f"containerd's namespace {namespace!r} holds no images: on a node that has run "
                "pods, --containerd-namespace is wrong (the kubelet's is k8s.io)",
            )
        )
    return problems


def check_applied(running: ImagePullSettings, configured: ImagePullSettings) -> list[Problem]:
    """
    Whether containerd runs with what its configuration file says (it reads it only at start).
    """
    differences = []
    if (running.config_path or None) != (configured.config_path or None):
        differences.append(f"config_path {running.config_path!r}, the file {configured.config_path!r}")
    if running.discard_unpacked_layers != configured.discard_unpacked_layers:
        differences.append(
            f"discard_unpacked_layers = {str(running.discard_unpacked_layers).lower()}, "
            f"the file {str(configured.discard_unpacked_layers).lower()}"
        )
    if not differences:
        return []
    return [
        Problem(
            "config_not_applied",
            False,
            f"containerd runs with {'; '.join(differences)} ({configured.source}): restart "
            "containerd to apply its configuration",
        )
    ]


def unreachable(socket_path: str, why: str) -> Problem:
    return Problem(
        "containerd_unreachable",
        False,
        f"cannot ask containerd at {socket_path}: {why}; is --containerd-sock containerd's socket?",
    )


def unreadable(error: PreflightError) -> Problem:
    return Problem("config_unreadable", False, f"{error}; its settings were not checked")


def run_preflight(
    *,
    config_file: str | None,
    certs_dir: str,
    socket_path: str | None,
    namespace: str,
) -> list[Problem]:
    """
    Every check that can be made with what is at hand: the configuration file when it exists
    (a missing file is skipped: it may not be mounted), containerd when its socket is given.
    Blocking.
    """
    problems: list[Problem] = []
    facts = None
    if socket_path:
        try:
            facts = probe_containerd(socket_path, namespace)
        except PreflightError as e:
            problems.append(unreachable(socket_path, str(e)))
    version = parse_version(facts.version) if facts is not None else None
    configured = None
    if config_file and os.path.exists(config_file):
        try:
            configured = image_pull_settings(read_containerd_config(config_file), config_file)
        except PreflightError as e:
            problems.append(unreadable(e))
    running = facts.running if facts is not None else None
    if running is not None:
        if configured is not None:
            problems.extend(check_applied(running, configured))
            running = evolve(running, local_pull_forced_by=configured.local_pull_forced_by, local_pull_known=True)
        problems.extend(check_configuration(running, certs_dir, version))
    elif configured is not None:
        problems.extend(check_configuration(configured, certs_dir, version))
    if facts is not None:
        problems.extend(check_containerd(facts, namespace))
    return problems


class PreflightService(Service):
    """
    The node's preflight: run once at start, off the reactor thread (it reads files and asks
    containerd over a socket of its own), each problem logged as one line and exported as
    C{spegel_preflight_problems{check=...}} (1 when found, 0 when checked and fine), so an
    operator sees on a dashboard which nodes cannot work with spegel and why.

    @param gauge: where they are exported: the node's L{Metrics.preflight_problems
        <spegel.metrics.Metrics.preflight_problems>}.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        config_file: str | None,
        certs_dir: str,
        socket_path: str,
        namespace: str,
        gauge: Any,
    ) -> None:
        self._reactor = reactor
        self._arguments = dict(
            config_file=config_file, certs_dir=certs_dir, socket_path=socket_path, namespace=namespace
        )
        self._gauge = gauge
        self.done: Deferred[list[Problem]] | None = None

    def startService(self) -> None:
        super().startService()
        self.done = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), lambda: run_preflight(**self._arguments)  # type: ignore[arg-type]
        )
        self.done.addCallback(self._report)
        self.done.addErrback(lambda f: _log.failure("The preflight failed", f))

    def _report(self, problems: list[Problem]) -> list[Problem]:
        found = {p.check for p in problems}
        for check in CHECKS:
            self._gauge.labels(check).set(1 if check in found else 0)
        for problem in problems:
            if problem.fatal:
                _log.error("Preflight: {problem}", problem=problem.message)
            else:
                _log.warn("Preflight: {problem}", problem=problem.message)
        if not problems:
            _log.info("Preflight: containerd's configuration and state look right for spegel")
        return problems

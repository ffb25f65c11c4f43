# -*- test-case-name: tests.unit.test_cli -*-
"""
The ``spegel`` console script: one-shot commands run next to the long-running node (which is
``twistd spegel``, see spegel.tap).

    spegel configuration --containerd-registry-config-path /etc/containerd/certs.d \\
        --mirrored-registries https://docker.io,https://ghcr.io \\
        --mirror-targets http://10.0.0.5:30020 [--resolve-tags=false] [--prepend-existing] \\
        [--containerd-config-file /etc/containerd/config.toml] \\
        [--containerd-sock /run/containerd/containerd.sock] [--preflight strict|warn|off]
    spegel cleanup --containerd-registry-config-path /etc/containerd/certs.d \\
        [--serve-addr :8080]
    spegel cleanup-wait --probe-endpoints spegel-cleanup.spegel.svc.cluster.local:8080 \\
        [--timeout 10m] [--interval 2s]
    spegel version

Flag names are the reference's, so existing manifests keep working. The options are
C{usage.Options} subcommands on L{spegel.flags.CommandOptions}, with the converters the node's
flags use too: lists are comma-separated and may also be given as several words or by repeating
the flag, boolean flags take C{=true}/C{=false}. Exit status: 0 done, 1 the
configuration directory could not be read or written, or the preflight (spegel.preflight) found
that containerd would not use it, 2 bad command line; errors are one line each on stderr,
``spegel: error: ...`` (and ``spegel: warning: ...`` for what is doubtful but not fatal).

``cleanup --serve-addr`` and ``cleanup-wait`` are the two halves of the chart's post-delete
hook (spegel.cleanuphook): the first serves ``/healthz`` once its node is clean, until SIGTERM
(then 0; 1 if it cannot listen); the second exits 0 once every node answers, 1 on timeout.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence, TextIO

from twisted.python import usage

import spegel
from spegel import cleanuphook, flags, preflight
from spegel.addresses import parse_host_port
from spegel.flags import ShowText, parameter
from spegel.hostsconfig import (
    DEFAULT_CONFIG_PATH,
    HostsConfigError,
    InvalidMirrorConfiguration,
    InvalidRegistryURL,
    MirrorConfiguration,
    parse_registry_url,
)
from spegel.hostsfiles import cleanup, configure

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

COMMANDS = ("configuration", "cleanup", "cleanup-wait", "version")

UsageError = usage.UsageError
"""The command line is wrong; the message says how."""


def _config_path(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text.rstrip("/") or "/"


_CONFIG_PATH = parameter(
    "containerd-registry-config-path",
    DEFAULT_CONFIG_PATH,
    "containerd's registry config_path",
    _config_path,
)


def _registry_urls(role: str) -> Any:
    # Kept as written: MirrorConfiguration.from_strings names duplicates as the operator wrote them.
    def check(text: str) -> tuple[str, ...]:
        items = tuple(flags.parse_list(text))
        for item in items:
            parse_registry_url(item, role=role)
        return items

    return check


class ConfigurationOptions(flags.CommandOptions):
    synopsis = "[options]"
    longdesc = (
        "Write <config path>/<registry>/hosts.toml for every mirrored registry, moving what was "
        "there to <config path>/_backup (once). Nothing else under the config path is touched."
    )
    optParameters = [
        _CONFIG_PATH,
        parameter(
            "mirrored-registries",
            "",
            "registries to mirror, e.g. https://docker.io,https://ghcr.io; none means every "
            "registry (_default)",
            _registry_urls("mirrored registry"),
        ),
        parameter(
            "mirror-targets",
            None,
            "spegel endpoints containerd tries first, in order, e.g. http://10.0.0.5:30020",
            _registry_urls("mirror target"),
        ),
        parameter(
            "resolve-tags", "true", "let spegel resolve tags to digests", flags.parse_bool
        ),
        parameter(
            "prepend-existing",
            "false",
            "keep the [host] entries of existing hosts.toml files after ours",
            flags.parse_bool,
        ),
        parameter(
            "containerd-config-file",
            preflight.DEFAULT_CONTAINERD_CONFIG,
            "containerd's configuration, read (when it exists) to check that containerd will use "
            "what spegel writes",
        ),
        parameter(
            "containerd-sock",
            "",
            "containerd's socket, to check its version and images (empty: not asked)",
        ),
        parameter(
            "containerd-namespace", "k8s.io", "the namespace the node serves"
        ),
        parameter(
            "preflight",
            "strict",
            "strict: a misconfiguration that keeps spegel from working stops the command (exit 1) "
            "before anything is written; warn: report it and go on; off: do not check",
            flags.choice("strict", "warn", "off"),
        ),
    ]
    booleans = frozenset({"resolve-tags", "prepend-existing"})
    lists = frozenset({"mirrored-registries", "mirror-targets"})

    def postOptions(self) -> None:
        if self["mirror-targets"] is None:
            raise UsageError("the following arguments are required: --mirror-targets")
        # The whole configuration is validated before the directory is touched.
        self.configuration = MirrorConfiguration.from_strings(
            self["mirrored-registries"],
            self["mirror-targets"],
            resolve_tags=self["resolve-tags"],
            prepend_existing=self["prepend-existing"],
        )


class CleanupOptions(flags.CommandOptions):
    synopsis = "[options]"
    longdesc = (
        "Remove what 'configuration' wrote and move the originals in <config path>/_backup back."
    )
    optParameters = [
        _CONFIG_PATH,
        parameter(
            "serve-addr",
            None,
            "once clean, answer GET /healthz with 200 on this address until SIGTERM (the "
            "chart's post-delete hook waits for that on every node); default: exit at once",
            flags.parse_listen_address,
        ),
    ]


def _probe_endpoints(text: str) -> tuple[tuple[str, int], ...]:
    endpoints = tuple(parse_host_port(item) for item in flags.parse_list(text))
    if not endpoints:
        raise ValueError("at least one NAME:PORT is needed")
    return endpoints


def _interval(text: str) -> float:
    seconds = flags.parse_duration(text)
    if seconds <= 0:
        raise ValueError("must be more than 0s")
    return seconds


class CleanupWaitOptions(flags.CommandOptions):
    synopsis = "[options]"
    longdesc = (
        "Resolve every NAME (all its A/AAAA addresses) each round and ask each address for "
        "GET /healthz; exit 0 once every address answered 200 in two rounds in a row, 1 on "
        "timeout."
    )
    optParameters = [
        parameter(
            "probe-endpoints",
            None,
            "names (or IP addresses) and ports to probe, e.g. "
            "spegel-cleanup.spegel.svc.cluster.local:8080",
            _probe_endpoints,
        ),
        parameter(
            "timeout", "10m", "give up (exit 1) after this long", flags.parse_duration
        ),
        parameter("interval", "2s", "time between rounds", _interval),
    ]
    lists = frozenset({"probe-endpoints"})

    def postOptions(self) -> None:
        if self["probe-endpoints"] is None:
            raise UsageError("the following arguments are required: --probe-endpoints")


class VersionOptions(flags.CommandOptions):
    synopsis = ""
    longdesc = "Print the version."


class CommandLine(flags.CommandOptions):
    """
    The whole command line; tests use it to check the flags the manifests pass.
    """

    synopsis = "Usage: spegel"
    longdesc = "One-shot spegel commands: spegel COMMAND [options]; spegel COMMAND --help."
    subCommands = [
        ["configuration", None, ConfigurationOptions, "point containerd at spegel for the mirrored registries"],
        ["cleanup", None, CleanupOptions, "remove spegel's configuration and restore the original"],
        ["cleanup-wait", None, CleanupWaitOptions, "wait until every node's 'cleanup --serve-addr' says it is clean"],
        ["version", None, VersionOptions, "print the version"],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        argv = sys.argv[1:] if options is None else list(options)
        words = [arg for arg in argv if not arg.startswith("-")]
        if words and words[0] not in COMMANDS:
            raise UsageError(f"invalid choice: {words[0]!r} (choose from {', '.join(COMMANDS)})")
        super().parseOptions(argv)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise UsageError(
                "the following arguments are required: {" + ",".join(COMMANDS) + "}"
            )


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """
    The parsed command line; the command is C{.subCommand}, its options C{.subOptions}.

    @raise UsageError: the command line is wrong.
    @raise ShowText: C{--help} or C{--version} asked for a text instead.
    """
    command = CommandLine()
    command.parseOptions(list(argv))
    return command


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    *,
    reactor: Any = None,
    environment: cleanuphook.Environment | None = None,
) -> int:
    """
    Run one command.

    @param argv: the arguments after the program name; C{sys.argv[1:]} by default.
    @param reactor: what C{cleanup --serve-addr} serves with; the global reactor by default.
    @param environment: clock, sleep, resolver and probe of C{cleanup-wait}; the real ones by
        default.
    @return: the exit status.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        command = parse_command_line(sys.argv[1:] if argv is None else argv)
        options = command.subOptions
        if command.subCommand == "version":
            print(spegel.__version__, file=out)
            return EXIT_OK
        if command.subCommand == "cleanup-wait":
            return _cleanup_wait(options, out, err, environment or cleanuphook.Environment())
        if command.subCommand == "configuration":
            return _configuration(options, out, err)
        return _cleanup(options, out, err, reactor)
    except ShowText as shown:
        print(shown.text, file=out)
        return EXIT_OK
    except (UsageError, InvalidRegistryURL, InvalidMirrorConfiguration) as e:
        print(f"spegel: error: {e}", file=err)
        return EXIT_USAGE
    except (HostsConfigError, OSError) as e:
        print(f"spegel: error: {e}", file=err)
        return EXIT_FAILED


def _configuration(options: ConfigurationOptions, out: TextIO, err: TextIO) -> int:
    wanted = options.configuration
    root = options["containerd-registry-config-path"]
    if options["preflight"] != "off":
        problems = preflight.run_preflight(
            config_file=options["containerd-config-file"],
            certs_dir=root,
            socket_path=options["containerd-sock"] or None,
            namespace=options["containerd-namespace"],
        )
        for problem in problems:
            print(f"spegel: {problem}", file=err)
        if options["preflight"] == "strict" and any(p.fatal for p in problems):
            print(
                "spegel: nothing written: fix containerd's configuration, or pass --preflight=warn",
                file=err,
            )
            return EXIT_FAILED
    result = configure(root, wanted)
    for name in result.backed_up:
        print(f"backed up {root}/{name} to {root}/_backup/{name}", file=out)
    for path in result.removed:
        print(f"removed {root}/{path}", file=out)
    for name in result.restored:
        print(f"restored {root}/{name}", file=out)
    for path in result.written:
        print(f"wrote {root}/{path}", file=out)
    if not wanted.mirrored_registries:
        # containerd prefers a registry's own directory to _default: say which pulls bypass us.
        for name in result.untouched:
            if os.path.isdir(os.path.join(root, name)) and not name.startswith("_"):
                print(
                    f"note: {root}/{name} has its own configuration, which containerd reads "
                    f"instead of _default: pulls from {name} do not go through spegel",
                    file=out,
                )
    return EXIT_OK


def _cleanup(options: CleanupOptions, out: TextIO, err: TextIO, reactor: Any) -> int:
    root = options["containerd-registry-config-path"]
    result = cleanup(root)
    if not result.removed and not result.restored:
        print(f"nothing to clean up in {root}", file=out)
    for path in result.removed:
        print(f"removed {root}/{path}", file=out)
    for name in result.restored:
        print(f"restored {root}/{name}", file=out)
    if options["serve-addr"] is None:
        return EXIT_OK
    if reactor is None:
        from twisted.internet import reactor
    resource = cleanuphook.healthz_resource(root)
    return cleanuphook.serve_until_stopped(reactor, options["serve-addr"], resource, out, err)


def _cleanup_wait(
    options: CleanupWaitOptions, out: TextIO, err: TextIO, environment: cleanuphook.Environment
) -> int:
    def report(line: str) -> None:
        print(line, file=out, flush=True)

    try:
        clean = cleanuphook.wait_until_clean(
            options["probe-endpoints"],
            timeout=options["timeout"],
            interval=options["interval"],
            environment=environment,
            report=report,
        )
    except cleanuphook.NotClean as e:
        print(f"spegel: error: {e}", file=err)
        return EXIT_FAILED
    print(
        f"every node is clean: {cleanuphook.count(len(clean))} answered /healthz "
        f"in {cleanuphook.CLEAN_ROUNDS} rounds in a row",
        file=out,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

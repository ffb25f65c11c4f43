# -*- test-case-name: tests.test_cli -*-
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

Flag names are the reference's, so existing manifests keep working. Lists are comma-separated
and may also be given as several words or by repeating the flag. Exit status: 0 done, 1 the
configuration directory could not be read or written, or the preflight (spegel.preflight) found
that containerd would not use it, 2 bad command line; errors are one line each on stderr,
``spegel: error: ...`` (and ``spegel: warning: ...`` for what is doubtful but not fatal).

``cleanup --serve-addr`` and ``cleanup-wait`` are the two halves of the chart's post-delete
hook (spegel.cleanuphook): the first serves ``/healthz`` once its node is clean, until SIGTERM
(then 0; 1 if it cannot listen); the second exits 0 once every node answers, 1 on timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Any, Callable, NoReturn, Sequence, TextIO

import spegel
from spegel import cleanuphook, flags, preflight
from spegel.dht.bootstrap import parse_host_port
from spegel.hostsconfig import (
    DEFAULT_CONFIG_PATH,
    HostsConfigError,
    InvalidMirrorConfiguration,
    InvalidRegistryURL,
    MirrorConfiguration,
    cleanup,
    configure,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2



class UsageError(Exception):
    """
    The command line is wrong; the message says how.
    """


class _Exit(Exception):
    """
    argparse finished on its own (``--help``): leave main with this status.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """
    An ArgumentParser that raises instead of printing usage and calling sys.exit, so main
    decides what the operator sees (one line) and returns a status instead of exiting, and
    that prints help to the streams main was given.
    """

    def __init__(
        self, *args: Any, out: TextIO | None = None, err: TextIO | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._out = out
        self._err = err

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            stream = (self._err or sys.stderr) if file is sys.stderr else (self._out or sys.stdout)
            stream.write(message)


def parse_bool(text: str) -> bool:
    """
    ``true``/``false`` and the usual spellings of them, as the reference's flags accept.
    """
    try:
        return flags.parse_bool(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}") from None


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    C{parse} (one of spegel.flags' parsers) as an argparse type: its message, as a usage error.
    """

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


class _CommaSeparated(argparse.Action):
    """
    Collect ``--flag a,b --flag c d`` into ``[a, b, c, d]``; ``--flag=`` alone means empty.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        collected = list(getattr(namespace, self.dest) or [])
        for value in values:
            collected.extend(item.strip() for item in value.split(",") if item.strip())
        setattr(namespace, self.dest, collected)


def _add_config_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--containerd-registry-config-path",
        metavar="DIR",
        default=DEFAULT_CONFIG_PATH,
        help="containerd's registry config_path (default: %(default)s)",
    )


def build_parser(
    stdout: TextIO | None = None, stderr: TextIO | None = None
) -> argparse.ArgumentParser:
    """
    The whole command line; tests use it to check the flags the manifests pass.
    """
    parser = _Parser(prog="spegel", description="One-shot spegel commands.", out=stdout, err=stderr)
    parser.add_argument("--version", action="version", version=spegel.__version__)
    commands = parser.add_subparsers(
        dest="command",
        # Shown in "the following arguments are required: ...", so list the choices.
        metavar="{configuration,cleanup,cleanup-wait,version}",
        required=True,
        parser_class=partial(_Parser, out=stdout, err=stderr),
    )

    configuration = commands.add_parser(
        "configuration",
        help="point containerd at spegel for the mirrored registries",
        description="Write <config path>/<registry>/hosts.toml for every mirrored registry, "
        "moving what was there to <config path>/_backup (once). Nothing else under the "
        "config path is touched.",
    )
    _add_config_path(configuration)
    configuration.add_argument(
        "--mirrored-registries",
        metavar="URL",
        nargs="*",
        action=_CommaSeparated,
        default=[],
        help="registries to mirror, e.g. https://docker.io,https://ghcr.io; "
        "none means every registry (_default)",
    )
    configuration.add_argument(
        "--mirror-targets",
        metavar="URL",
        nargs="*",
        action=_CommaSeparated,
        required=True,
        help="spegel endpoints containerd tries first, in order, e.g. http://10.0.0.5:30020",
    )
    configuration.add_argument(
        "--resolve-tags",
        metavar="BOOL",
        nargs="?",
        const=True,
        default=True,
        type=parse_bool,
        help="let spegel resolve tags to digests (default: true)",
    )
    configuration.add_argument(
        "--prepend-existing",
        metavar="BOOL",
        nargs="?",
        const=True,
        default=False,
        type=parse_bool,
        help="keep the [host] entries of existing hosts.toml files after ours (default: false)",
    )

    configuration.add_argument(
        "--containerd-config-file",
        metavar="FILE",
        default=preflight.DEFAULT_CONTAINERD_CONFIG,
        help="containerd's configuration, read (when it exists) to check that containerd "
        "will use what spegel writes (default: %(default)s)",
    )
    configuration.add_argument(
        "--containerd-sock",
        metavar="SOCKET",
        default="",
        help="containerd's socket, to check its version and images (default: not asked)",
    )
    configuration.add_argument(
        "--containerd-namespace",
        metavar="NAME",
        default="k8s.io",
        help="the namespace the node serves (default: %(default)s)",
    )
    configuration.add_argument(
        "--preflight",
        choices=("strict", "warn", "off"),
        default="strict",
        help="strict: a misconfiguration that keeps spegel from working stops the command "
        "(exit 1) before anything is written; warn: report it and go on; off: do not check "
        "(default: %(default)s)",
    )

    cleanup_command = commands.add_parser(
        "cleanup",
        help="remove spegel's configuration and restore the original",
        description="Remove what 'configuration' wrote and move the originals in "
        "<config path>/_backup back.",
    )
    _add_config_path(cleanup_command)
    cleanup_command.add_argument(
        "--serve-addr",
        metavar="[HOST]:PORT",
        type=_argument(flags.parse_listen_address),
        default=None,
        help="once clean, answer GET /healthz with 200 on this address until SIGTERM "
        "(the chart's post-delete hook waits for that on every node); default: exit at once",
    )

    wait_command = commands.add_parser(
        "cleanup-wait",
        help="wait until every node's 'cleanup --serve-addr' says it is clean",
        description="Resolve every NAME (all its A/AAAA addresses) each round and ask each "
        "address for GET /healthz; exit 0 once every address answered 200 in two rounds in a "
        "row, 1 on timeout.",
    )
    wait_command.add_argument(
        "--probe-endpoints",
        metavar="NAME:PORT",
        nargs="*",
        action=_CommaSeparated,
        required=True,
        help="names (or IP addresses) and ports to probe, e.g. "
        "spegel-cleanup.spegel.svc.cluster.local:8080",
    )
    wait_command.add_argument(
        "--timeout",
        metavar="DURATION",
        type=_argument(flags.parse_duration),
        default="10m",
        help="give up (exit 1) after this long (default: %(default)s)",
    )
    wait_command.add_argument(
        "--interval",
        metavar="DURATION",
        type=_argument(flags.parse_duration),
        default="2s",
        help="time between rounds (default: %(default)s)",
    )

    commands.add_parser("version", help="print the version", description="Print the version.")
    return parser


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
        arguments = build_parser(out, err).parse_args(sys.argv[1:] if argv is None else list(argv))
        if arguments.command == "version":
            print(spegel.__version__, file=out)
            return EXIT_OK
        if arguments.command == "cleanup-wait":
            return _cleanup_wait(arguments, out, err, environment or cleanuphook.Environment())
        if not arguments.containerd_registry_config_path:
            raise UsageError("--containerd-registry-config-path must not be empty")
        if arguments.command == "configuration":
            return _configuration(arguments, out, err)
        return _cleanup(arguments, out, err, reactor)
    except _Exit as e:
        return e.status
    except (UsageError, InvalidRegistryURL, InvalidMirrorConfiguration) as e:
        print(f"spegel: error: {e}", file=err)
        return EXIT_USAGE
    except (HostsConfigError, OSError) as e:
        print(f"spegel: error: {e}", file=err)
        return EXIT_FAILED


def _configuration(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # Validated in full before the directory is touched.
    wanted = MirrorConfiguration.from_strings(
        arguments.mirrored_registries,
        arguments.mirror_targets,
        resolve_tags=arguments.resolve_tags,
        prepend_existing=arguments.prepend_existing,
    )
    root = arguments.containerd_registry_config_path.rstrip("/") or "/"
    if arguments.preflight != "off":
        problems = preflight.run_preflight(
            config_file=arguments.containerd_config_file,
            certs_dir=root,
            socket_path=arguments.containerd_sock or None,
            namespace=arguments.containerd_namespace,
        )
        for problem in problems:
            print(f"spegel: {problem}", file=err)
        if arguments.preflight == "strict" and any(p.fatal for p in problems):
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


def _cleanup(arguments: argparse.Namespace, out: TextIO, err: TextIO, reactor: Any) -> int:
    root = arguments.containerd_registry_config_path.rstrip("/") or "/"
    result = cleanup(root)
    if not result.removed and not result.restored:
        print(f"nothing to clean up in {root}", file=out)
    for path in result.removed:
        print(f"removed {root}/{path}", file=out)
    for name in result.restored:
        print(f"restored {root}/{name}", file=out)
    if arguments.serve_addr is None:
        return EXIT_OK
    if reactor is None:
        from twisted.internet import reactor
    resource = cleanuphook.healthz_resource(root)
    return cleanuphook.serve_until_stopped(reactor, arguments.serve_addr, resource, out, err)


def _cleanup_wait(
    arguments: argparse.Namespace, out: TextIO, err: TextIO, environment: cleanuphook.Environment
) -> int:
    try:
        endpoints = [parse_host_port(text) for text in arguments.probe_endpoints]
    except ValueError as e:
        raise UsageError(f"--probe-endpoints: {e}") from None
    if not endpoints:
        raise UsageError("--probe-endpoints: at least one NAME:PORT is needed")
    if arguments.interval <= 0:
        raise UsageError("--interval must be more than 0s")

    def report(line: str) -> None:
        print(line, file=out, flush=True)

    try:
        clean = cleanuphook.wait_until_clean(
            endpoints,
            timeout=arguments.timeout,
            interval=arguments.interval,
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

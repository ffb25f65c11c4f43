# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
A real DNS server for the rig's clusters: what a cluster's DNS is to spegel's bootstrap, the
headless Service's name answered with the address of every node.

    python -m spegel_testing.dns --address 198.18.1.1 --port 53 --records records.json

C{records.json} maps names to IPv4 addresses, C{{"spegel-bootstrap.spegel.svc.cluster.local":
["198.18.1.2", "198.18.1.3"]}}; it is read on every query, so the rig adds and removes nodes by
rewriting it.  Answers are authoritative, over UDP and TCP (a 30-node answer no longer fits 512
bytes, and a resolver then retries over TCP); names not in the file get NXDOMAIN, a known name's
AAAA question an empty answer.  It is Twisted's own DNS server (C{twisted.names}), as a separate
process because the rig's tests block their reactor while they wait for containerd.

L{DNSServer} runs it for a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Any

from attrs import define, field

from spegel_testing.process import ManagedProcess, RunsOneProcess, wait_for

# A short TTL: the rig's membership changes during a test.
TTL = 1


def _serve(address: str, port: int, records_path: str) -> None:
    from twisted.internet import defer, reactor
    from twisted.names import common, dns, error, server

    class RecordsFile(common.ResolverBase):
        def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
            with open(records_path) as f:
                records = {key.lower().rstrip("."): value for key, value in json.load(f).items()}
            wanted = name.decode("ascii", "replace").lower().rstrip(".")
            if wanted not in records:
                return defer.fail(error.DomainError(name))
            answers = []
            if type in (dns.A, dns.ALL_RECORDS):
                answers = [
                    dns.RRHeader(name=name, type=dns.A, ttl=TTL, auth=True, payload=dns.Record_A(ip, ttl=TTL))
                    for ip in records[wanted]
                ]
            return defer.succeed((answers, [], []))

    factory = server.DNSServerFactory(authorities=[RecordsFile()])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=address)  # type: ignore[attr-defined]
    reactor.listenTCP(port, factory, interface=address)
    print(f"listening on {address}:{port}", flush=True)
    reactor.run()


@define(eq=False)
class DNSServer(RunsOneProcess):
    """
    The server above, on C{address}:C{port}, answering from a records file it owns.
    """

    address: str
    port: int = 53
    base_dir: str = field(factory=lambda: tempfile.mkdtemp(prefix="spegel-dns-"))
    name: str = "dns"
    _process: ManagedProcess | None = field(default=None, init=False)

    @property
    def records_path(self) -> str:
        return os.path.join(self.base_dir, "records.json")

    def set_records(self, records: dict[str, list[str]]) -> None:
        """
        Answer with C{records} from now on (written atomically: a query never reads half).
        """
        partial = self.records_path + ".partial"
        with open(partial, "w") as f:
            json.dump(records, f)
        os.replace(partial, self.records_path)

    def start(self, timeout: float = 20.0) -> None:
        if not os.path.exists(self.records_path):
            self.set_records({})
        self._process = ManagedProcess(
            name=self.name,
            args=[sys.executable, "-m", "spegel_testing.dns", "--address", self.address, "--port", str(self.port), "--records", self.records_path],
            log_path=os.path.join(self.base_dir, "dns.log"),
        )
        self._process.start()
        wait_for(self._answers, timeout=timeout, what=f"{self.name} on {self.address}:{self.port}", process=self._process)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            return probe.connect_ex((self.address, self.port)) == 0

    def cleanup(self) -> None:
        if self._process is not None:
            self._process.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spegel_testing.dns", description="The rig's DNS server.")
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--records", required=True, help="JSON file: name -> [IPv4 address, ...]")
    args = parser.parse_args(argv)
    _serve(args.address, args.port, args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

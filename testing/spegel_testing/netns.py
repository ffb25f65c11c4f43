# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
Hosts of their own on one machine: network namespaces on a bridge, each with its own address,
so several nodes listen on the same ports as in a cluster (5000, 5001, 9090) and see each other
at distinct addresses.

Addresses are taken only from the benchmarking range 198.18.0.0/15 (RFC 2544), one /24 per
L{Network}, and nothing is routed anywhere: the bridge has no uplink and no NAT, and the
namespaces' only route is the bridge's subnet.  The host side of the bridge has the subnet's
first address, so a server on the host (an upstream registry, a DNS server) bound to it is
reachable from every namespace.

Processes are run inside a namespace with C{nsenter --net}, which changes the network namespace
only: unlike C{ip netns exec}, it keeps the host's C{/sys} (and its cgroup file system), which
containerd and runc need.

Every network is remembered until it is removed; an C{atexit} hook removes what is left, so a
failing test leaves no bridge or namespace behind.  A namespace is removed only after every
process in it is killed (a namespace lives as long as a process is in it).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import signal
import subprocess

from attrs import define, field

from spegel_testing.process import run

# RFC 2544's benchmarking range: never routed on the internet, and nothing here routes it.
BENCHMARK_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
NETNS_DIR = "/run/netns"

_live: dict[str, "Network"] = {}


def _ip(*args: str) -> str:
    return run(["ip", *args], timeout=30)


def _used_subnets() -> set[ipaddress.IPv4Network]:
    """The /24s of 198.18.0.0/15 that an interface of this machine has an address in."""
    used = set()
    for line in _ip("-o", "-4", "addr", "show").splitlines():
        words = line.split()
        if "inet" in words:
            interface = ipaddress.ip_interface(words[words.index("inet") + 1])
            if interface.ip in BENCHMARK_RANGE:
                used.add(ipaddress.IPv4Network(f"{interface.ip}/24", strict=False))
    return used


@define(eq=False)
class Host:
    """
    One network namespace on a L{Network}: a host of the rig's cluster.

    @ivar name: the namespace's name (C{ip netns list}).
    @ivar address: its address on the bridge.
    @ivar veth: the host end of its link, attached to the bridge.
    """

    name: str
    address: str
    veth: str

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    def command(self, args: list[str]) -> list[str]:
        """
        C{args} run inside this namespace (and only its network namespace).
        """
        return ["nsenter", f"--net={self.path}", "--", *args]

    def run(self, args: list[str], timeout: float = 60.0) -> str:
        return run(self.command(args), timeout=timeout)

    def limit_rate(self, rate: str, burst: str = "256kb", latency: str = "50ms") -> None:
        """
        Cap what this host sends to C{rate} (C{tc}'s units: C{100mbit}, C{1gbit}) with a token
        bucket on its link: what a registry across the internet, or a node's NIC, allows.
        (This kernel has no C{netem}; latency comes from L{spegel_testing.delayproxy}.)
        """
        run(self.command(["tc", "qdisc", "replace", "dev", f"{self.veth}p", "root", "tbf", "rate", rate, "burst", burst, "latency", latency]))

    def cut(self) -> None:
        """
        Take the host's link down on the bridge side: every packet to and from it is lost from
        now on, with no reset sent, as when a node's network fails (this kernel has no netem).
        """
        _ip("link", "set", self.veth, "down")

    def mend(self) -> None:
        """Bring the link back up after L{cut}."""
        _ip("link", "set", self.veth, "up")

    def pids(self) -> list[int]:
        """
        The processes whose network namespace this is.
        """
        try:
            output = _ip("netns", "pids", self.name)
        except Exception:
            return []
        return [int(word) for word in output.split()]


@define(eq=False)
class Network:
    """
    A bridge on the host with an address in a free /24 of 198.18.0.0/15, and the namespaces
    attached to it.  Build with L{Network.create}; remove with L{cleanup}.

    @ivar tag: short and unique per run, in every interface and namespace name (interface
        names are limited to 15 bytes).
    @ivar subnet: the network's /24.
    """

    tag: str
    subnet: ipaddress.IPv4Network
    hosts: list[Host] = field(factory=list)

    @property
    def bridge(self) -> str:
        return f"spbr{self.tag}"

    @property
    def host_address(self) -> str:
        """The host's address on the bridge: where servers for every namespace listen."""
        return str(self.subnet.network_address + 1)

    @classmethod
    def create(cls) -> "Network":
        """
        A new bridge, up, with the first address of a /24 that no interface here uses.
        """
        used = _used_subnets()
        subnet = next((s for s in BENCHMARK_RANGE.subnets(new_prefix=24) if s not in used and s.network_address.packed[2] != 0), None)
        if subnet is None:
            raise RuntimeError("every /24 of 198.18.0.0/15 is in use on this machine")
        tag = f"{os.getpid() % 100000}{subnet.network_address.packed[2]:x}"[-7:]
        network = cls(tag=tag, subnet=subnet)
        _live[network.bridge] = network
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            _ip("addr", "add", f"{network.host_address}/24", "dev", network.bridge)
            _ip("link", "set", network.bridge, "up")
        except BaseException:
            network.cleanup()
            raise
        return network

    def add_host(self) -> Host:
        """
        A new namespace with the next address, linked to the bridge, with loopback up.
        """
        index = len(self.hosts)
        address = str(self.subnet.network_address + 2 + index)
        host = Host(name=f"sp{self.tag}n{index}", address=address, veth=f"sp{self.tag}v{index}")
        self.hosts.append(host)
        inside = f"{host.veth}p"
        _ip("netns", "add", host.name)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", host.name)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        _ip("-n", host.name, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", host.name, "link", "set", inside, "up")
        _ip("-n", host.name, "link", "set", "lo", "up")
        return host

    def cleanup(self) -> None:
        """
        Kill every process in the namespaces, then remove them and the bridge.  Safe to call
        twice and after a partial L{create}.
        """
        for host in self.hosts:
            for pid in host.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        self.hosts.clear()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        _live.pop(self.bridge, None)


# The kernel's neighbour (ARP) table is one for every namespace, with its limits set in the
# initial one (Linux defaults: 128 / 512 / 1024 entries).  N hosts that all talk to each other
# need about N * N entries: at 50 nodes, "neighbor table overflow" in dmesg, and connections
# between nodes failing with "No route to host".
_NEIGHBOUR_LIMITS = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
_raised_neighbour_limits: dict[str, int] = {}


def _neighbour_sysctl(name: str) -> str:
    return f"/proc/sys/net/ipv4/neigh/default/{name}"


def ensure_neighbour_table(hosts: int) -> None:
    """
    Make room in the kernel's neighbour table for C{hosts} hosts that all talk to each other
    (the originals are put back by L{restore_neighbour_table}, also at exit).
    """
    wanted = {"gc_thresh1": hosts * hosts, "gc_thresh2": 2 * hosts * hosts, "gc_thresh3": 4 * hosts * hosts}
    for name in _NEIGHBOUR_LIMITS:
        with open(_neighbour_sysctl(name)) as f:
            current = int(f.read())
        if wanted[name] > current:
            _raised_neighbour_limits.setdefault(name, current)
            with open(_neighbour_sysctl(name), "w") as f:
                f.write(str(wanted[name]))


def restore_neighbour_table() -> None:
    for name in reversed(_NEIGHBOUR_LIMITS):
        if name in _raised_neighbour_limits:
            with open(_neighbour_sysctl(name), "w") as f:
                f.write(str(_raised_neighbour_limits.pop(name)))


def cleanup_all() -> None:
    """Remove every network still here.  Registered with C{atexit}."""
    for network in list(_live.values()):
        network.cleanup()
    restore_neighbour_table()


atexit.register(cleanup_all)

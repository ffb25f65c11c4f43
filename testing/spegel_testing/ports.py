# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
Free loopback TCP port picking for the real-component test rig.

A port is picked at random below the kernel's ephemeral range and probed by binding it (TCP, and
UDP when asked); then the socket is closed and the child binds it. Below the ephemeral range, no
outgoing connection anywhere on the machine can take the port in between, which is what made
port 0 (a port from the ephemeral range) racy on a busy machine; only another listener choosing
the same number could, and the random pick makes that unlikely.  Ports handed out by this
process are also remembered so that two components started in the same test never get the same
one.
"""

from __future__ import annotations

import random
import socket

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort

_handed_out: set[int] = set()
# Well clear of the ports services usually take.
_LOWEST = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(field) for field in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1", *, udp_too: bool = False) -> int:
    """
    Return a TCP port on C{host} that nothing listens on right now and that this process has not
    handed out before.

    @param udp_too: also require the UDP port of that number to be free (for an address used
        for both, like a node's router address).
    """
    low, _ = _ephemeral_range()
    below_ephemeral = low - 1 > _LOWEST + 1000
    for _ in range(200):
        candidate = random.randint(_LOWEST, low - 1) if below_ephemeral else 0
        if candidate in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            port = probe.getsockname()[1]
        if port in _handed_out or (udp_too and not _udp_free(host, port)):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port found after 200 tries")


def _udp_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """
    Return C{count} distinct free ports on C{host}.
    """
    return [free_port(host) for _ in range(count)]


def is_listening(host: str, port: int, timeout: float = 0.2) -> bool:
    """
    Whether something accepts TCP connections on C{host}:C{port} right now.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_number(port: IListeningPort) -> int:
    """
    The number C{port} listens on, for one opened on port 0 of an IP address.
    """
    address = port.getHost()
    if not isinstance(address, (IPv4Address, IPv6Address)):
        raise TypeError(f"{port!r} does not listen on an IP address: {address!r}")
    return address.port

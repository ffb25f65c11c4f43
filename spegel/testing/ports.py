# -*- test-case-name: tests.test_rig -*-
"""
Free loopback TCP port picking for the real-component test rig.

A port is found by binding port 0 on 127.0.0.1 and closing the socket again; the kernel does not
hand out the same ephemeral port again soon, so the small race with another process grabbing it
before our child binds it is acceptable for tests.  Ports handed out by this process are also
remembered so that two components started in the same test never get the same one.
"""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1", *, udp_too: bool = False) -> int:
    """
    Return a TCP port on C{host} that nothing listens on right now and that this process has not
    handed out before.

    @param udp_too: also require the UDP port of that number to be free (for an address used
        for both, like a node's router address).
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
            if udp_too and not _udp_free(host, port):
                continue
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port found after 100 tries")


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

"""
Benchmark: a node's reactor and memory under a flood of forged DHT datagrams, without a
cluster key (with one every datagram is dropped on its MAC).

Run with C{.venv/bin/python benchmarks/dht_flood.py [--datagrams 16000] [--records 100000]}.

A victim node (a real L{DHTService} on a loopback UDP port, in this process's reactor) knows
five honest peers and stores C{--records} provider records of 200 other providers, as a busy
node does.  A separate process then sends it C{--datagrams} datagrams as fast as it can: fresh
ids asking for nodes, the honest peers' ids from the attacker's port (each makes the victim ping
the real address), ADD_PROVIDERs of random keys with random ids, GET_PROVIDERs, and garbage.
Meanwhile a 5 ms C{LoopingCall} measures how late the reactor runs it: the worst lateness is the
longest the node (its registry included, which shares the reactor) stalled.  Printed: stalls
(p50, p99, max), the victim's RSS before and after, its routing table and store sizes, and the
bytes it sent back against the bytes it received.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

from twisted.internet import defer, reactor, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dht_common import BASE, start_nodes

from spegel.dht.ids import Provider

FLOODER = r"""
import os, random, socket, sys
import msgpack
from spegel.dht import wire
from spegel.dht.wire import Message
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
honest = [bytes.fromhex(h) for h in sys.argv[4].split(",")]
rng = random.Random(7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setblocking(False)
sent = 0
received = 0
for i in range(count):
    kind = i % 5
    txid = rng.randbytes(8)
    if kind == 0:
        m = Message(txid, rng.randbytes(32), wire.FindNode(rng.randbytes(32)))
    elif kind == 1:
        m = Message(txid, honest[i % len(honest)], wire.Ping())
    elif kind == 2:
        m = Message(txid, rng.randbytes(32), wire.AddProvider(6666, tuple(rng.randbytes(32) for _ in range(32))))
    elif kind == 3:
        m = Message(txid, rng.randbytes(32), wire.GetProviders(rng.randbytes(32)))
    data = rng.randbytes(rng.randrange(1, 1200)) if kind == 4 else wire.encode(m)
    while True:
        try:
            s.sendto(data, (host, port))
            break
        except BlockingIOError:
            pass
    sent += len(data)
    try:
        while True:
            received += len(s.recv(2048))
    except BlockingIOError:
        pass
s.settimeout(1.0)
try:
    while True:
        received += len(s.recv(2048))
except OSError:
    pass
print(sent, received, flush=True)
"""


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def run(datagrams: int, records: int) -> None:
    nodes = await start_nodes(reactor, 6, BASE)
    victim, honest = nodes[0], nodes[1:]
    await task.deferLater(reactor, 1.0, lambda: None)
    rng = random.Random(1)
    providers = [Provider(rng.randbytes(32), f"10.1.{i // 250}.{i % 250 + 1}", 5000) for i in range(200)]
    for i in range(records):
        victim.node.store.add(rng.randbytes(32), providers[i % len(providers)])
    before = rss_mib()
    lateness: list[float] = []
    expected = [time.monotonic() + 0.005]

    def tick() -> None:
        now = time.monotonic()
        lateness.append(max(0.0, now - expected[0]))
        expected[0] = now + 0.005

    monitor = task.LoopingCall(tick)
    monitor.start(0.005, now=False)
    host, port = victim.address
    ids = ",".join(n.node.node_id.hex() for n in honest)
    started = time.monotonic()
    result = await _spawn([sys.executable, "-c", FLOODER, host, str(port), str(datagrams), ids])
    elapsed = time.monotonic() - started
    await task.deferLater(reactor, 1.0, lambda: None)
    monitor.stop()
    sent, received = (int(x) for x in result.split())
    ordered = sorted(lateness)
    p = lambda q: ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000
    node = victim.node
    print(f"{datagrams} datagrams in {elapsed:.1f} s ({datagrams / elapsed:.0f}/s), store prefilled with {records} records")
    print(f"reactor lateness: p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {ordered[-1] * 1000:.1f} ms ({len(ordered)} ticks)")
    print(f"RSS {before:.0f} -> {rss_mib():.0f} MiB; routing table {len(node.routing)} contacts; store {len(node.store)} records")
    print(f"attacker sent {sent} bytes, got back {received} ({received / max(sent, 1):.2f}x)")
    for n in nodes:
        await n.stopService()


def _spawn(args: list[str]) -> defer.Deferred[str]:
    # The flooder blocks on its socket, so it runs in its own process; wait for it without
    # blocking the reactor being measured.
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    done: defer.Deferred[str] = defer.Deferred()

    def poll() -> None:
        if process.poll() is None:
            reactor.callLater(0.05, poll)
        else:
            done.callback(process.stdout.read() if process.stdout else "")

    poll()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datagrams", type=int, default=16_000)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    task.react(lambda _: defer.ensureDeferred(run(args.datagrams, args.records)))


if __name__ == "__main__":
    main()

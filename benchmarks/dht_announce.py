"""
Benchmark: the cost of announcing many keys, with N real DHT nodes on loopback UDP.

    .venv/bin/python benchmarks/dht_announce.py --nodes 100 --keys 1000 10000

One node announces K fresh keys (each to its k = 20 closest nodes); prints the datagrams that
node sent per key announced (lookups + batched ADD_PROVIDER), the datagrams the whole
cluster exchanged per key (counting replies), and the time the announcement took.  The naive
scheme, one lookup plus k messages per key, costs more than k = 20 datagrams per key.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from dht_common import now, start_nodes, stop_nodes
from spegel.dht.ids import key_id


async def main(reactor, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--keys", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args(argv)
    rng = random.Random(options.seed)
    services = await start_nodes(reactor, options.nodes)
    try:
        print(f"{options.nodes} nodes, k = {services[0].config.k}")
        print("keys    lookups  ADD_PROVIDER msgs  acked   announcer datagrams/key  cluster datagrams/key  seconds")
        for count in options.keys:
            announcer = rng.choice(services)
            keys = [key_id(f"sha256:{rng.getrandbits(256):064x}") for _ in range(count)]
            mine = sum(announcer.node.protocol.sent.values())
            everyone = sum(sum(s.node.protocol.sent.values()) for s in services)
            started = now()
            result = await announcer.node.announce(keys)
            elapsed = now() - started
            mine = sum(announcer.node.protocol.sent.values()) - mine
            everyone = sum(sum(s.node.protocol.sent.values()) for s in services) - everyone
            print(
                f"{count:6d}  {result.lookups:7d}  {result.messages:17d}  {result.acknowledged:5d}"
                f"   {mine / count:23.3f}  {everyone / count:21.3f}  {elapsed:7.2f}",
                flush=True,
            )
    finally:
        await stop_nodes(services)


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))

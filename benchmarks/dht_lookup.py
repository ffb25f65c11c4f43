"""
Benchmark: provider lookup latency and cluster-wide visibility of a new key, N real DHT
nodes on loopback UDP.

    .venv/bin/python benchmarks/dht_lookup.py --nodes 20 100 [--processes 4]

Prints, per cluster size: p50/p99 of provider lookups (time to the first provider, which is
what the mirror's hedged proxy waits for, and time to the end of the lookup), of lookups for
keys nobody provides (they ask the key's k closest nodes before giving up), and the time
from C{provide()} on one node until the key's k closest nodes acknowledged its record (then
checked: every other node finds it).

With C{--processes P} the nodes are spread over this process and P - 1 workers (see
C{dht_common}); lookups are made by nodes of this process, timed here, and ask nodes of any
process.  With P = 1 (the default) all nodes share this process's one thread, so a lookup
also waits for the CPU time of every node it asks, one after another.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react

from dht_common import Cluster, now, percentile


async def measure(reactor, n: int, processes: int, keys: int, lookups: int, rng: random.Random) -> dict[str, float]:  # type: ignore[no-untyped-def]
    cluster = Cluster(reactor)
    try:
        await cluster.start(n, processes)
        holders = {}
        for _ in range(keys):
            holder = rng.choice(cluster.nodes)
            key = f"sha256:{rng.getrandbits(256):064x}"
            await holder.provide(key)
            holders[key] = holder
        # The set-up keys are announced with a region lookup each: at 100 nodes that is
        # seconds of CPU.  Measuring while it runs would time the set-up, not the lookups.
        await cluster.settle()

        first_times: list[float] = []
        full_times: list[float] = []
        misses = 0
        names = list(holders)
        for _ in range(lookups):
            key = rng.choice(names)
            asker = rng.choice([s for s in cluster.local if s is not holders[key].service])
            asker.clear_provider_cache()  # measure lookups, not the cache
            started = now()
            first: list[float] = []

            # Awaited within this iteration: it never sees a later `first`.
            def note_first(_provider: object) -> None:
                if not first:  # noqa: B023
                    first.append(now())  # noqa: B023

            providers = await asker.find_providers(key, on_provider=note_first)
            full_times.append(now() - started)
            if providers:
                first_times.append(first[0] - started)
            else:
                misses += 1

        # Keys nobody provides: such a lookup still walks until the k closest answered.
        miss_times: list[float] = []
        for _ in range(max(1, lookups // 5)):
            asker = rng.choice(cluster.local)
            started = now()
            providers = await asker.find_providers(f"sha256:{rng.getrandbits(256):064x}")
            miss_times.append(now() - started)
            assert not providers

        # A new key: time from provide() until its records are acknowledged by the key's k
        # closest nodes (from then on any lookup ends there; timed in the holder's process),
        # then every other node checks.
        visibility: list[float] = []
        found_everywhere = 0
        for _ in range(5):
            holder = rng.choice(cluster.nodes)
            key = f"new:{rng.getrandbits(64):x}"
            visibility.append(await holder.provide_and_time(reactor, key))
            counts = await gatherResults(
                [Deferred.fromCoroutine(node.count_providers(key)) for node in cluster.nodes if node is not holder]
            )
            found_everywhere += all(counts)
        return {
            "first_p50": percentile(first_times, 0.5),
            "first_p99": percentile(first_times, 0.99),
            "full_p50": percentile(full_times, 0.5),
            "full_p99": percentile(full_times, 0.99),
            "misses": misses,
            "absent_p50": percentile(miss_times, 0.5),
            "absent_p99": percentile(miss_times, 0.99),
            "visible_max": max(visibility),
            "visible_p50": percentile(visibility, 0.5),
            "found_everywhere": found_everywhere,
        }
    finally:
        await cluster.stop()


async def main(reactor, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--processes", type=int, default=1, help="spread the nodes over this many processes")
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args(argv)
    print(f"{options.processes} process(es)")
    print(
        "nodes  first-provider p50/p99 ms  whole lookup p50/p99 ms  misses"
        "  absent key p50/p99 ms  new key announced p50/max ms  then found by all"
    )
    for n in options.nodes:
        r = await measure(reactor, n, options.processes, options.keys, options.lookups, random.Random(options.seed))
        print(
            f"{n:5d}  {r['first_p50'] * 1e3:9.2f} / {r['first_p99'] * 1e3:7.2f}"
            f"        {r['full_p50'] * 1e3:9.2f} / {r['full_p99'] * 1e3:7.2f}"
            f"   {r['misses']:5d}   {r['absent_p50'] * 1e3:8.2f} / {r['absent_p99'] * 1e3:7.2f}"
            f"    {r['visible_p50'] * 1e3:9.1f} / {r['visible_max'] * 1e3:7.1f}"
            f"     {r['found_everywhere']}/5",
            flush=True,
        )


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))

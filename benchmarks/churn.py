"""
Benchmark: churn during a rollout on the multi-host rig (spegel_testing.netcluster).

    .venv/bin/python benchmarks/churn.py [--nodes 20] [--holders 10] [--kill 0.3] [--size-mib 32]

C{--holders} nodes pull the image first (the first from upstream, the rest mostly from it and
each other).  Then every other node pulls at once, and a moment into that rollout 30% of the
holders are killed with SIGKILL (no goodbye to their peers, as a node that loses power).
Meanwhile a prober keeps asking every live node's DHT for every digest of the image (the debug
lookup page: a fresh lookup, never the provider cache), round robin, and counts a lookup as
successful when a node that is alive is among the providers it returned.  Afterwards the killed
nodes start again on their addresses and identities; measured is how long until another node's
lookup finds each of them as a provider again and it serves a blob.

Printed: the rollout's pull times and failures (every pull must complete with the right bytes),
what crossed the upstream link during the rollout, lookup success during the churn and after,
and the restarted nodes' time to be found and to serve, against the DHT's refresh period.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from spegel_testing.httputil import request
from spegel_testing.images import build_image
from spegel_testing.netcluster import NetCluster
from spegel_testing.process import CommandFailed, ProcessFailed

MiB = 1 << 20
# How often a node announces what it holds again (the reference's republish interval, ours too):
# the bound the issue sets for a restarted node to be found.
REFRESH_PERIOD = 15 * 60


class Prober:
    """
    Fresh DHT lookups of C{keys} from every live node, round robin, on a few threads; tallies
    per phase whether a live node was among the providers.
    """

    def __init__(self, cluster: NetCluster, keys: list[str], dead: set[int], threads: int = 6):
        self.cluster = cluster
        self.keys = keys
        self.dead = dead
        self.threads = threads
        self.phase = "before"
        self.tally: dict[str, dict[str, int]] = {}
        self.lookup_seconds: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._turn = 0
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for _ in range(self.threads):
            worker = threading.Thread(target=self._run, daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def _next(self) -> tuple[int, str]:
        with self._lock:
            while True:
                self._turn += 1
                node = self._turn % len(self.cluster.nodes)
                if node not in self.dead:
                    return node, self.keys[(self._turn // len(self.cluster.nodes)) % len(self.keys)]

    def _count(self, phase: str, outcome: str) -> None:
        with self._lock:
            counts = self.tally.setdefault(phase, {})
            counts[outcome] = counts.get(outcome, 0) + 1

    def _run(self) -> None:
        while not self._stop.is_set():
            index, key = self._next()
            phase = self.phase
            node = self.cluster.nodes[index]
            path = "/debug/web/lookup?key=" + urllib.parse.quote(key, safe="")
            try:
                response = request(node.address, node.metrics_port, "GET", path, timeout=10)
            except OSError:
                if index in self.dead:
                    continue  # killed while we asked: not a lookup of a live node
                self._count(phase, "node did not answer")
                continue
            if response.status != 200:
                self._count(phase, f"status {response.status}")
                continue
            answer = json.loads(response.body)
            hosts = {p["host"] for p in answer["providers"]}
            dead_hosts = {self.cluster.nodes[i].address for i in self.dead}
            if hosts - dead_hosts:
                self._count(phase, "found a live holder")
                with self._lock:
                    self.lookup_seconds.append(answer["seconds"])
            elif hosts:
                self._count(phase, "only dead holders")
            elif answer["timed_out"]:
                self._count(phase, "timed out, none found")
            else:
                self._count(phase, "none found")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--holders", type=int, default=10)
    parser.add_argument("--kill", type=float, default=0.3, help="share of the holders killed")
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--kill-after", type=float, default=1.0, help="seconds into the rollout")
    args = parser.parse_args()
    holders = list(range(args.holders))
    rollout = list(range(args.holders, args.nodes))
    killed = holders[1 : 1 + max(1, round(args.kill * args.holders))]  # never the seed: it stays as a witness
    # Three layers, as a small real image: 60/30/10 %.
    sizes = (args.size_mib * MiB * 6 // 10, args.size_mib * MiB * 3 // 10, args.size_mib * MiB // 10)
    image = build_image(seed="churn-bench", layer_sizes=sizes)
    print(f"{args.nodes} nodes; {len(holders)} hold a {image.total_size() / MiB:.1f} MiB image; "
          f"{len(rollout)} pull it at once; {len(killed)} holders killed {args.kill_after} s in "
          f"(nodes {', '.join(str(i + 1) for i in killed)})", flush=True)
    with NetCluster(args.nodes, node_args=["--debug-web-enabled"]) as cluster:
        ref = cluster.push_image("churn/app", "v1", image)
        cluster.pull(0, ref)
        cluster.wait_findable(holders[1:], "churn/app", image, tag="v1", timeout=30)
        with ThreadPoolExecutor(len(holders)) as executor:
            list(executor.map(lambda i: cluster.pull(i, ref, timeout=600), holders[1:]))
        dead: set[int] = set()
        prober = Prober(cluster, sorted(image.digests()), dead)
        prober.start()
        time.sleep(5)
        upstream_before = cluster.upstream_bytes()
        prober.phase = "rollout, before the kill"
        times: dict[int, float] = {}
        failed: dict[int, str] = {}

        def pull(index: int) -> None:
            try:
                times[index] = cluster.pull(index, ref, timeout=600)
            except (CommandFailed, ProcessFailed) as e:
                failed[index] = str(e).splitlines()[-1][:160]

        started = time.monotonic()
        with ThreadPoolExecutor(len(rollout)) as executor:
            futures = [executor.submit(pull, i) for i in rollout]
            time.sleep(args.kill_after)
            dead.update(killed)
            for index in killed:
                cluster.nodes[index].kill()
            prober.phase = "rollout, after the kill"
            for future in futures:
                future.result()
        everyone = time.monotonic() - started
        upstream = (cluster.upstream_bytes() - upstream_before) / MiB
        wrong = []
        for index in rollout:
            daemon = cluster.containerds[index]
            if index in times and (
                daemon.image_digest(ref) != image.digest
                or image.digests() - daemon.content_digests()
                or daemon.damaged_content()
            ):
                wrong.append(index)
        prober.phase = "after the rollout, holders dead"
        time.sleep(10)

        # Restart: each killed node comes back on its address and identity.
        prober.phase = "killed nodes restarting"
        restarted_at = time.monotonic()
        for index in killed:
            cluster.nodes[index].start()
        found_after: dict[int, float] = {}
        served_after: dict[int, float] = {}
        layer = image.layers[0].digest
        witness = cluster.nodes[rollout[0]] if rollout[0] not in dead else cluster.nodes[0]
        deadline = restarted_at + REFRESH_PERIOD
        while len(found_after) < len(killed) and time.monotonic() < deadline:
            path = "/debug/web/lookup?key=" + urllib.parse.quote(layer, safe="")
            response = request(witness.address, witness.metrics_port, "GET", path, timeout=10)
            if response.status == 200:
                hosts = {p["host"] for p in json.loads(response.body)["providers"]}
                for index in killed:
                    if index not in found_after and cluster.nodes[index].address in hosts:
                        found_after[index] = time.monotonic() - restarted_at
            time.sleep(0.2)
        for index in found_after:
            node = cluster.nodes[index]
            ns = urllib.parse.quote(cluster.upstream_ns, safe="")
            response = request(node.address, node.registry_port, "GET", f"/v2/churn/app/blobs/{layer}?ns={ns}", timeout=30)
            if response.status == 200 and len(response.body) == image.layers[0].size:
                served_after[index] = time.monotonic() - restarted_at
        dead.clear()
        prober.phase = "after the restart"
        time.sleep(10)
        prober.stop()

    pulls = list(times.values())
    print(f"rollout on {len(rollout)} nodes: {len(pulls)} completed, {len(failed)} failed, {len(wrong)} wrong; "
          f"pull mean / p50 / max {statistics.mean(pulls):.2f} / {statistics.median(pulls):.2f} / {max(pulls):.2f} s; "
          f"all done {everyone:.2f} s; upstream during the rollout {upstream:.1f} MiB")
    for index, why in failed.items():
        print(f"  node {index + 1} failed: {why}")
    print("lookups (fresh, from every live node, of every digest):")
    for phase, counts in prober.tally.items():
        total = sum(counts.values())
        ok = counts.get("found a live holder", 0)
        detail = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items(), key=lambda c: -c[1]))
        print(f"  {phase:34s} {ok}/{total} = {100 * ok / max(1, total):.2f}% found a live holder ({detail})")
    if prober.lookup_seconds:
        ordered = sorted(prober.lookup_seconds)
        print(f"  successful lookups: p50 {ordered[len(ordered) // 2] * 1000:.0f} ms, "
              f"p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1000:.0f} ms")
    for index in killed:
        found = found_after.get(index)
        served = served_after.get(index)
        print(f"restarted node {index + 1}: found as a provider after "
              f"{'%.1f s' % found if found is not None else 'never'}, served a blob after "
              f"{'%.1f s' % served if served is not None else 'never'} (bound: the {REFRESH_PERIOD // 60} min refresh period)")
    ok = not failed and not wrong and len(served_after) == len(killed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

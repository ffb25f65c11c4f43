# -*- test-case-name: tests.test_rig -*-
"""
Benchmark: one large blob fetched through a node that does not hold it, from the peer that does,
against the reference's way of relaying it (a Go C{net/http} + C{io.Copy} relay, with and without
verification) and the same blob straight from docker-registry, on loopback.

Run with C{.venv/bin/python benchmarks/p2p_blob.py [--size-mib 512] [--runs 5]}.  It starts a
two-node cluster (nodes A and B bootstrap from each other), pushes an image with one layer of
random (incompressible) bytes to a docker-registry, fetches it into B's containerd only, and waits
until A finds it in the DHT.  A request for the blob to A is then a miss on A's own containerd: A
looks B up, streams the blob from B (B serves it from disk with C{os.sendfile}) and hashes it on
the way, holding the last chunk back until the digest matches; on Linux the bytes go from B's
socket to the client's by splice, teed to a hashing thread (L{spegel.relay}).

The client of L{serve_blob} (a raw socket reading into one preallocated buffer) fetches
C{GET /v2/<repo>/blobs/<digest>?ns=<registry>} from A and C{GET /v2/<repo>/blobs/<digest>} from
the registry: each once with the body hashed (untimed), once as a warm-up, then interleaved
A-from-B, registry, A-from-B, registry...  It prints every run, the median throughput of each, the
ratio (A-from-B)/registry against the target (>= 0.8), the CPU each process spent per GiB, A's
peak memory over the timed runs (its peak is reset just before them: it must stay flat, the blob
never passing whole through A), the bytes A passed on from peers (and how many by splice) and B
served from its disk, A's C{spegel_digest_mismatches_total} (must stay 0), and the ceiling this
machine puts on any verifying relay: SHA-256's speed on one core, as a ratio to the registry.  It exits 1 with a one-line reason when
something fails; the rig kills every process it started.

The reference relay (C{benchmarks/gorelay}, built with the installed C{go} into a cache directory
named by its source's hash, no network) asks B for the blob exactly as A does and copies it to
the client: C{Go-copy} with C{io.Copy}, unverified (what the reference does), C{Go-verified}
teeing every chunk into SHA-256 on a goroutine of its own and holding the last 64 KiB back until
the digest matches (what A does).  Their runs are interleaved with A's, and the report gives
ours/Go-copy (target >= 1.0) and ours/Go-verified, both as the ratio of the medians and as the
median of the per-round ratios (each round fetches every path once, so a slow minute of the
shared machine hits them all), and A's CPU per GiB thread by thread.

L{Stopwatch} is shared by the other P2P benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from attrs import frozen

from serve_blob import (
    CLIENTS,
    BenchmarkFailed,
    Client,
    Fetch,
    Server,
    _fetch_into_containerd,
    cpu_seconds,
    guarded,
    fetch_with_socket,
    memory_kib,
)
from spegel_testing.cluster import Cluster, static_bootstrap
from spegel_testing.images import build_image
from spegel_testing.node import SpegelNode
from spegel_testing.ports import free_port
from spegel_testing.process import ManagedProcess, ProcessFailed, wait_for

MiB = 1 << 20
GiB = 1 << 30
# Against the reference's unverified relay (Go-copy); against the registry, the older bar.
TARGET_RATIO = 1.0
REGISTRY_TARGET_RATIO = 0.8
REPO = "bench/p2p-blob"
# A's peak resident set may grow by this much over the timed runs and still count as flat: its
# buffers (socket, treq, the held-back chunk) are a few MiB; the blob is hundreds.
FLAT_MEMORY_GROWTH = 64 * MiB
FINDABLE_TIMEOUT = 10.0
# Indexes in the cluster: A misses and asks the DHT, B holds the blob.
A, B = 0, 1
GORELAY_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gorelay")
GORELAY_CACHE = "/var/cache/spegel-ci/gorelay"
# The names of the paths in the report.
OURS, GO_COPY, GO_VERIFIED, REGISTRY = "A-from-B", "Go-copy", "Go-verified", "registry"


class Stopwatch:
    """
    Seconds since the benchmark started, printed before each progress line.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)


def reset_peak_memory(pid: int) -> None:
    """
    Reset process C{pid}'s C{VmHWM} to its current resident set (C{clear_refs} value 5), so the
    peak read afterwards covers only what follows.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise BenchmarkFailed(f"cannot reset the peak memory of process {pid} (needs root): {e}") from None


def build_gorelay() -> str:
    """
    Build the reference relay with the installed Go toolchain, once per version of its source.

    @return: the path of the binary.
    @raise BenchmarkFailed: when there is no Go, or the build fails.
    """
    source = hashlib.sha256()
    names = sorted(n for n in os.listdir(GORELAY_SOURCE) if n.endswith((".go", ".mod")))
    for name in names:
        with open(os.path.join(GORELAY_SOURCE, name), "rb") as f:
            source.update(name.encode() + b"\0" + f.read() + b"\0")
    binary = os.path.join(GORELAY_CACHE, source.hexdigest()[:16], "gorelay")
    if os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        raise BenchmarkFailed("the reference relay needs Go: no `go` on PATH or in /usr/local/go/bin")
    os.makedirs(os.path.dirname(binary), exist_ok=True)
    # Standard library only: no module downloads, no toolchain switch.
    env = dict(os.environ, GOPROXY="off", GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="0")
    built = subprocess.run(
        [go, "build", "-o", binary + ".new", "."], cwd=GORELAY_SOURCE, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    if built.returncode != 0:
        raise BenchmarkFailed(f"building {GORELAY_SOURCE} failed: {(built.stderr.strip() or '?').splitlines()[-1]}")
    os.replace(binary + ".new", binary)
    return binary


@contextmanager
def gorelay(binary: str, name: str, upstream: str, path: str, verify: bool, logs: str) -> Iterator[Server]:
    """
    Run the reference relay in front of C{upstream} until the block ends.

    @return: the relay as a server under test, for C{path}.
    """
    port = free_port()
    process = ManagedProcess(
        name,
        [binary, "-listen", f"127.0.0.1:{port}", "-upstream", upstream, f"-verify={str(verify).lower()}"],
        os.path.join(logs, f"{name}.log"),
    )
    process.start()
    try:
        wait_for(lambda: "listening on" in process.log_text(), timeout=10, what=f"{name} to listen", process=process)
        assert process.pid is not None
        yield Server(name, port, path, process.pid)
    finally:
        process.stop()


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """
    The CPU time (user plus system) each live thread of process C{pid} has used so far.
    """
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds[int(tid)] = cpu_seconds(pid, thread=int(tid))
        except BenchmarkFailed:
            pass  # it ended in between
    return seconds


@frozen
class NodeCounters:
    """
    What a node's metrics say about the bytes it served.

    @ivar local: bytes served from its own containerd.
    @ivar peer: bytes passed on from peers.
    @ivar mismatches: copies from peers whose bytes did not match their digest.
    @ivar spliced: of C{peer}, the bytes moved by splice, never entering the node's process.
    """

    local: float
    peer: float
    mismatches: float
    spliced: float

    @classmethod
    def of(cls, node: SpegelNode) -> "NodeCounters":
        metrics = node.metrics()
        return cls(
            metrics.total("spegel_served_bytes_total", source="local"),
            metrics.total("spegel_served_bytes_total", source="peer"),
            metrics.total("spegel_digest_mismatches_total"),
            metrics.total("spegel_spliced_bytes_total"),
        )

    def __sub__(self, other: "NodeCounters") -> "NodeCounters":
        return NodeCounters(
            self.local - other.local,
            self.peer - other.peer,
            self.mismatches - other.mismatches,
            self.spliced - other.spliced,
        )


def run_benchmark(size_mib: int, runs: int, client_name: str, timeout: float) -> bool:
    """
    Set everything up, measure, print the report.

    @return: whether A-from-B met the target ratio against the Go relay that does not verify.
    @raise BenchmarkFailed: when something does not work.
    """
    clock = Stopwatch()
    client = CLIENTS[client_name]
    with tempfile.TemporaryDirectory(prefix="spegel-bench-") as scratch:
        clock.say(f"building an image with one {size_mib} MiB layer of random bytes")
        image = build_image(seed="p2p-blob", layer_sizes=[size_mib * MiB], compress=False, directory=scratch)
        (layer,) = image.layers
        clock.say("starting docker-registry, two containerds and two spegel nodes (A, B) on 127.0.0.1")
        with Cluster(2, node_args=static_bootstrap, wait_ready=True, log_level="info") as cluster:
            registry = cluster.registry
            node_a, node_b = cluster.nodes[A], cluster.nodes[B]
            holder = cluster.containerds[B]
            clock.say(f"pushing the image to docker-registry at {registry.url}")
            ref = registry.push_image(REPO, "v1", image)
            shutil.rmtree(scratch, ignore_errors=True)
            clock.say(f"fetching {ref} into B's containerd only")
            _fetch_into_containerd(holder, ref)
            on_disk = holder.blob_path(layer.digest)
            if not os.path.isfile(on_disk) or os.path.getsize(on_disk) != layer.size:
                raise BenchmarkFailed(f"B's content store has no complete {layer.digest} at {on_disk}")
            if os.path.exists(cluster.containerds[A].blob_path(layer.digest)):
                raise BenchmarkFailed("A's containerd holds the blob: every request would be a local hit")
            try:
                seconds = cluster.wait_findable([A], REPO, image, timeout=FINDABLE_TIMEOUT)
            except ProcessFailed:
                raise BenchmarkFailed(f"A does not find B's copy in the DHT after {FINDABLE_TIMEOUT:.0f}s") from None
            clock.say(f"A finds the image through the DHT ({seconds:.2f}s after the fetch)")
            pids = [node_a.pid, node_b.pid, registry.pid]
            if None in pids:
                raise BenchmarkFailed("the rig does not know the pid of a node or the registry")
            ns = urllib.parse.quote(registry.host, safe="")
            path = f"/v2/{REPO}/blobs/{layer.digest}?ns={ns}"
            through_a = Server(OURS, node_a.registry_port, path, node_a.pid)  # type: ignore[arg-type]
            direct = Server(REGISTRY, registry.port, f"/v2/{REPO}/blobs/{layer.digest}",
                            registry.pid)  # type: ignore[arg-type]
            binary = build_gorelay()
            clock.say(f"starting the reference relays ({binary}) in front of B")
            upstream = f"http://127.0.0.1:{node_b.registry_port}"
            with tempfile.TemporaryDirectory(prefix="spegel-gorelay-") as logs, \
                    gorelay(binary, GO_COPY, upstream, path, False, logs) as go_copy, \
                    gorelay(binary, GO_VERIFIED, upstream, path, True, logs) as go_verified:
                return _measure(cluster, [through_a, go_copy, go_verified, direct], layer.digest, layer.size,
                                runs, client, client_name, timeout, clock)


def _measure(
    cluster: Cluster,
    servers: list[Server],
    digest: str,
    size: int,
    runs: int,
    client: Client,
    client_name: str,
    timeout: float,
    clock: Stopwatch,
) -> bool:
    """
    Verify, warm up, run the interleaved timed fetches and print the report.

    @param servers: A-from-B first, then the Go relays, then the registry.
    """
    node_a, node_b = cluster.nodes[A], cluster.nodes[B]
    through_a = servers[0]
    # The push and containerd's fetch reach the disk now, not in the middle of a timed run.
    os.sync()
    for server in servers:
        checked = fetch_with_socket(server, size, timeout, verify=True)
        if checked.digest != digest:
            raise BenchmarkFailed(f"{server.name} served bytes hashing to {checked.digest}, not {digest}")
        clock.say(f"{server.name}: served {size} bytes with the right sha256 (checked, untimed)")
    for server in servers:
        client(server, size, timeout)
    clock.say(f"warm-up done; {runs} timed rounds with the {client_name} client, every path once a round")

    a_before, b_before = NodeCounters.of(node_a), NodeCounters.of(node_b)
    reset_peak_memory(through_a.pid)
    memory_before = memory_kib(through_a.pid)
    processes = {s.name: s.pid for s in servers}
    processes["B"] = node_b.pid  # type: ignore[assignment]
    cpu_before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    a_threads_before = thread_cpu_seconds(through_a.pid)
    results: dict[str, list[Fetch]] = {s.name: [] for s in servers}
    for run in range(1, runs + 1):
        for server in servers:
            fetch = client(server, size, timeout)
            results[server.name].append(fetch)
            print(
                f"  run {run}  {server.name:<11}  {fetch.mib_per_second:8.1f} MiB/s  ({fetch.seconds:.3f} s)",
                flush=True,
            )
    cpu_used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in processes.items()}
    a_threads = thread_cpu_seconds(through_a.pid)
    memory_after = memory_kib(through_a.pid)
    a_used, b_used = NodeCounters.of(node_a) - a_before, NodeCounters.of(node_b) - b_before

    served = runs * size
    # Everything A sent must have come from B (not from A's own disk), and A must never have had
    # to throw a copy away: with verification always on, a mismatch would mean wrong bytes on B.
    if a_used.mismatches:
        raise BenchmarkFailed(f"A counted {a_used.mismatches:.0f} digest mismatches on copies from B")
    if a_used.peer < served or a_used.local:
        raise BenchmarkFailed(
            f"A passed on {a_used.peer:.0f} bytes from peers and {a_used.local:.0f} from its own disk; "
            f"{served} were fetched through it"
        )
    # B serves A and both Go relays.
    from_b = served * (len(servers) - 1)
    if b_used.local < from_b:
        raise BenchmarkFailed(f"B served {b_used.local:.0f} bytes from its disk, {from_b} were fetched through A and Go")

    medians = {name: statistics.median(f.mib_per_second for f in fetches) for name, fetches in results.items()}
    served_gib = served / GiB
    print()
    print(f"blob           {digest} ({size / MiB:.1f} MiB, random bytes), held by B only")
    print(f"client         {client_name}; {runs} rounds, every path once a round, after one checked fetch and one warm-up each")
    for server in servers:
        speeds = sorted(f.mib_per_second for f in results[server.name])
        print(
            f"{server.name:<14} median {medians[server.name]:8.1f} MiB/s  (min {speeds[0]:.1f}, max {speeds[-1]:.1f}: "
            f"spread {speeds[-1] / speeds[0]:.2f}x), CPU {cpu_used[server.name] / served_gib:.2f} s/GiB"
        )
    print(f"B              CPU {cpu_used['B'] / (from_b / GiB):.2f} s/GiB served (sendfile from its disk)")
    reactor = a_threads.get(through_a.pid, 0.0) - a_threads_before.get(through_a.pid, 0.0)
    # Threads that ended during the runs are in the process's total only.
    others = {
        tid: seconds - a_threads_before.get(tid, 0.0)
        for tid, seconds in a_threads.items()
        if tid != through_a.pid and (seconds - a_threads_before.get(tid, 0.0)) / served_gib >= 0.005
    }
    workers = max(cpu_used[OURS] - reactor, 0.0)
    per_thread = ", ".join(f"{tid} {seconds / served_gib:.2f}" for tid, seconds in sorted(others.items()))
    print(
        f"A's threads    reactor {reactor / served_gib:.2f} s/GiB, other threads (hashing) {workers / served_gib:.2f} "
        f"s/GiB ({per_thread or 'none live'}): with cores to spare, A could relay "
        f"{GiB / MiB / max(reactor, workers, 1e-9) * served_gib:.0f} MiB/s before its busiest thread is saturated"
    )
    growth = memory_after["VmHWM"] - memory_before["VmRSS"]
    flat = growth * 1024 <= FLAT_MEMORY_GROWTH
    print(
        f"A memory       VmRSS {memory_before['VmRSS'] / 1024:.1f} MiB before the runs, peak (VmHWM) "
        f"{memory_after['VmHWM'] / 1024:.1f} MiB during them, {growth / 1024:+.1f} MiB "
        f"(the blob is {size / MiB:.0f} MiB): {'flat' if flat else 'NOT flat'}"
    )
    print(
        f"bytes          A passed on {a_used.peer / MiB:.0f} MiB from peers "
        f"({a_used.spliced / max(a_used.peer, 1):.0%} by splice); B served {b_used.local / MiB:.0f} MiB "
        f"from its disk; A's spegel_digest_mismatches_total +{a_used.mismatches:.0f} "
        f"(total {NodeCounters.of(node_a).mismatches:.0f})"
    )
    hashing = sha256_mib_per_second()
    print(
        f"ceiling        SHA-256 on one core of this machine: {hashing:.0f} MiB/s = "
        f"{hashing / medians[REGISTRY]:.2f} of the registry, the most a verifying relay could reach "
        f"with no CPU left for B, the client or moving the bytes ({os.cpu_count()} cores here)"
    )
    met = True
    for other, target in ((GO_COPY, TARGET_RATIO), (GO_VERIFIED, None), (REGISTRY, REGISTRY_TARGET_RATIO)):
        ratio = medians[OURS] / medians[other]
        rounds = [ours.mib_per_second / theirs.mib_per_second for ours, theirs in zip(results[OURS], results[other])]
        line = (
            f"ratio          {OURS}/{other} = {ratio:.2f} of the medians, {statistics.median(rounds):.2f} median of "
            f"the rounds' ({min(rounds):.2f}-{max(rounds):.2f})"
        )
        if target is not None:
            line += f" (target >= {target:.1f}): {'target met' if ratio >= target else 'BELOW target'}"
        if other == GO_COPY:
            met = ratio >= target  # type: ignore[operator]
        print(line)
    return met


def sha256_mib_per_second(mib: int = 256, repeats: int = 3) -> float:
    """
    How fast one core hashes with SHA-256 (hashlib, as the node does), 1 MiB at a time: the
    median of C{repeats} passes over C{mib} MiB.
    """
    chunk = memoryview(bytearray(os.urandom(MiB)))
    speeds = []
    for _ in range(repeats):
        hasher = hashlib.sha256()
        started = time.perf_counter()
        for _ in range(mib):
            hasher.update(chunk)
        speeds.append(mib / (time.perf_counter() - started))
    return statistics.median(speeds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/p2p_blob.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    parser.add_argument("--size-mib", type=int, default=512, help="layer payload in MiB (default 512)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per path (default 5)")
    parser.add_argument(
        "--client", choices=sorted(CLIENTS), default="socket",
        help="what fetches the blob: a raw socket with recv_into (default) or curl -o /dev/null",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for one fetch (default 120)")
    args = parser.parse_args(argv)
    if args.size_mib < 5 or args.runs < 1 or args.timeout <= 0:
        # 4 MiB and less take the spooled path, not the streamed one this measures.
        parser.error("--size-mib must be at least 5, --runs at least 1, --timeout positive")
    return guarded(lambda: run_benchmark(args.size_mib, args.runs, args.client, args.timeout))


if __name__ == "__main__":
    sys.exit(main())

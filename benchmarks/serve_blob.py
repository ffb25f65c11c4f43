# -*- test-case-name: tests.test_rig -*-
"""
Benchmark: serving one large blob, a spegel node against docker-registry, on loopback.

Run with C{.venv/bin/python benchmarks/serve_blob.py [--size-mib 512] [--runs 5]}.  It builds an
image with one layer of random (incompressible) bytes, pushes it to a docker-registry (the CNCF
distribution registry, our reference bar), fetches it into a containerd, and starts a spegel node
on that containerd with C{--containerd-content-path} pointing at its content store, so the node
serves the blob from disk with C{os.sendfile}.  Both servers then serve the same blob from a file
on the same disk, with the page cache warm.

The same client fetches C{GET /v2/<repo>/blobs/<digest>?ns=<registry>} from the node and
C{GET /v2/<repo>/blobs/<digest>} from the registry: a raw socket reading into one preallocated
buffer with C{recv_into} and throwing the bytes away (or C{curl -o /dev/null} with
C{--client curl}).  Each server is fetched once with the body hashed (correctness, untimed) and
once as a warm-up, then the timed runs alternate node, registry, node, registry...: the machine
is shared and noisy, so interleaving and medians are what make the ratio meaningful.

It prints every run, the median throughput of each server, the ratio node/registry of the
medians with a verdict against the target (>= 1.0), the CPU time each server spent in the timed
runs, and the node's memory (VmHWM/VmRSS) to show the blob never passed through it.  It exits
non-zero with a one-line reason when something fails, and the rig kills every process it started.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence

from attrs import frozen

from spegel_testing.cluster import Cluster
from spegel_testing.containerd import ContainerdDaemon
from spegel_testing.images import Blob, build_image
from spegel_testing.process import CommandFailed, ProcessFailed, failure_line

MiB = 1 << 20
GiB = 1 << 30
TARGET_RATIO = 1.0
REPO = "bench/blob"
# The client must cost as little as it can, and the same for both servers: large reads into one
# buffer, nothing kept.
RECV_BUFFER_SIZE = 4 * MiB
MAX_HEADER_BYTES = 64 * 1024
# Allocated (and zeroed, so its pages are touched) once at import: no run pays for page faults
# another did not.
_RECV_BUFFER = bytearray(RECV_BUFFER_SIZE)


class BenchmarkFailed(Exception):
    """
    Something went wrong; the message is the one-line reason printed before exiting non-zero.
    """


@frozen
class Fetch:
    """
    One complete blob download.

    @ivar seconds: from before connecting to the last body byte.
    @ivar digest: C{sha256:<hex>} of the body, when it was hashed.
    """

    size: int
    seconds: float
    digest: str | None = None

    @property
    def mib_per_second(self) -> float:
        return self.size / MiB / self.seconds


@frozen
class Server:
    """
    A server under test: a name for the report, where to fetch the blob, and its process.
    """

    name: str
    port: int
    path: str
    pid: int


Client = Callable[[Server, int, float], Fetch]


def _read_response_head(sock: socket.socket, buffer: bytearray) -> tuple[int, int, int]:
    """
    Read the status line and headers into C{buffer}.

    @return: the status, the Content-Length, and how many body bytes were read with the head
        (they sit right after the head in C{buffer}, moved to its start).
    @raise BenchmarkFailed: on a malformed or unexpected response head.
    """
    view = memoryview(buffer)
    received = 0
    while True:
        n = sock.recv_into(view[received:MAX_HEADER_BYTES])
        if n == 0:
            raise BenchmarkFailed("the server closed the connection before the end of the headers")
        received += n
        end = buffer.find(b"\r\n\r\n", 0, received)
        if end >= 0:
            break
        if received >= MAX_HEADER_BYTES:
            raise BenchmarkFailed("the response headers are larger than 64 KiB")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise BenchmarkFailed(f"malformed status line {lines[0]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "identity").lower() != "identity":
        raise BenchmarkFailed(f"the server sent a {headers['transfer-encoding']} body, not a plain one")
    length_text = headers.get("content-length", "")
    if not length_text.isdigit():
        raise BenchmarkFailed(f"response {status} has no usable Content-Length ({length_text!r})")
    body_start = end + 4
    already = received - body_start
    buffer[:already] = buffer[body_start:received]
    return status, int(length_text), already


def fetch_with_socket(server: Server, expected_size: int, timeout: float, *, verify: bool = False) -> Fetch:
    """
    C{GET} the blob over a fresh connection and read the body into one reused buffer.

    @param verify: hash the body (slower: only for the correctness check, never timed runs).
    @raise BenchmarkFailed: on a status other than 200 or a body of the wrong length.
    """
    buffer = _RECV_BUFFER
    view = memoryview(buffer)
    hasher = hashlib.sha256() if verify else None
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {server.path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        status, length, received = _read_response_head(sock, buffer)
        if status != 200:
            raise BenchmarkFailed(f"{server.name} answered {status} to GET {server.path}")
        if length != expected_size:
            raise BenchmarkFailed(f"{server.name} announced {length} bytes, the blob has {expected_size}")
        if hasher is not None:
            hasher.update(view[:received])
        while received < length:
            n = sock.recv_into(view, min(RECV_BUFFER_SIZE, length - received))
            if n == 0:
                raise BenchmarkFailed(f"{server.name} closed the connection after {received} of {length} bytes")
            if hasher is not None:
                hasher.update(view[:n])
            received += n
    seconds = time.perf_counter() - started
    return Fetch(received, seconds, None if hasher is None else "sha256:" + hasher.hexdigest())


def socket_client(server: Server, expected_size: int, timeout: float) -> Fetch:
    return fetch_with_socket(server, expected_size, timeout)


def curl_client(server: Server, expected_size: int, timeout: float) -> Fetch:
    """
    C{curl -o /dev/null}: its own C{time_total} (connect to last byte) and C{size_download}.
    """
    url = f"http://127.0.0.1:{server.port}{server.path}"
    try:
        completed = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "--max-time", str(int(timeout)),
             "-w", "%{http_code} %{size_download} %{time_total}", url],
            capture_output=True, timeout=timeout + 5, text=True,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchmarkFailed(f"curl failed to fetch from {server.name}: {e}") from None
    fields = completed.stdout.split()
    if completed.returncode != 0 or len(fields) != 3:
        raise BenchmarkFailed(f"curl exited {completed.returncode} fetching from {server.name}: {completed.stdout!r}")
    status, size, seconds = int(fields[0]), int(float(fields[1])), float(fields[2])
    if status != 200:
        raise BenchmarkFailed(f"{server.name} answered {status} to GET {server.path}")
    if size != expected_size:
        raise BenchmarkFailed(f"{server.name} sent {size} bytes, the blob has {expected_size}")
    return Fetch(size, seconds)


CLIENTS: dict[str, Client] = {"socket": socket_client, "curl": curl_client}


def memory_kib(pid: int) -> dict[str, int]:
    """
    C{VmHWM} (peak resident set) and C{VmRSS} of process C{pid}, in KiB.
    """
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmHWM", "VmRSS"):
                    values[name] = int(rest.split()[0])
    except OSError as e:
        raise BenchmarkFailed(f"cannot read the memory of process {pid}: {e}") from None
    return values


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """
    User plus system CPU time process C{pid} has used so far, or only its thread C{thread}.
    """
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path) as f:
            stat = f.read()
    except OSError as e:
        raise BenchmarkFailed(f"cannot read the CPU time of process {pid}: {e}") from None
    # The command name may contain spaces: fields are counted from the closing parenthesis.
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@frozen
class IOCounters:
    """
    A process's I/O accounting (C{/proc/<pid>/io}).

    Linux counts C{os.sendfile} in both C{rchar} and C{wchar} (and one call in both C{syscr} and
    C{syscw}), C{pread} in C{rchar}/C{syscr} only, and socket C{send}/C{recv} in neither.  So for
    the node, over the timed runs, C{wchar} is what went out by sendfile and C{rchar - wchar} what
    was read into Python to be written the ordinary way (give or take a few log lines).
    """

    rchar: int
    wchar: int
    syscr: int
    syscw: int

    @classmethod
    def of(cls, pid: int) -> "IOCounters":
        values = {}
        try:
            with open(f"/proc/{pid}/io") as f:
                for line in f:
                    name, _, value = line.partition(":")
                    values[name] = int(value)
        except (OSError, ValueError) as e:
            raise BenchmarkFailed(f"cannot read the I/O counters of process {pid}: {e}") from None
        return cls(values["rchar"], values["wchar"], values["syscr"], values["syscw"])

    def __sub__(self, other: "IOCounters") -> "IOCounters":
        return IOCounters(
            self.rchar - other.rchar, self.wchar - other.wchar, self.syscr - other.syscr, self.syscw - other.syscw
        )


def _say(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


def _fetch_into_containerd(daemon: ContainerdDaemon, ref: str) -> None:
    # A fetch puts every blob of the image in the content store, as a pull does, without
    # unpacking the layer into a snapshot: that would only write another copy to disk, and its
    # write-back could still be going on during the timed runs.
    daemon.ctr("content", "fetch", "--plain-http", "--hosts-dir", daemon.hosts_dir, ref, timeout=300)


def run_benchmark(size_mib: int, runs: int, client_name: str, timeout: float) -> bool:
    """
    Set everything up, measure, print the report.

    @return: whether the node met the target ratio.
    @raise BenchmarkFailed: when something does not work.
    """
    started = time.monotonic()
    client = CLIENTS[client_name]
    with tempfile.TemporaryDirectory(prefix="spegel-bench-") as scratch:
        _say(f"building an image with one {size_mib} MiB layer of random bytes", started)
        image = build_image(seed="serve-blob", layer_sizes=[size_mib * MiB], compress=False, directory=scratch)
        (layer,) = image.layers
        with Cluster(1, start_nodes=False, log_level="info") as cluster:
            registry, daemon, node = cluster.registry, cluster.containerds[0], cluster.nodes[0]
            _say(f"pushing it to docker-registry at {registry.url}", started)
            ref = registry.push_image(REPO, "v1", image)
            # Our copy is no longer needed; the registry and containerd hold theirs.
            shutil.rmtree(scratch, ignore_errors=True)
            _say(f"fetching {ref} into containerd ({daemon.socket})", started)
            _fetch_into_containerd(daemon, ref)
            algorithm, _, hexdigest = layer.digest.partition(":")
            on_disk = os.path.join(daemon.content_path, "blobs", algorithm, hexdigest)
            if not os.path.isfile(on_disk) or os.path.getsize(on_disk) != layer.size:
                raise BenchmarkFailed(f"containerd's content store has no complete {layer.digest} at {on_disk}")
            _say(f"starting the spegel node on {node.registry_url}", started)
            node.start()
            if node.pid is None or registry.pid is None:
                raise BenchmarkFailed("the rig does not know the pid of the node or the registry")
            ns = urllib.parse.quote(registry.host, safe="")
            servers = [
                Server("node", node.registry_port, f"/v2/{REPO}/blobs/{layer.digest}?ns={ns}", node.pid),
                Server("registry", registry.port, f"/v2/{REPO}/blobs/{layer.digest}", registry.pid),
            ]
            return _measure(servers, layer, runs, client, client_name, timeout, started)


def _measure(
    servers: Sequence[Server],
    layer: Blob,
    runs: int,
    client: Client,
    client_name: str,
    timeout: float,
    started: float,
) -> bool:
    """
    Verify, warm up, run the interleaved timed fetches and print the report.
    """
    # Everything written so far (the push, containerd's fetch) reaches the disk now, not in the
    # middle of a timed run.
    os.sync()
    for server in servers:
        checked = fetch_with_socket(server, layer.size, timeout, verify=True)
        if checked.digest != layer.digest:
            raise BenchmarkFailed(f"{server.name} served bytes hashing to {checked.digest}, not {layer.digest}")
        _say(f"{server.name}: served {layer.size} bytes with the right sha256 (checked, untimed)", started)
    for server in servers:
        client(server, layer.size, timeout)
    _say(f"warm-up done; {runs} timed runs each with the {client_name} client, interleaved", started)

    node = servers[0]
    memory_before = memory_kib(node.pid)
    io_before = IOCounters.of(node.pid)
    cpu_before = {s.name: cpu_seconds(s.pid) for s in servers}
    results: dict[str, list[Fetch]] = {s.name: [] for s in servers}
    for run in range(1, runs + 1):
        for server in servers:
            fetch = client(server, layer.size, timeout)
            results[server.name].append(fetch)
            print(
                f"  run {run}  {server.name:<8}  {fetch.mib_per_second:8.1f} MiB/s  ({fetch.seconds:.3f} s)",
                flush=True,
            )
    cpu_used = {s.name: cpu_seconds(s.pid) - cpu_before[s.name] for s in servers}
    memory_after = memory_kib(node.pid)
    node_io = IOCounters.of(node.pid) - io_before

    medians = {name: statistics.median(f.mib_per_second for f in fetches) for name, fetches in results.items()}
    ratio = medians["node"] / medians["registry"]
    served_gib = runs * layer.size / GiB
    print()
    print(f"blob           {layer.digest} ({layer.size / MiB:.1f} MiB, random bytes)")
    print(f"client         {client_name}; {runs} runs per server, interleaved, after one warm-up each")
    for server in servers:
        fetches = results[server.name]
        speeds = sorted(f.mib_per_second for f in fetches)
        print(
            f"{server.name:<14} median {medians[server.name]:8.1f} MiB/s  (min {speeds[0]:.1f}, max {speeds[-1]:.1f}); "
            f"CPU {cpu_used[server.name] / served_gib:.2f} s per GiB served"
        )
    print(
        f"node memory    VmHWM {memory_after['VmHWM'] / 1024:.1f} MiB, VmRSS {memory_after['VmRSS'] / 1024:.1f} MiB "
        f"after the runs (VmRSS {memory_before['VmRSS'] / 1024:.1f} MiB before; the blob is {layer.size / MiB:.0f} MiB)"
    )
    by_sendfile = min(node_io.wchar, node_io.rchar)
    through_python = node_io.rchar - by_sendfile
    print(
        f"node I/O       {by_sendfile / MiB:.0f} MiB by sendfile in {node_io.syscw} calls "
        f"({100 * by_sendfile / max(node_io.rchar, 1):.1f}% of the bytes read), {through_python / MiB:.0f} MiB read into "
        f"Python in {max(node_io.syscr - node_io.syscw, 0)} preads (from /proc/<pid>/io over the timed runs)"
    )
    met = ratio >= TARGET_RATIO
    verdict = "target met" if met else "BELOW target"
    print(f"ratio          node/registry = {ratio:.2f} (target >= {TARGET_RATIO:.1f}): {verdict}")
    return met


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/serve_blob.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    parser.add_argument("--size-mib", type=int, default=512, help="layer payload in MiB (default 512)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per server (default 5)")
    parser.add_argument(
        "--client", choices=sorted(CLIENTS), default="socket",
        help="what fetches the blob: a raw socket with recv_into (default) or curl -o /dev/null",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for one fetch (default 120)")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.runs < 1 or args.timeout <= 0:
        parser.error("--size-mib and --runs must be at least 1, --timeout positive")
    return guarded(lambda: run_benchmark(args.size_mib, args.runs, args.client, args.timeout))


def guarded(benchmark: Callable[[], object]) -> int:
    """
    Run C{benchmark}, turning every expected failure into one line on stderr.

    @return: the process exit status: 0, 1 on failure, 130 on Ctrl-C.
    """
    try:
        benchmark()
    except (BenchmarkFailed, OSError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    except (CommandFailed, ProcessFailed) as e:
        print(f"benchmark failed: {failure_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

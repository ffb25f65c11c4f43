# -*- test-case-name: tests.test_e2e_node -*-
"""
The README demo: one image pulled by a second node through the first, with upstream gone.

Run with C{python -m spegel.testing.demo}.  On 127.0.0.1 it starts an upstream registry, two
containerd daemons and two spegel nodes (each node serving its own containerd), pushes an image
of a few random layers upstream, pulls it on node 1 straight from upstream, points node 2's
containerd at node 1 with C{spegel configuration}, stops upstream, and pulls on node 2 by tag.
It prints what happened, what node 1 served (from its metrics) and whether the digests match;
exits 0 on success, non-zero with a one-line reason otherwise, and always cleans up.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

from spegel.testing.cluster import Cluster
from spegel.testing.images import TestImage, build_image
from spegel.testing.process import CommandFailed, ProcessFailed

MiB = 1 << 20


class DemoFailed(Exception):
    """
    A check of the demo failed; the message is the one-line reason.
    """


def _say(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.2f}s] {message}", flush=True)


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def run_demo(layers: int, total_mib: float, seed: str, keep: bool, node_args: Sequence[str] = ()) -> None:
    """
    Run the demo, printing progress.

    @param node_args: extra arguments for both nodes.

    @raise DemoFailed: when a pull does not end with the expected content.
    """
    started = time.monotonic()
    layer_size = int(total_mib * MiB / layers)
    with tempfile.TemporaryDirectory(prefix="spegel-demo-") as scratch:
        _say(f"building a {layers}-layer image of {_mib(layer_size * layers)} of random bytes (seed {seed!r})", started)
        image = build_image(seed=seed, layer_sizes=[layer_size] * layers, directory=scratch)
        _say("starting an upstream registry, 2 containerd daemons and 2 spegel nodes on 127.0.0.1", started)
        cluster = Cluster(2, keep_dir=keep, node_args=list(node_args))
        try:
            with cluster:
                _run_in(cluster, image, started)
        except BaseException:
            if keep:
                print(cluster.dump_logs(20), file=sys.stderr)
            raise
        finally:
            if keep:
                _say(f"logs and data kept in {cluster.base_dir}", started)


def _run_in(cluster: Cluster, image: TestImage, started: float) -> None:
    registry = cluster.registry
    node1, node2 = cluster.nodes
    _say(
        f"up: registry {registry.url}, node 1 {node1.registry_url} (containerd {cluster.containerds[0].socket}), "
        f"node 2 {node2.registry_url} (containerd {cluster.containerds[1].socket})",
        started,
    )
    ref = registry.push_image("demo/app", "v1", image)
    _say(f"pushed {ref} ({image.digest}, {_mib(image.total_size())} in {len(image.blobs())} blobs)", started)

    seconds = cluster.pull(0, ref)
    _say(f"node 1 pulled {ref} straight from upstream in {seconds:.2f}s", started)

    cluster.configure_mirrors(1, [0])
    _say(f"spegel configuration: node 2's containerd now tries {node1.registry_url} before upstream", started)

    registry.stop()
    _say("upstream registry stopped", started)

    before = node1.metrics()
    seconds = cluster.pull(1, ref)
    _say(f"node 2 pulled {ref} by tag through node 1 in {seconds:.2f}s", started)

    digests = [daemon.image_digest(ref) for daemon in cluster.containerds]
    if digests != [image.digest, image.digest]:
        raise DemoFailed(f"image digests differ: pushed {image.digest}, node 1 {digests[0]}, node 2 {digests[1]}")
    missing = image.digests() - cluster.containerds[1].content_digests()
    if missing:
        raise DemoFailed(f"node 2 lacks {len(missing)} blobs of the image, e.g. {sorted(missing)[0]}")

    after = node1.metrics()
    served = {
        source: after.total("spegel_served_bytes_total", source=source)
        - before.total("spegel_served_bytes_total", source=source)
        for source in ("local", "peer")
    }
    hits = after.total("spegel_mirror_requests_total", cache="hit") - before.total(
        "spegel_mirror_requests_total", cache="hit"
    )
    misses = after.total("spegel_mirror_requests_total", cache="miss") - before.total(
        "spegel_mirror_requests_total", cache="miss"
    )
    print()
    print(f"image          {ref}")
    print(f"digest         {image.digest} (upstream = node 1 = node 2: yes)")
    print(f"image size     {_mib(image.total_size())} in {len(image.blobs())} blobs")
    print(f"node 2 pull    {seconds:.2f}s through node 1, upstream stopped")
    print(
        f"node 1 served  {_mib(served['local'])} from its own containerd, {_mib(served['peer'])} from peers "
        f"({int(served['local'] + served['peer'])} bytes; requests: {int(hits)} hits, {int(misses)} misses)"
    )
    layer_bytes = sum(b.size for b in image.layers)
    if served["local"] + served["peer"] < layer_bytes:
        raise DemoFailed(
            f"node 1's metrics show {int(served['local'] + served['peer'])} bytes served, "
            f"less than the {layer_bytes} bytes of layers node 2 pulled"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spegel.testing.demo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument("--size-mib", type=float, default=20.0, help="total layer payload in MiB (default 20)")
    parser.add_argument("--seed", default="demo", help="seed of the random image bytes")
    parser.add_argument("--keep", action="store_true", help="keep logs and data, print log tails on failure")
    parser.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for both spegel nodes, repeatable (e.g. --node-arg=--mirror-resolve-retries=1)",
    )
    args = parser.parse_args(argv)
    if args.layers < 1 or args.size_mib <= 0:
        parser.error("--layers must be at least 1 and --size-mib positive")
    # A plain kill must clean up too: turn SIGTERM into an exception that unwinds the cluster.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run_demo(args.layers, args.size_mib, args.seed, args.keep, args.node_arg)
    except DemoFailed as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except CommandFailed as e:
        print(f"demo failed: {' '.join(e.command[:3])} ... exited {e.returncode}: {_last_line(e.stderr)}", file=sys.stderr)
        return 1
    except ProcessFailed as e:
        print(f"demo failed: {_first_line(str(e))} (last log line: {_last_line(str(e))})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    print("demo ok")
    return 0


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no output)"


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "(no output)"


if __name__ == "__main__":
    sys.exit(main())

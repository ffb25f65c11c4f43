# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
Real-component test rig: docker-registry, containerd daemons and spegel nodes on loopback.

Plain synchronous Python (subprocess and polling, no reactor), for trial tests, benchmarks and
scripts alike::

    from spegel_testing.cluster import Cluster
    from spegel_testing.images import build_image

    with Cluster(2) as cluster:                       # registry + 2 x (containerd, spegel node)
        ref = cluster.registry.push_image("app", "v1", build_image(seed=1))
        cluster.pull(0, ref)                          # node 0's containerd, straight upstream
        cluster.configure_mirrors(1, [0])             # spegel configuration: 1 mirrors through 0
        cluster.registry.stop()
        cluster.pull(1, ref)                          # served by node 0
        cluster.nodes[0].metrics().total("spegel_served_bytes_total", source="local")

    with Cluster(3, node_args=static_bootstrap, wait_ready=True) as cluster:   # a real cluster
        cluster.mirror_through_own_nodes()            # each containerd tries its own node first
        ref = cluster.registry.push_image("app", "v1", image)
        cluster.pull(0, ref)                          # a miss: containerd falls back upstream
        cluster.wait_findable([1, 2], "app", image, tag="v1")   # advertised in the DHT
        cluster.registry.stop()
        before = cluster.served()                     # every node's bytes served, local / peer
        pull = cluster.containerds[1].start_pull(ref) # in the background: pause(), resume(), wait()
        ...
        cluster.containerds[1].damaged_content()      # blobs whose bytes do not match their name

Modules: L{ports} (free loopback ports), L{process} (process groups, log files, clean-up),
L{containerd} (L{ContainerdDaemon}), L{registry} (L{UpstreamRegistry}), L{images} (test images),
L{node} (L{SpegelNode}), L{cluster} (L{Cluster}), L{shared} (module-wide fixtures for trial),
L{httputil} (raw HTTP requests), L{fakenode} (a stand-in node), L{demo} (the README demo),
L{tools} (containerd 2.x, crictl and helm built from the Go module proxy), L{image} (spegel's
image, built offline with buildah), L{netns} (hosts of their own: network namespaces on a
bridge), L{dns} (a real DNS server for DNS bootstrap), L{pods} (pods started from a Kubernetes
pod spec through the CRI, as the kubelet does), L{browser} (headless Chromium for the debug
pages).
"""

# Released with the node it tests, at the same version (tests.unit.test_packaging checks it); a
# literal, so building this distribution does not import spegel.
__version__ = "0.1.0"

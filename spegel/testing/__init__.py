"""Real-component test rig: docker-registry, containerd daemons and spegel nodes on loopback."""

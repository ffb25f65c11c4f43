"""
The bridge to containerd: its gRPC API, called on a dedicated thread pool.

  - L{spegel.containerd.client}: L{ContainerdClient} (images, content, version) and
    L{content_path_for} (a blob's file in the content store).
  - L{spegel.containerd.events}: L{EventSubscriber}, image and content events across restarts.
  - L{spegel.containerd.settings}: its configuration file and the settings it runs with, for
    the preflight.
  - L{spegel.containerd.api}: generated stubs for our .proto subset of containerd's API, in
    C{proto/}; regenerate with C{python -m spegel_testing.protos}.
"""

"""The bridge to containerd: its gRPC API, called on a dedicated thread pool."""

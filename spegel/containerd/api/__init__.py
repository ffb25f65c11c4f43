"""Generated gRPC/protobuf stubs for the subset of containerd's API spegel uses. Do not edit."""

"""
Spegel: a stateless, cluster-local, peer-to-peer OCI registry mirror for Kubernetes.
"""

__version__ = "0.1.0"

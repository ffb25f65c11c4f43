from twisted.application.service import ServiceMaker

spegel = ServiceMaker(
    "spegel", "spegel.tap", "Cluster-local peer-to-peer OCI registry mirror.", "spegel"
)

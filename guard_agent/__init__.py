"""inference-guard sidecar: scores inference requests and enforces a policy in front of a model server."""

__version__ = "0.1.0"

"""The Kubernetes backend: each kernel a hardened pod, reached over CurveZMQ.

See docs/kubernetes.md.
"""

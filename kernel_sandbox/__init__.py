"""kernel-sandbox: every Jupyter kernel in an ephemeral, network-less container."""

__version__ = "0.1.0"

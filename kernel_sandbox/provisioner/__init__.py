"""The ``docker-sandbox`` kernel provisioner (a ``jupyter_client.kernel_provisioners`` entry)."""

from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

__all__ = ["DockerSandboxProvisioner"]

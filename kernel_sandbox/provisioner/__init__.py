"""The ``docker-sandbox`` kernel provisioner (entry point ``jupyter_client.kernel_provisioners``)."""

from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

__all__ = ["DockerSandboxProvisioner"]

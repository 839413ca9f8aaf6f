"""The one Jupyter-config loader of every kernel-sandbox command.

``kernel-sandbox run``, ``policy show|profiles``, ``doctor``, ``install`` and ``wrap`` all read
the config files a Jupyter Server reads, so that they work out the same policy for the same
kernelspec, and the one a kernel under Jupyter Server gets:

- ``jupyter_config.{json,py}`` (read by every Jupyter application) and then
  ``jupyter_server_config.{json,py}`` (read by Jupyter Server, JupyterLab, JupyterHub's
  single-user servers), the second winning over the first;
- in every directory of ``jupyter --paths`` (``JUPYTER_CONFIG_DIR`` first), the first
  directory winning.

This is deliberately more than nbclient's ``jupyter execute`` reads (``jupyter_config`` only):
``kernel-sandbox run`` reads the server's files too, so an operator's profiles and ceilings in
``jupyter_server_config.py`` bind batch runs as they bind the server's kernels, and
``policy show`` has one answer for both.
"""

from __future__ import annotations

from jupyter_core.application import JupyterApp
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from kernel_sandbox.errors import PolicyError

__all__ = ["load_jupyter_config", "read_jupyter_config"]


class _ServerConfigReader(JupyterApp):  # type: ignore[misc]
    """Reads config files the way Jupyter Server does, without starting anything."""

    name = "kernel-sandbox"
    description = "reads Jupyter config for kernel-sandbox"

    @property
    def config_file_name(self) -> str:  # type: ignore[override]
        return "jupyter_server_config"


def read_jupyter_config() -> tuple[Config, list[str]]:
    """The Jupyter Server config, merged, and the files read.

    Raises:
        Exception: whatever a broken config file raises (a ``.py`` file can raise anything).
    """
    # A broken file is an error, not a log line: skipping it could drop the operator's ceilings.
    reader = _ServerConfigReader(raise_config_file_errors=True)
    reader.load_config_file(suppress_errors=False)
    return Config(reader.config), list(reader.loaded_config_files)


def load_jupyter_config(extra_file: str | None = None) -> tuple[Config, list[str]]:
    """The Jupyter Server config (plus ``extra_file``, which wins) and the files read.

    Raises:
        PolicyError: a config file cannot be read (its path and the error in the message).
    """
    try:
        config, files = read_jupyter_config()
    except Exception as exc:  # a config file is Python: any error can come out of it
        raise PolicyError(f"cannot read the Jupyter config: {exc}") from exc
    if extra_file:
        try:
            config.merge(PyFileConfigLoader(extra_file).load_config())
        except Exception as exc:
            raise PolicyError(f"cannot read config file {extra_file}: {exc}") from exc
        files.append(extra_file)
    return config, files

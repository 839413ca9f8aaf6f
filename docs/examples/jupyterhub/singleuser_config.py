"""The students' and instructors' Jupyter Server config:
/etc/jupyterhub/singleuser/jupyter_server_config.py (root-owned; jupyterhub_config.py points
JUPYTER_CONFIG_DIR at its folder). Walk-through: docs/jupyterhub.md.
"""

c = get_config()  # noqa: F821 (Jupyter provides it)

# Lockdown: only sandboxed kernels start, whatever name a client sends (python3 included),
# and the server refuses to start if it cannot hold that.
c.ServerApp.jpserver_extensions = {
    "kernel_sandbox.lockdown": True,
    # language servers would run on the host, as the student, outside any sandbox
    "jupyter_lsp": False,
}
c.SandboxLockdown.map_to = "course-101"
c.SandboxLockdown.on_unsandboxed = "map"
# Terminals: each a shell in a container of its own under course-101's policy, started by
# the sandbox service (this server has no engine access); "off" for none.
c.SandboxLockdown.terminals = "sandboxed"

# JupyterLab fetches nothing from the internet (news, update checks, extension listings)
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"

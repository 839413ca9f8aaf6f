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
# Terminals: none until terminals through the sandbox service are in (a server without
# engine access cannot start a sandboxed one itself).
c.SandboxLockdown.terminals = "off"

# JupyterLab fetches nothing from the internet (news, update checks, extension listings)
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"

"""A class on one machine: JupyterHub with local Unix accounts, every student's code in a
sandbox started by the sandbox service. Copy to /etc/jupyterhub/jupyterhub_config.py and run
`jupyterhub -f /etc/jupyterhub/jupyterhub_config.py` as root from /srv/jupyterhub.
Walk-through: docs/jupyterhub.md. Tested as is by tests/test_hub*.py (tests/support/hub.py).
"""

import pwd

c = get_config()  # noqa: F821 (JupyterHub provides it)

# Who may log in: the accounts of the two groups, with their own Unix passwords (PAM).
# Instructors are the hub's admins (they may start, stop and open students' servers).
c.JupyterHub.authenticator_class = "pam"
c.PAMAuthenticator.allowed_groups = {"students", "instructors"}
c.PAMAuthenticator.admin_groups = {"instructors"}

# Each user's server is a local process running as that user: no docker group, no engine
# access. Kernels and terminals come from the sandbox service
# (/run/kernel-sandbox/service.sock, found by the provisioner when it exists).
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "~"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120


def _home(spawner):
    return pwd.getpwnam(spawner.user.name).pw_dir


# What a student controls must not configure their server: Jupyter config is read from a
# root-owned folder instead of ~/.jupyter (a config file there is Python the server would
# run), and the user's site-packages (~/.local, .pth files) are off. JupyterLab keeps its
# settings and workspaces in the user's home.
c.Spawner.environment = {
    "JUPYTER_CONFIG_DIR": "/etc/jupyterhub/singleuser",
    "PYTHONNOUSERSITE": "1",
    "JUPYTERLAB_SETTINGS_DIR": lambda spawner: _home(spawner) + "/.jupyter/lab/user-settings",
    "JUPYTERLAB_WORKSPACES_DIR": lambda spawner: _home(spawner) + "/.jupyter/lab/workspaces",
}

# The hub's own files (database, cookie secret) stay with root.
c.JupyterHub.db_url = "sqlite:///jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "jupyterhub_cookie_secret"

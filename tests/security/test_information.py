"""Information probes: the host's environment, the Docker socket, the host's name, and what one
kernel can learn about another."""

from __future__ import annotations

import json
import os
import secrets
import socket


def test_host_environment_is_not_visible(sandbox, bait, observe):
    got = sandbox.probe(f"""
name, value = {bait.env_name!r}, {bait.env_value!r}
hits = []
for pid in sorted(p for p in _os.listdir('/proc') if p.isdigit()):
    try:
        environ = open(f'/proc/{{pid}}/environ', 'rb').read()
    except OSError:
        continue
    if name.encode() in environ or value.encode() in environ:
        hits.append(pid)
report(names=sorted(_os.environ), in_environ=name in _os.environ,
       value_seen=any(value in v for v in _os.environ.values()), hits=hits)
""")
    found = "in os.environ" if got["in_environ"] or got["value_seen"] else "not in os.environ"
    observe(
        "info-env",
        f"secret {found}, in {len(got['hits'])} /proc/*/environ; the "
        f"kernel's variables: {', '.join(got['names'])}",
    )
    assert not got["in_environ"] and not got["value_seen"] and got["hits"] == []
    assert not {"USER", "PWD", "JUPYTER_PATH", "DOCKER_HOST", "SSH_AUTH_SOCK"} & set(got["names"])


def test_no_docker_socket(sandbox, observe):
    got = sandbox.probe(
        """
import socket, stat
tops = {'/run', '/var', '/tmp', '/home', '/dev', '/etc', '/srv', '/mnt', '/media', '/root',
        _os.getcwd()}
tops |= {line.split()[1] for line in open('/proc/self/mounts')
         if not line.split()[1].startswith(('/proc', '/sys')) and line.split()[1] != '/'}
sockets = set()
for top in sorted(tops):
    for folder, dirs, files in _os.walk(top):
        for name in dirs + files:
            try:
                if stat.S_ISSOCK(_os.lstat(_os.path.join(folder, name)).st_mode):
                    sockets.add(_os.path.join(folder, name))
            except OSError:
                pass
def connect(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    finally:
        s.close()
report(sockets=sorted(sockets), docker_host=_os.environ.get('DOCKER_HOST'),
       var_run=attempt(connect, '/var/run/docker.sock'), run=attempt(connect, '/run/docker.sock'))
""",
        timeout=120,
    )
    observe(
        "info-docker-socket",
        f"connect /var/run/docker.sock: {got['var_run']}, "
        f"/run/docker.sock: {got['run']}; sockets found: "
        f"{', '.join(got['sockets']) or 'none'}",
    )
    assert got["var_run"] == "ENOENT" and got["run"] == "ENOENT"
    assert got["docker_host"] is None
    assert not [s for s in got["sockets"] if "docker" in s]
    assert all(
        s.startswith(("/run/kernel-sandbox/", "/run/kernel-sandbox-host/")) for s in got["sockets"]
    ), got["sockets"]


def test_hostname_is_not_the_hosts(sandbox, observe):
    got = sandbox.probe("""
import socket
report(gethostname=socket.gethostname(), nodename=_os.uname().nodename,
       etc_hostname=open('/etc/hostname').read().strip(),
       proc=open('/proc/sys/kernel/hostname').read().strip())
""")
    host = socket.gethostname()
    observe(
        "info-hostname",
        ", ".join(f"{k}: {v}" for k, v in got.items())
        + f" (host: {'differs' if host not in got.values() else 'SAME'})",
    )
    assert set(got.values()) == {"sandbox"}
    assert host != "sandbox"


def test_another_kernel_sees_nothing_of_this_one(sandbox, dedicated_kernel, observe):
    marker = f"ks-a-{secrets.token_hex(8)}"
    kernel_a = sandbox
    a_key = kernel_a.km.session.key.decode()
    a_shared = str(kernel_a.km.provisioner.runtime_dir.shared)
    a_side = kernel_a.probe(f"""
open('/tmp/{marker}', 'w').write({marker!r})
files = {{}}
for name in _os.listdir('/run/kernel-sandbox'):
    path = _os.path.join('/run/kernel-sandbox', name)
    if _os.path.isfile(path) and not _os.path.islink(path):
        files[name] = open(path).read()[:4096]
report(files=files, sockets=sorted(n for n in _os.listdir('/run/kernel-sandbox')
                                    if n not in files))
""")
    # what would identify A: its marker file, its HMAC key, its runtime directory (whose k-1 is
    # A's shell socket), any token or other file it holds
    a_secrets = [marker, a_key, a_shared]
    for name, text in a_side["files"].items():
        if name == "connection.json":
            a_secrets.append(json.loads(text)["key"])
        elif len(text.strip()) >= 16:
            a_secrets.append(text.strip())
    try:
        with dedicated_kernel() as kernel_b:
            b_key = kernel_b.km.session.key.decode()
            b_host_listing = sorted(os.listdir(kernel_b.km.provisioner.runtime_dir.shared))
            # hex-encoded, so that B's own history of this cell does not contain them
            hidden = [s.encode().hex() for s in a_secrets]
            got = kernel_b.probe(f"""
import socket
needles = [bytes.fromhex(h).decode() for h in {hidden!r}]
found = []
for top in ('/run/kernel-sandbox', '/tmp', '/home/sandbox', '/dev/shm', _os.getcwd()):
    for folder, dirs, files in _os.walk(top):
        for name in files:
            path = _os.path.join(folder, name)
            try:
                text = open(path, errors='replace').read(1 << 20)
            except OSError:
                continue
            found += [path for needle in needles if needle in text]
def connect(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    finally:
        s.close()
report(a_tmp=attempt(lambda: open('/tmp/' + needles[0]).read()),
       a_socket=attempt(connect, needles[2] + '/k-1'),
       a_dir=attempt(_os.listdir, needles[2]),
       listing=sorted(_os.listdir('/run/kernel-sandbox')),
       own_key=_json.load(open('/run/kernel-sandbox-host/connection.json'))['key'],
       found=found, processes=sum(1 for p in _os.listdir('/proc') if p.isdigit()))
""")
    finally:
        kernel_a.probe(f"_os.unlink('/tmp/{marker}'); report(ok=1)")
    observe(
        "info-other-kernel",
        f"A's /tmp file: {got['a_tmp']}; A's socket (host path): "
        f"{got['a_socket']}; A's runtime dir: {got['a_dir']}; A's key/marker found in "
        f"{len(got['found'])} files; B's /run/kernel-sandbox = {got['listing']} (B's own, "
        f"same key as B's); B sees {got['processes']} processes",
    )
    assert a_side["sockets"], "kernel A has no sockets to find"
    assert got["a_tmp"] == "ENOENT" and got["a_socket"] == "ENOENT" and got["a_dir"] == "ENOENT"
    assert got["found"] == []
    assert got["listing"] == b_host_listing
    assert got["own_key"] == b_key != a_key
    assert got["processes"] <= 5

"""File system probes: the root file system, host paths, the workspace, /proc, /sys, devices,
mounts and the /tmp cap."""

from __future__ import annotations

import os
from pathlib import Path

MIB = 1024**2


def test_root_filesystem_is_read_only(sandbox, observe):
    got = sandbox.probe("""
report(usr=attempt(lambda: open('/usr/ks-probe', 'w').close()),
       passwd=attempt(lambda: open('/etc/passwd', 'a').close()),
       var_tmp=attempt(lambda: open('/var/tmp/ks-probe', 'w').close()),
       run_lock=attempt(_os.mkdir, '/run/lock/ks-probe'),
       var_tmp_mode=oct(_os.stat('/var/tmp').st_mode & 0o7777))
""")
    observe(
        "fs-rootfs-write",
        f"/usr: {got['usr']}; /etc/passwd: {got['passwd']}; /var/tmp "
        f"({got['var_tmp_mode']}): {got['var_tmp']}; /run/lock: {got['run_lock']}",
    )
    # /var/tmp and /run/lock are world-writable in the image: only a read-only mount stops them
    assert got["var_tmp_mode"] == "0o1777"
    assert got["var_tmp"] == "EROFS" and got["run_lock"] == "EROFS"
    assert got["usr"] in ("EROFS", "EACCES") and got["passwd"] in ("EROFS", "EACCES")


def test_host_paths_that_are_not_mounted_do_not_exist(sandbox, bait, observe):
    got = sandbox.probe(f"""
paths = {[str(bait.outside), str(bait.in_root_home), str(bait.root)]!r}
report(**{{p: attempt(lambda p=p: open(p).read()) for p in paths[:2]}},
       root_listing=sorted(_os.listdir(paths[2])) if _os.path.isdir(paths[2]) else 'ENOENT')
""")
    outside, home = got[str(bait.outside)], got[str(bait.in_root_home)]
    where = bait.root.parent  # names without the random part keep the table stable
    observe(
        "fs-host-paths",
        f"{where}/ks-sec-*/secret.txt: {outside}; "
        f"{bait.in_root_home.parent}/ks-sec-*.txt: {home}; listing {where}/ks-sec-*: "
        f"{got['root_listing']}",
    )
    assert outside == "ENOENT"
    assert home in ("ENOENT", "EACCES")  # the image's own /root is 0700 root
    # the workspace's parent is at most the bare mount point Docker made for the workspace
    assert got["root_listing"] in ("ENOENT", [bait.workspace.name])


def test_workspace_cannot_be_left_through_links_or_dotdot(sandbox, bait, observe):
    ws = str(bait.workspace)
    got = sandbox.probe(f"""
ws = {ws!r}
def read(path):
    return attempt(lambda: open(path).read())
parent = _os.path.join(ws, '..')
report(cwd=_os.getcwd(), inside=read('inside.txt'),
       abs_link=read('abs-link'), rel_link=read('rel-link'), home_link=read('home-link'),
       dir_link=read('dir-link/secret.txt'), dotdot=read('../secret.txt'),
       dotdot_listing=sorted(_os.listdir(parent)),
       openat=attempt(lambda: _os.open('secret.txt', _os.O_RDONLY,
                                      dir_fd=_os.open(parent, _os.O_RDONLY))))
""")
    names = ("abs_link", "rel_link", "home_link", "dir_link", "dotdot", "openat")
    links = {k: got[k] for k in names}
    observe(
        "fs-workspace-escape",
        "; ".join(f"{k}: {v}" for k, v in links.items()) + f"; ws/.. lists {got['dotdot_listing']}",
    )
    assert got["cwd"] == ws  # the kernel started in the workspace, mounted at its host path
    assert got["inside"] == "ok"  # control: the workspace itself is readable
    # the image's own /root is 0700 root, so the link into /root stops even before the lookup
    assert links.pop("home_link") in ("ENOENT", "EACCES")
    assert all(v == "ENOENT" for v in links.values()), links
    assert "secret.txt" not in got["dotdot_listing"]


def test_workspace_is_read_only(sandbox, observe):
    got = sandbox.probe("""
report(create=attempt(lambda: open('ks-new.txt', 'w').close()),
       append=attempt(lambda: open('inside.txt', 'a').close()),
       unlink=attempt(_os.unlink, 'inside.txt'))
""")
    observe(
        "fs-workspace-write",
        f"create: {got['create']}; append: {got['append']}; unlink: {got['unlink']}",
    )
    assert got == {"create": "EROFS", "append": "EROFS", "unlink": "EROFS"}


def test_proc_sys_cannot_be_written(sandbox, observe):
    got = sandbox.probe("""
paths = ['/proc/sys/kernel/hostname', '/proc/sys/kernel/core_pattern', '/proc/sys/vm/drop_caches',
         '/proc/sysrq-trigger']
report(**{p: attempt(lambda p=p: open(p, 'w').write('1')) for p in paths})
""")
    observe("fs-proc-sys", "; ".join(f"{k.split('/')[-1]}: {v}" for k, v in got.items()))
    assert all(v in ("EROFS", "EACCES", "ENOENT", "EPERM") for v in got.values()), got
    assert got["/proc/sys/kernel/core_pattern"] != "ENOENT"  # a real attempt, not a missing file


def test_sys_cannot_be_written(sandbox, observe):
    got = sandbox.probe("""
paths = ['/sys/kernel/uevent_helper', '/sys/class/net/lo/mtu', '/sys/devices/system/cpu/online',
         '/sys/fs/cgroup/pids/pids.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes',
         '/sys/fs/cgroup/pids.max']
out = {p: attempt(lambda p=p: open(p, 'w').write('1')) for p in paths if _os.path.exists(p)}
# a new cgroup (gVisor's /sys/fs/cgroup is empty: try its root)
group = '/sys/fs/cgroup/pids' if _os.path.isdir('/sys/fs/cgroup/pids') else '/sys/fs/cgroup'
out['mkdir ' + group + '/ks-probe'] = attempt(_os.mkdir, group + '/ks-probe')
report(**out)
""")
    observe("fs-sys", "; ".join(f"{k.replace('/sys/', '')}: {v}" for k, v in got.items()))
    assert len(got) >= 2, "no /sys file to try"
    assert all(v in ("EROFS", "EACCES", "EPERM") for v in got.values()), got


def test_mknod_reaches_no_device(sandbox, observe):
    host_root = os.stat("/").st_dev
    got = sandbox.probe(f"""
import stat
nodes = {{'mem': (stat.S_IFCHR, 1, 1), 'kmsg': (stat.S_IFCHR, 1, 11),
         'host-root-disk': (stat.S_IFBLK, {os.major(host_root)}, {os.minor(host_root)})}}
out = {{}}
for name, (kind, major, minor) in nodes.items():
    path = '/tmp/ks-node-' + name
    made = sys_call('mknod', path.encode(), kind | 0o600, _os.makedev(major, minor))
    if made == 'ok':
        out[name] = 'created, open ' + attempt(lambda: _os.close(_os.open(path, _os.O_RDONLY)))
        _os.unlink(path)
    else:
        out[name] = made
report(**out)
""")
    observe("fs-mknod", "; ".join(f"{k}: {v}" for k, v in got.items()))
    for name, result in got.items():
        assert result == "EPERM" or (
            sandbox.runtime == "runsc"
            and result.startswith("created, open ")
            and not result.endswith(" ok")
        ), (name, result)
    if sandbox.runtime == "runc":
        assert set(got.values()) == {"EPERM"}


def test_mount_is_refused(sandbox, observe):
    got = sandbox.probe("""
target = '/tmp/ks-mnt'
_os.makedirs(target, exist_ok=True)
MS_REMOUNT, MS_BIND = 32, 4096
report(tmpfs=sys_call('mount', b'none', target.encode(), b'tmpfs', 0, None),
       proc=sys_call('mount', b'proc', target.encode(), b'proc', 0, None),
       bind=sys_call('mount', b'/run/kernel-sandbox', target.encode(), None, MS_BIND, None),
       remount_root_rw=sys_call('mount', None, b'/', None, MS_REMOUNT, None),
       umount_runtime_dir=sys_call('umount2', b'/run/kernel-sandbox', 0))
""")
    observe("fs-mount", "; ".join(f"{k}: {v}" for k, v in got.items()))
    assert set(got.values()) == {"EPERM"}, got


def test_filling_tmp_stops_at_its_cap(sandbox, docker_client, observe):
    def free() -> int:
        st = os.statvfs("/var/lib/docker" if os.path.isdir("/var/lib/docker") else "/")
        return st.f_bavail * st.f_frsize

    upper = docker_client.api.inspect_container(sandbox.container_id)["GraphDriver"]["Data"]
    before = free()
    got = sandbox.probe(
        """
chunk = b'\\xa5' * (1 << 20)
written, error = 0, None
with open('/tmp/ks-fill', 'wb', buffering=0) as f:
    while written < 512 << 20:
        try:
            written += f.write(chunk)
        except OSError as exc:
            error = errname(exc.errno)
            break
st = _os.statvfs('/tmp')
report(written=written, error=error, cap=st.f_blocks * st.f_frsize)
""",
        timeout=120,
    )
    used = before - free()
    on_disk = upper.get("UpperDir") and Path(upper["UpperDir"], "tmp", "ks-fill").exists()
    sandbox.probe("_os.unlink('/tmp/ks-fill'); report(ok=1)")
    observe(
        "fs-tmp-fill",
        f"{got['error']} after {got['written'] / MIB:.0f} MiB (cap "
        f"{got['cap'] / MIB:.0f} MiB); host disk use meanwhile {used / MIB:+.0f} MiB",
    )
    assert got["error"] == "ENOSPC"
    assert got["cap"] == 256 * MIB
    assert 200 * MIB <= got["written"] <= 256 * MIB
    assert not on_disk
    assert used < 128 * MIB  # the 256 MiB went to memory (tmpfs), not to the host's disk


def _dataset_scene(base: Path) -> dict[str, Path]:
    """A dataset (proj/sales) two levels down ``base`` and a host folder with a secret."""
    dataset = base / "proj" / "sales"
    dataset.mkdir(parents=True)
    (dataset / "a.csv").write_text("original\n")
    host = base.parent / f"{base.name}-host"
    (host / "sales").mkdir(parents=True)
    (host / "sales" / "secret.txt").write_text("host secret\n")
    for path in (base, base / "proj", dataset, host, host / "sales"):
        path.chmod(0o777)  # the kernel's uid may write: only the policy and broker stop it
    return {"base": base, "dataset": dataset, "host": host}


_SWAP_FROM_INSIDE = """
from kernel_sandbox import data
_os.rename('proj', 'proj-moved')
_os.symlink({host!r}, 'proj')
def w():
    with data.open('s/planted.txt', 'w') as f:
        f.write('from the kernel')
report(ls=data.ls('s'), read=attempt(lambda: data.open('s/secret.txt').read()), write=attempt(w))
"""

_USE_AFTER_SWAP = """
from kernel_sandbox import data
def w():
    with data.open('s/planted.txt', 'w') as f:
        f.write('from the kernel')
def name(fn):
    try:
        return repr(fn())
    except Exception as exc:
        return type(exc).__name__
report(ls=data.ls('s'), stat=name(lambda: data.info('s/secret.txt')['size']),
       read=name(lambda: data.open('s/secret.txt').read()), write=name(w),
       own=name(lambda: data.open('s/a.csv').read()))
"""


def test_dataset_root_swapped_for_a_link(configured_kernel, bait, runtime, docker_client, observe):
    from kernel_sandbox.broker import AuditLog
    from kernel_sandbox.errors import PolicyError
    from kernel_sandbox.inside.contract import label

    state = bait.root / f"state-{runtime}"
    # 1. the kernel does the swap itself: its dataset lies in its read-write workspace
    ws = _dataset_scene(bait.root / f"swap-ws-{runtime}")
    policy = {"workspace": "rw", "datasets": {"s": f"{ws['dataset']}:read-write"}}
    try:
        with configured_kernel("ks-swap-ws", policy, ws["base"], state) as kernel:
            got = kernel.probe(_SWAP_FROM_INSIDE.format(host=str(ws["host"])))
        inside = f"started; after the kernel's own swap: ls {got['ls']}, read {got['read']}"
    except PolicyError as exc:
        why = str(exc).split(": ", 1)[1].split(": it could")[0].replace(str(bait.root), "…")
        got, inside = None, f"start refused, no container: PolicyError {why!r}"
    leaked = sorted(p.name for p in (ws["host"] / "sales").iterdir())
    spec_label = f"{label('kernelspec')}=ks-swap-ws-{runtime}"
    containers = docker_client.containers.list(all=True, filters={"label": spec_label})
    # 2. the swap done on the host by another process after the grant (a dataset the policy
    # allows): root, then the root's parent
    host_side = []
    for which in ("root", "parent"):
        scene = _dataset_scene(bait.root / f"swap-{which}-{runtime}")
        policy = {"datasets": {"s": f"{scene['dataset']}:read-write"}}
        cwd = scene["base"].parent / f"{scene['base'].name}-cwd"
        cwd.mkdir(mode=0o755)
        with configured_kernel("ks-swap-host", policy, cwd, state) as kernel:
            assert kernel.probe("from kernel_sandbox import data\nreport(n=len(data.ls('s')))")
            if which == "root":
                original = scene["base"] / "proj" / "moved"
                scene["dataset"].rename(original)
                scene["dataset"].symlink_to(scene["host"] / "sales")
            else:
                (scene["base"] / "proj").rename(scene["base"] / "moved")
                (scene["base"] / "proj").symlink_to(scene["host"])
                original = scene["base"] / "moved" / "sales"
            after = kernel.probe(_USE_AFTER_SWAP)
            kernel_id = kernel.km.kernel_id
        entries = AuditLog(state / "audit.jsonl").entries()
        moved = sum(1 for e in entries if e["kernel_id"] == kernel_id and e.get("root") == "moved")
        host_side.append((which, after, original, scene, moved))
    observe(
        "fs-dataset-root-swap",
        f"inside: {inside}; host folder holds {leaked}; "
        + "; ".join(
            f"host swaps the {w}: ls {a['ls']}, stat {a['stat']}, read {a['read']}, write "
            f"{a['write']}, audit root=moved x{m}"
            for w, a, _o, _s, m in host_side
        ),
    )
    assert got is None, f"a dataset in the kernel's writable workspace was served: {got}"
    assert containers == []  # refused before any container was created
    assert leaked == ["secret.txt"]
    for _which, after, original, scene, moved in host_side:
        assert after["ls"] == ["s/a.csv"]
        assert after["stat"] == after["read"] == "DataNotFound"
        assert after["own"] == repr("original\n") and after["write"] == "None"
        assert (original / "planted.txt").read_text() == "from the kernel"
        assert sorted(p.name for p in (scene["host"] / "sales").iterdir()) == ["secret.txt"]
        assert moved >= 4

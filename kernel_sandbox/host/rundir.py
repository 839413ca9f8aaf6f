"""The per-kernel runtime directory: the only host path a kernel container shares by default.

::

    <root>/<id>/          host only (0700): owner record, egress config and control, staging
    <root>/<id>/h/        host-served sockets and files (owned by the host user; for the sandbox
                          service's kernels, searchable by the kernel's uid alone): the lifeline,
                          the data broker's socket and token, the egress proxy's sockets, the
                          container's connection file; mounted READ-ONLY at HOST_SOCKETS_MOUNT,
                          so the kernel can use them but never unlink or replace one
    <root>/<id>/t/        a tmpfs of ``runtime_dir_size`` when the owner can mount (root), else a
                          plain directory; host only (0700)
    <root>/<id>/t/s/      the kernel's part (its uid, 0700), mounted read-write at RUNTIME_MOUNT:
                          its ipc sockets k-<port>, and whatever it writes there
    <root>/<id>/t/c-<port>  what clients connect to: hard links to the kernel's sockets, made
                          once it has bound them (type and owner checked without following a
                          link), so no client ever resolves a path the kernel can change
    <root>/<id>/t/r-<port>  a host-side relay's own socket (IOPub: kernel_sandbox.host.relay);
                          the channel's t/c-<port> is a hard link to it instead

The client links and the kernel's sockets share one file system (``t/``): a hard link cannot
cross file systems. The root is short because unix socket paths are limited to 107 bytes. The
directory survives restarts (clients keep their sockets; the links are made again) and is
removed on the final cleanup (:mod:`.fsremove`, after the tmpfs is detached).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import KernelStartError, PolicyError
from kernel_sandbox.host import tmpfs
from kernel_sandbox.host.fsremove import Removal, remove_entry, remove_tree
from kernel_sandbox.inside.contract import (
    CONNECTION_FILE,
    EGRESS_NOTICE_SOCKET,
    HOST_SOCKETS_MOUNT,
    HOST_SUBDIR,
    SHARED_SUBDIR,
    SOCKET_PREFIX,
)

__all__ = [
    "CHANNELS",
    "CLIENT_PREFIX",
    "DEFAULT_SIZE",
    "KERNEL_AREA",
    "MAX_SOCKET_PATH",
    "RuntimeDir",
    "default_root",
    "ipc_connection_info",
]

CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
MAX_SOCKET_PATH = 107
KERNEL_AREA = "t"  # <id>/t: the tmpfs (or plain directory) holding s/ and the client links
CLIENT_PREFIX = "c"  # client links are t/c-<port>
CLAIMED_BY = "kernel-id"  # <id>/kernel-id: which kernel claimed a pooled sandbox (host only)
HANDLE_PREFIX = "k-"  # <root>/k-<random>: a pooled kernel's link to its current t/ (make_handle)
RELAY_PREFIX = "r"  # a host-side relay's own socket is t/r-<port> (kernel_sandbox.host.relay)
KERNEL_LINK_PREFIX = "b"  # t/b-<port>: a relay's host-only link to the kernel's socket
DEFAULT_SIZE = 4 * 1024**2


def default_root() -> str:
    """A short, per-user root for runtime directories (``/tmp/kernel-sandbox-<uid>``)."""
    return f"/tmp/kernel-sandbox-{os.getuid()}"


def ipc_connection_info(socket_prefix: str, key: bytes, kernel_name: str) -> dict[str, Any]:
    """Connection info for an ipc-transport kernel; the "ports" are only socket suffixes."""
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": socket_prefix,
        "key": key,
        "signature_scheme": "hmac-sha256",
        "kernel_name": kernel_name,
    }
    info.update({name: number for number, name in enumerate(CHANNELS, start=1)})
    return info


def _make_private_dir(path: Path, mode: int = 0o700) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PolicyError(
            f"runtime_root: {path} is not a directory owned by you; remove it or configure "
            "c.DockerSandboxProvisioner.runtime_root"
        )
    os.chmod(path, mode)


def hardlinks_allowed(kernel_uid: int) -> bool:
    """Whether this process may hard-link the kernel's sockets (fs.protected_hardlinks lets
    only a file's owner, or CAP_FOWNER, link it)."""
    if os.geteuid() in (0, kernel_uid):
        return True
    try:
        return Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "0"
    except OSError:
        return False


class RuntimeDir:
    """One kernel's private directory on the host, and its view from inside the container.

    Args:
        path: ``<root>/<id>``.
        capped: whether ``t/`` is a tmpfs of its own (False: a plain directory, or unknown).
    """

    def __init__(
        self, path: str | os.PathLike[str], capped: bool = False, handle: str | None = None
    ):
        self.path = Path(path)
        self.capped = capped
        # A kernel of a warm pool reaches its current sandbox through a handle (see
        # :meth:`make_handle`): a restart claims another sandbox, in another directory.
        self.handle = Path(handle) if handle else None

    @classmethod
    def create(
        cls,
        root: str,
        owner: tuple[int, int] | None,
        size: int | None = DEFAULT_SIZE,
        client_reachable: bool = False,
    ) -> RuntimeDir:
        """Make a new private directory under ``root``; its kernel part is owned by ``owner``
        (uid, gid) if given and lives on a tmpfs of ``size`` bytes when this process can mount
        one (``size`` None or 0: never).

        ``client_reachable``: the kernel's client is another user (the sandbox service's
        caller), so the directories on the way to the client links may be searched (0711: not
        listed, the names are random); the links themselves are given to that user alone
        (:meth:`give_client_sockets`).

        Raises:
            PolicyError: the socket paths would exceed the unix limit, or the root is unsafe.
            OSError: the directory could not be made (nothing is left behind).
        """
        root_path = Path(root)
        search = 0o711 if client_reachable else 0o700
        _make_private_dir(root_path, search)
        path = root_path / secrets.token_hex(4)
        new = cls(path)
        longest = max(
            len(f"{new.socket_prefix}-{len(CHANNELS)}"),
            len(f"{new.client_prefix}-{len(CHANNELS)}"),
            len(str(new.host_dir / EGRESS_NOTICE_SOCKET)),
        )
        if longest > MAX_SOCKET_PATH:
            raise PolicyError(
                f"runtime_root: socket paths under {root} would be {longest} bytes, over the "
                f"unix limit of {MAX_SOCKET_PATH}; configure a shorter "
                "c.DockerSandboxProvisioner.runtime_root"
            )
        path.mkdir(mode=0o700)
        os.chmod(path, search)
        try:
            new.host_dir.mkdir(mode=0o711)
            os.chmod(new.host_dir, 0o711)  # the kernel's uid may only reach what it is given
            if client_reachable and owner is not None and os.getuid() == 0:
                # <id>/ is searchable by everyone here, and its name is no secret (the tmpfs
                # below shows in every user's /proc/self/mountinfo): h/'s sockets (0666: the
                # kernel's uid must connect) are closed to other users by h/ itself, which
                # only the kernel's uid may search (read-only inside: it cannot chmod it).
                os.chown(new.host_dir, owner[0], 0)
                os.chmod(new.host_dir, 0o500)
            new.area.mkdir(mode=0o700)
            if size and tmpfs.can_mount():
                tmpfs.mount(new.area, size, (os.getuid(), os.getgid()), search)
                new.capped = True
            os.chmod(new.area, search)
            new.shared.mkdir(mode=0o700)
            if owner is not None and os.getuid() == 0:
                os.chown(new.shared, *owner)
        except BaseException:
            new.remove()
            raise
        return new

    # -- where things are -------------------------------------------------------------------

    @property
    def area(self) -> Path:
        """``t/``: the kernel's part and the client links (one file system)."""
        return self.path / KERNEL_AREA

    @property
    def shared(self) -> Path:
        """The part the kernel can write, mounted read-write at RUNTIME_MOUNT."""
        return self.area / SHARED_SUBDIR

    @property
    def host_dir(self) -> Path:
        """The host-served sockets and files, mounted read-only at HOST_SOCKETS_MOUNT."""
        return self.path / HOST_SUBDIR

    @property
    def socket_prefix(self) -> str:
        """The kernel's own socket paths (``t/s/k``): never connected to by the host."""
        return str(self.shared / SOCKET_PREFIX)

    @property
    def client_prefix(self) -> str:
        """The ``ip`` of the connection info clients get (``t/c``): links in a host-only
        directory (reached through the handle, when there is one)."""
        if self.handle is not None:
            return f"{self.handle}/{CLIENT_PREFIX}"
        return str(self.area / CLIENT_PREFIX)

    # -- the handle of a pooled kernel ----------------------------------------------------------

    def make_handle(self) -> None:
        """Give this directory a handle: ``<root>/k-<random>``, a symbolic link to ``t/``
        that only this process writes (in the host-only root). Connection info names the
        handle, so clients keep their paths when a restart moves the kernel to another
        sandbox's directory (:meth:`take_handle`)."""
        self.handle = self.path.parent / f"{HANDLE_PREFIX}{secrets.token_hex(4)}"
        self._point(self.handle)

    def take_handle(self, handle: Path) -> None:
        """Point ``handle`` (another directory's) at this one's ``t/``, atomically."""
        self._point(handle)
        self.handle = handle

    def _point(self, handle: Path) -> None:
        staging = handle.parent / f".{handle.name}.{secrets.token_hex(4)}"
        os.symlink(self.area, staging)
        try:
            os.rename(staging, handle)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise

    def remove_handle(self) -> None:
        """Remove the handle if it still points here (never raises)."""
        handle = self.handle
        if handle is None:
            return
        try:
            if os.readlink(handle) == str(self.area):
                handle.unlink()
        except OSError:
            pass

    def kernel_socket(self, port: int) -> Path:
        return Path(f"{self.socket_prefix}-{port}")

    def client_socket(self, port: int) -> Path:
        return Path(f"{self.client_prefix}-{port}")

    def relay_socket(self, port: int) -> Path:
        """Where a host-side relay binds for a channel (``t/r-<port>``, host-only; clients reach
        it through their ``t/c-<port>`` link, hence on the same file system)."""
        return self.area / f"{RELAY_PREFIX}-{port}"

    def kernel_link(self, port: int) -> Path:
        """Where a relay that connects to the kernel's socket reaches it (``t/b-<port>``): a
        hard link made by :meth:`link_client_socket`, never a path the kernel can change."""
        return self.area / f"{KERNEL_LINK_PREFIX}-{port}"

    def socket_paths(self, info: Mapping[str, Any]) -> list[Path]:
        return [self.kernel_socket(info[name]) for name in CHANNELS]

    # -- the kernel's sockets and the clients' links ------------------------------------------

    def sockets_ready(self, info: Mapping[str, Any], kernel_uid: int | None = None) -> bool:
        """True once the kernel has bound all of its sockets (checked without following a
        link: a link planted there is never "ready") and, with ``kernel_uid``, they are that
        uid's (gVisor's gofer creates a socket file as root and hands it over a moment later).
        """
        try:
            found = [p.lstat() for p in self.socket_paths(info)]
        except OSError:
            return False
        return all(stat.S_ISSOCK(f.st_mode) and kernel_uid in (None, f.st_uid) for f in found)

    def link_client_socket(
        self, port: int, kernel_uid: int | None, target: Path | None = None
    ) -> None:
        """Point the client path of one channel (``t/c-<port>``) at the kernel's socket
        ``t/s/k-<port>``: a hard link, made only if that is a socket (not followed if it is a
        link) owned by ``kernel_uid`` (None: any owner). Replaces what was there atomically;
        a channel served by a host-side relay replaces its own entry instead of calling this.

        Raises:
            KernelStartError: the kernel's entry is not a socket of its uid, or the link was
                refused (e.g. fs.protected_hardlinks); the client path is then absent.
        """
        source = self.kernel_socket(port)
        target = target or self.client_socket(port)
        staging = self.area / f".{CLIENT_PREFIX}-{port}.{secrets.token_hex(4)}"
        try:
            _check_socket(source, kernel_uid)
            os.link(source, staging, follow_symlinks=False)
            _check_socket(staging, kernel_uid)  # the inode we linked, whatever raced
            os.rename(staging, target)
        except OSError as exc:
            remove_tree(staging)
            raise KernelStartError(
                f"kernel socket {source.name}: cannot give clients a path to it: {exc}"
            ) from exc

    def link_client_sockets(
        self, info: Mapping[str, Any], kernel_uid: int | None, skip: Iterable[str] = ()
    ) -> None:
        """:meth:`link_client_socket` for every channel but those named in ``skip`` (e.g.
        ``"iopub_port"`` when a relay serves it). Does nothing when the connection info names
        the kernel's own prefix (the fallback where links are not allowed).

        Raises:
            KernelStartError: as :meth:`link_client_socket`.
        """
        if info.get("ip") != self.client_prefix:
            return
        for name in CHANNELS:
            if name not in skip:
                self.link_client_socket(info[name], kernel_uid)

    def give_client_sockets(self, info: Mapping[str, Any], client: tuple[int, int]) -> None:
        """Make every client path (``t/c-<port>``) connectable by ``client`` (uid, gid) alone:
        its inode (the kernel's socket, or the relay's) becomes that user's, mode 0600. The
        entries are in ``t/``, which only this process writes, and were checked to be sockets
        when linked, so acting on them by path reaches what was checked.

        Raises:
            OSError: an entry is missing or cannot be changed.
        """
        for name in CHANNELS:
            path = self.client_socket(info[name])
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(f"{path} is not a socket")
            os.chown(path, *client, follow_symlinks=False)
            os.chmod(path, 0o600)

    def clear_sockets(self, info: Mapping[str, Any]) -> Removal:
        """Remove the previous container's sockets and the clients' links to them (before a
        restart's new container binds); whatever the kernel put at those paths goes too."""
        result = Removal(str(self.area))
        for name in CHANNELS:
            for directory, entry in (
                (self.shared, f"{SOCKET_PREFIX}-{info[name]}"),
                (self.area, f"{CLIENT_PREFIX}-{info[name]}"),
                (self.area, f"{KERNEL_LINK_PREFIX}-{info[name]}"),
            ):
                _remove_in(directory, entry, result)
        return result

    # -- files the host gives the kernel ------------------------------------------------------

    def write_container_connection_file(
        self, info: Mapping[str, Any], mount_point: str, owner: tuple[int, int] | None
    ) -> str:
        """Write the connection file the kernel reads (in ``h/``, read-only inside), naming
        sockets as the container sees them (``mount_point``, the kernel's writable part).

        Returns the path of that file inside the container.
        """
        inside = dict(info)
        inside["ip"] = f"{mount_point}/{SOCKET_PREFIX}"
        key = inside["key"]
        inside["key"] = key.decode() if isinstance(key, bytes) else key
        staging = self.path / f".{CONNECTION_FILE}.tmp"
        staging.unlink(missing_ok=True)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(inside, handle, indent=1)
            if owner is not None and os.getuid() == 0:
                os.fchown(handle.fileno(), *owner)
        os.rename(staging, self.host_dir / CONNECTION_FILE)
        return f"{HOST_SOCKETS_MOUNT}/{CONNECTION_FILE}"

    def link_to_host(self, names: Iterable[str]) -> None:
        """Put symbolic links ``s/NAME -> HOST_SOCKETS_MOUNT/NAME`` in the kernel's part, for
        images built before the host sockets moved (they look in RUNTIME_MOUNT). Only the
        kernel ever follows them (inside its container); best effort: the kernel may have
        filled its part, or planted something there."""
        for name in names:
            staging = self.area / f".{name}.{secrets.token_hex(4)}"
            try:
                os.symlink(f"{HOST_SOCKETS_MOUNT}/{name}", staging)
                os.rename(staging, self.shared / name)
            except OSError:
                remove_tree(staging)

    # -- lifetime -----------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.is_dir()

    def remove(self) -> Removal:
        """Detach the tmpfs and remove the directory and everything in it, whatever the kernel
        made there; already gone is fine. Never raises: what could not be removed (or
        unmounted) is in the result."""
        failures: list[tuple[str, OSError]] = []
        for point in tmpfs.mounts_under(self.path):
            try:
                tmpfs.unmount(point)
            except OSError as exc:
                failures.append((str(point), exc))
        self.remove_handle()
        result = remove_tree(self.path)
        for where, error in failures:
            result.left(where, error)
        return result


def _check_socket(path: Path, kernel_uid: int | None) -> None:
    info = path.lstat()
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(f"not a socket (mode {stat.filemode(info.st_mode)})")
    if kernel_uid is not None and info.st_uid != kernel_uid:
        raise OSError(f"owned by uid {info.st_uid}, not the kernel's {kernel_uid}")


def _remove_in(directory: Path, name: str, result: Removal) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        remove_entry(fd, name, result)
    finally:
        os.close(fd)

"""A uid of its own for every sandbox, from a range that maps to no host account.

The Linux kernel counts some limits per uid across the whole host when the engine maps no
user namespace (Docker's default): inotify instances and watches, POSIX message queue bytes
(``RLIMIT_MSGQUEUE``), processes (``RLIMIT_NPROC``), pending signals. Sandboxes that share a
uid, or share it with a host account, share those limits: one kernel could exhaust them for
the others and for that account. So an owner that may give files away (root) runs each
kernel as a uid of its own from ``uid_range``, a range no account, group or subordinate id
range of the host uses (:func:`check_range`).

A uid is claimed by creating ``<claims>/<uid>`` with ``O_CREAT | O_EXCL`` (of the processes
that race for one uid exactly one creates it), written once with the owner's host, pid and
start time and the kernel's id. The claim is released at the kernel's final close; a claim
whose owner died is stale and taken over, under ``flock`` and only while the name still
names the file that was judged, so two processes never both take it. Free uids are tried
first, from a random one, so a stale claim is only reused when the range is nearly full (the
dead owner's container has long been ended by its watchdog or reaped by then). The claims
directory is the owner's, mode 0700 (default ``/run/kernel-sandbox-uids``: gone at reboot,
with every sandbox).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import os
import pwd
import random
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kernel_sandbox.errors import PolicyError, UidsExhausted
from kernel_sandbox.host.owner import Owner

__all__ = [
    "DEFAULT_CLAIM_DIR",
    "DEFAULT_RANGE",
    "HostIds",
    "UidClaim",
    "UidPool",
    "UidRange",
    "check_range",
    "host_ids",
]

DEFAULT_RANGE = "2000000-2065535"
DEFAULT_CLAIM_DIR = "/run/kernel-sandbox-uids"
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to chown
# A claim with no readable record yet is being written; older than this, its writer died.
UNWRITTEN_GRACE = 10.0
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class UidRange:
    """An inclusive range of uids (each sandbox's gid is its uid)."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str, name: str = "uid_range") -> UidRange:
        """Read ``'FIRST-LAST'``.

        Raises:
            PolicyError: not two numbers, out of order, or touching uid 0 or (uid_t)-1.
        """
        match = _RANGE.match(str(text))
        if not match:
            raise PolicyError(
                f"{name}: expected 'FIRST-LAST' (e.g. '{DEFAULT_RANGE}'), got {text!r}"
            )
        first, last = int(match.group(1)), int(match.group(2))
        if not 0 < first <= last <= MAX_ID:
            raise PolicyError(
                f"{name}: expected 0 < FIRST <= LAST <= {MAX_ID} (e.g. '{DEFAULT_RANGE}'), "
                f"got {text!r}"
            )
        return cls(first, last)

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class HostIds:
    """Ids the host has given out: one user, group or subordinate range, for messages."""

    what: str  # "account cloudsdk (uid 1000)"
    first: int
    last: int


def _read_lines(path: str) -> list[list[str]]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def host_ids(
    passwd: str = "/etc/passwd",
    group: str = "/etc/group",
    subuid: str = "/etc/subuid",
    subgid: str = "/etc/subgid",
    directory: bool = True,
) -> list[HostIds]:
    """Every uid and gid the host uses: accounts and groups (the files and, with
    ``directory``, the name service: LDAP and the like where it enumerates) and the
    subordinate ranges of user namespaces (rootless engines)."""
    found: list[HostIds] = []
    for fields in _read_lines(passwd):
        if len(fields) > 2 and fields[2].isdigit():
            found.append(HostIds(f"account {fields[0]} (uid {fields[2]})", *[int(fields[2])] * 2))
    for fields in _read_lines(group):
        if len(fields) > 2 and fields[2].isdigit():
            found.append(HostIds(f"group {fields[0]} (gid {fields[2]})", *[int(fields[2])] * 2))
    if directory:
        found += [
            HostIds(f"account {e.pw_name} (uid {e.pw_uid})", e.pw_uid, e.pw_uid)
            for e in pwd.getpwall()
        ]
        found += [
            HostIds(f"group {e.gr_name} (gid {e.gr_gid})", e.gr_gid, e.gr_gid)
            for e in grp.getgrall()
        ]
    for path, kind in ((subuid, "uids"), (subgid, "gids")):
        for fields in _read_lines(path):
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                first, count = int(fields[1]), int(fields[2])
                if count:
                    last = first + count - 1
                    found.append(
                        HostIds(f"subordinate {kind} of {fields[0]} ({first}-{last})", first, last)
                    )
    return found


def check_range(uid_range: UidRange, used: Iterable[HostIds] | None = None) -> None:
    """Refuse a range that overlaps ids the host uses (a kernel would act as that account).

    Raises:
        PolicyError: naming the overlapping accounts, groups or ranges, and the fix.
    """
    clashes: list[str] = []
    for ids in host_ids() if used is None else used:
        if ids.first <= uid_range.last and uid_range.first <= ids.last and ids.what not in clashes:
            clashes.append(ids.what)
    if clashes:
        shown = ", ".join(clashes[:5]) + (
            f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        )
        raise PolicyError(
            f"uid_range: {uid_range} overlaps ids this host uses: {shown}; a sandbox would "
            "share that account's files and per-user limits. Set "
            "c.DockerSandboxProvisioner.uid_range to a range no account, group or subordinate "
            f"id range uses (default {DEFAULT_RANGE})"
        )


@dataclass
class UidClaim:
    """One sandbox's hold on a uid; :meth:`release` gives it back (idempotent)."""

    uid: int
    directory: Path
    record: dict[str, object]
    released: bool = False

    @property
    def gid(self) -> int:
        return self.uid

    def release(self) -> None:
        """Remove the claim file if it is still this claim's; gone already is fine.

        Raises:
            OSError: the claims directory cannot be opened or the file not removed.
        """
        if self.released:
            return
        with _open_dir(self.directory, create=False) as dfd:
            if dfd is not None and _read_record(dfd, str(self.uid)) == self.record:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(self.uid), dir_fd=dfd)
        self.released = True


class UidPool:
    """Hands out the uids of a range, one per sandbox, through claim files (module docstring).

    Args:
        uid_range: the uids to hand out (:func:`check_range` is the caller's to run).
        directory: where the claims live (made mode 0700 if missing).
        owner: who claims (default: this process).
        rng: where the first uid tried comes from.
        clock: wall-clock seconds (the age of an unwritten claim).
    """

    def __init__(
        self,
        uid_range: UidRange,
        directory: str | os.PathLike[str] = DEFAULT_CLAIM_DIR,
        owner: Callable[[], Owner] = Owner.current,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.range = uid_range
        self.directory = Path(directory)
        self._owner = owner
        self._rng = rng or random.SystemRandom()
        self._clock = clock

    def claim(self, kernel_id: str) -> UidClaim:
        """Claim a free uid (or, with none free, one whose owner died) for ``kernel_id``.

        Raises:
            UidsExhausted: every uid of the range is claimed by a live owner.
            PolicyError: the claims directory is not a private directory of this user.
            OSError: the claims directory cannot be made or written.
        """
        with _open_dir(self.directory, create=True) as dfd:
            assert dfd is not None
            taken = self._claimed(dfd)
            size = len(self.range)
            start = self._rng.randrange(size)
            if len(taken) < size:
                for offset in range(size):
                    uid = self.range.first + (start + offset) % size
                    if uid not in taken and (claim := self._create(dfd, uid, kernel_id)):
                        return claim
            for uid in sorted(taken, key=lambda u: (u - self.range.first - start) % size):
                if claim := self._take_over(dfd, uid, kernel_id, self._is_stale):
                    return claim
        raise UidsExhausted(
            f"kernel {kernel_id}: all {size} uids of uid_range {self.range} are held by running "
            f"sandboxes (claims in {self.directory}); shut some kernels down or widen "
            "c.DockerSandboxProvisioner.uid_range"
        )

    def adopt(self, uid: int, kernel_id: str) -> UidClaim | None:
        """Take over the claim of an adopted kernel (its owner, a Jupyter Server, restarted).

        Returns:
            The claim, now this process's; None when a live owner holds ``uid`` for another
            kernel (or ``uid`` is not in the range).
        """
        if uid not in self.range:
            return None
        with _open_dir(self.directory, create=True) as dfd:
            assert dfd is not None
            if claim := self._create(dfd, uid, kernel_id):
                return claim

            def ours_or_stale(fd: int, info: os.stat_result) -> bool:
                record = _read_fd(fd)
                return (record or {}).get("kernel") == kernel_id or self._is_stale(fd, info)

            return self._take_over(dfd, uid, kernel_id, ours_or_stale)

    def claimed(self) -> set[int]:
        """The uids claimed now (stale claims included)."""
        with _open_dir(self.directory, create=False) as dfd:
            return set() if dfd is None else self._claimed(dfd)

    # -- claim files --------------------------------------------------------------------------

    def _claimed(self, dfd: int) -> set[int]:
        names = (n for n in os.listdir(dfd) if n.isdigit())
        return {uid for uid in map(int, names) if uid in self.range}

    def _record(self, kernel_id: str) -> dict[str, object]:
        owner = self._owner()
        return {"host": owner.host, "pid": owner.pid, "start": owner.start, "kernel": kernel_id}

    def _create(self, dfd: int, uid: int, kernel_id: str) -> UidClaim | None:
        """Create the claim file for ``uid``; None when it exists."""
        record = self._record(kernel_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(str(uid), flags, 0o600, dir_fd=dfd)
        except FileExistsError:
            return None
        try:
            os.write(fd, json.dumps(record).encode())  # one small write: read whole or not at all
        finally:
            os.close(fd)
        return UidClaim(uid, self.directory, record)

    def _take_over(
        self,
        dfd: int,
        uid: int,
        kernel_id: str,
        may_take: Callable[[int, os.stat_result], bool],
    ) -> UidClaim | None:
        """Replace the claim on ``uid`` when ``may_take`` says so; None otherwise.

        Under an exclusive flock of the judged file, and only while ``uid`` still names that
        file: another process that judged the same file either waits for the lock and then
        finds the name gone or renamed to a new claim, or is refused the lock.
        """
        name = str(uid)
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
            )
        except FileNotFoundError:
            return self._create(dfd, uid, kernel_id)
        except OSError:  # not a regular file we can read: leave it alone
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # another process is taking it over right now
            info = os.fstat(fd)
            try:
                now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or not may_take(fd, info):
                return None
            os.unlink(name, dir_fd=dfd)
        finally:
            os.close(fd)
        return self._create(dfd, uid, kernel_id)

    def _is_stale(self, fd: int, info: os.stat_result) -> bool:
        """Whether the claim open as ``fd`` belongs to an owner that is gone."""
        record = _read_fd(fd)
        if record is None:
            return self._clock() - info.st_mtime > UNWRITTEN_GRACE
        host, pid, start = record.get("host"), record.get("pid"), record.get("start")
        if not isinstance(host, str) or not isinstance(pid, int):
            return self._clock() - info.st_mtime > UNWRITTEN_GRACE
        owner = Owner(host, pid, start if isinstance(start, str) else None)
        return owner.is_alive() is False


def _read_fd(fd: int) -> dict[str, object] | None:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_record(dfd: int, name: str) -> dict[str, object] | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_dir(path: Path, create: bool) -> Iterator[int | None]:
    """The claims directory, opened without following a link; made (0700) with ``create``.

    Raises:
        PolicyError: it is not a directory of this user that nobody else may write.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise
        yield None
        return
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise PolicyError(
            f"uid claims: {path} is not a directory; remove it or set "
            "c.DockerSandboxProvisioner.uid_claims"
        ) from exc
    try:
        info = os.fstat(dfd)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o022:
            raise PolicyError(
                f"uid claims: {path} must be owned by uid {os.geteuid()} and writable by nobody "
                f"else (it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); remove "
                "it (it is made again) or set c.DockerSandboxProvisioner.uid_claims"
            )
        yield dfd
    finally:
        os.close(dfd)

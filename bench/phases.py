"""Where a sandboxed kernel's start-up time goes: timestamps of each phase of one start.

Used by ``startup.py``. While installed, it wraps (without changing what they do):

- ``DockerSandboxProvisioner.pre_launch`` and ``.launch_kernel``;
- ``RuntimeDir.sockets_ready``, to note when the kernel's sockets first all exist;
- every HTTP request the docker SDK sends to the engine (``APIClient.send``), so each engine
  round trip of a start is seen with its duration (create, start, inspects, ...);
- for a start served by the warm pool: ``WarmPool.claim`` (taking a waiting sandbox),
  ``PooledSandbox.send_claim`` (the claim to its waiter), the client links
  (``_link_client_sockets``) and ``KernelResources.wait_relay`` (the IOPub relay attaching).

After the kernel_info reply it asks the engine when the container's process started
(``State.StartedAt``), which splits "docker start" from the kernel's own start-up inside.
Spans are attributed to the start that caused them through a context variable (which
``asyncio.to_thread`` carries into the SDK's worker threads); work on other threads, such as
the provisioner's one-off orphan sweep, is not counted.
"""

from __future__ import annotations

import contextvars
import functools
import re
import statistics
import sys
import time
from datetime import datetime
from typing import Any

_current: contextvars.ContextVar[Record | None] = contextvars.ContextVar(
    "ks_bench_record", default=None
)
_ID = re.compile(r"/(?:[0-9a-f]{64}|ks-[0-9a-f]{8}-[0-9a-f]{6})(?=/|$)")
_VERSION = re.compile(r"^/v\d+\.\d+")
_IMAGE = re.compile(r"^/images/(.+)/json$")


def _engine_path(method: str, url: str) -> str:
    path = url.split("://", 1)[-1]
    path = path[path.find("/") :] if "/" in path else path
    path = _VERSION.sub("", path.split("?", 1)[0])
    path = _ID.sub("/{id}", path)
    path = _IMAGE.sub("/images/{image}/json", path)
    return f"{method} {path}"


class Record:
    """Spans (name, begin, end) of one kernel start, in perf_counter seconds."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self.marks: dict[str, float] = {}
        self.depth: dict[str, int] = {}
        self.wall_ref = (time.time(), time.perf_counter())  # to place engine timestamps

    def span(self, name: str, begin: float, end: float, depth: int) -> None:
        self.spans.append((name, begin, end))
        self.depth.setdefault(name, depth)

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.setdefault(name, time.perf_counter() if at is None else at)

    def as_dict(self, started: float) -> dict[str, Any]:
        """Offsets from ``started`` (the start_kernel call), in seconds."""
        return {
            "spans": [(n, b - started, e - started) for n, b, e in self.spans],
            "marks": {n: t - started for n, t in self.marks.items()},
            "depth": dict(self.depth),
        }


class Probe:
    """Install the timing wrappers for the duration of a run; ``begin`` one Record per start."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []
        self._client: Any = None
        self.available = True

    def begin(self) -> Record:
        record = Record()
        _current.set(record)
        return record

    async def finish(self, record: Record, km: Any, started: float) -> None:
        """Stop attributing spans to ``record`` and add the container's engine-side start time."""
        _current.set(None)
        container_id = getattr(km.provisioner, "container_id", None)
        if not container_id:
            return
        import asyncio

        import docker

        def started_at() -> float | None:
            if self._client is None:
                self._client = docker.APIClient(version="auto")
            state = self._client.inspect_container(container_id)["State"]
            stamp = state.get("StartedAt", "")
            # "2024-05-01T10:00:00.123456789Z": keep microseconds for fromisoformat
            match = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?Z$", stamp)
            if not match:
                return None
            frac = (match.group(2) or "0")[:6].ljust(6, "0")
            return datetime.fromisoformat(f"{match.group(1)}.{frac}+00:00").timestamp()

        wall = await asyncio.to_thread(started_at)
        if wall is not None:
            # map wall-clock to perf_counter through the record's wall reference
            wall_ref, perf_ref = record.wall_ref
            record.mark(
                "container process started (engine StartedAt)", at=wall - wall_ref + perf_ref
            )

    # -- patching ---------------------------------------------------------------------------

    def install(self) -> None:
        """Wrap every ``docker-sandbox*`` provisioner (scratch variants too) and the SDK."""
        from importlib.metadata import entry_points

        try:
            import docker.api.client
        except ImportError as exc:
            print(f"phases: not available ({exc})")
            self.available = False
            return
        wrapped: set[tuple[type, str]] = set()
        for ep in entry_points(group="jupyter_client.kernel_provisioners"):
            if not ep.name.startswith("docker-sandbox"):
                continue
            try:
                cls = ep.load()
            except Exception as exc:  # a broken variant must not stop the benchmark
                print(f"phases: cannot load provisioner {ep.name}: {exc}")
                continue
            for name in ("pre_launch", "launch_kernel"):
                owner = next(c for c in cls.__mro__ if name in c.__dict__)
                if (owner, name) not in wrapped:
                    wrapped.add((owner, name))
                    self._wrap_async(owner, name, depth=0)
            runtime_dir = getattr(sys.modules[cls.__module__], "RuntimeDir", None)
            if runtime_dir is not None and (runtime_dir, "sockets_ready") not in wrapped:
                wrapped.add((runtime_dir, "sockets_ready"))
                self._wrap_sockets_ready(runtime_dir)
            if "_link_client_sockets" in dir(cls) and (cls, "_link_client_sockets") not in wrapped:
                wrapped.add((cls, "_link_client_sockets"))
                owner = next(c for c in cls.__mro__ if "_link_client_sockets" in c.__dict__)
                self._wrap_sync(owner, "_link_client_sockets", depth=1)
        self._wrap_pool()
        self._wrap_send(docker.api.client.APIClient)

    def _wrap_pool(self) -> None:
        """The warm pool's steps of a claim (absent in checkouts without a pool)."""
        try:
            from kernel_sandbox.host.pool import PooledSandbox, WarmPool
            from kernel_sandbox.host.resources import KernelResources
        except ImportError:
            return
        self._wrap_sync(WarmPool, "claim", depth=1)
        self._wrap_sync(PooledSandbox, "send_claim", depth=1)
        self._wrap_async(KernelResources, "wait_relay", depth=1)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._undo):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._undo.clear()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._undo.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, replacement)

    def _wrap_async(self, owner: Any, name: str, depth: int) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            record = _current.get()
            begin = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                if record is not None:
                    record.span(name, begin, time.perf_counter(), depth)

        self._patch(owner, name, wrapper)

    def _wrap_sync(self, owner: Any, name: str, depth: int) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            record = _current.get()
            begin = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if record is not None:
                    record.span(name, begin, time.perf_counter(), depth)

        self._patch(owner, name, wrapper)

    def _wrap_sockets_ready(self, owner: Any) -> None:
        original = owner.sockets_ready

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ready = original(*args, **kwargs)
            record = _current.get()
            if ready and record is not None:
                record.mark("sockets bound (provisioner saw them)")
            return ready

        self._patch(owner, "sockets_ready", wrapper)

    def _wrap_send(self, owner: Any) -> None:
        original = owner.send  # requests.Session.send, inherited

        @functools.wraps(original)
        def wrapper(session: Any, request: Any, **kwargs: Any) -> Any:
            record = _current.get()
            begin = time.perf_counter()
            try:
                return original(session, request, **kwargs)
            finally:
                if record is not None:
                    name = "engine " + _engine_path(request.method, request.url)
                    record.span(name, begin, time.perf_counter(), 1)

        self._patch(owner, "send", wrapper)


# -- summaries ------------------------------------------------------------------------------


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median begin/end/duration per span name (first begin, last end, summed time, count)."""
    names: list[str] = []
    per_name: dict[str, list[tuple[float, float, float, int]]] = {}
    depth: dict[str, int] = {}
    for rec in records:
        seen: dict[str, list[tuple[float, float]]] = {}
        for name, begin, end in rec["spans"]:
            seen.setdefault(name, []).append((begin, end))
        for name, begin_end in seen.items():
            if name not in names:
                names.append(name)
            depth.setdefault(name, rec["depth"].get(name, 0))
            per_name.setdefault(name, []).append(
                (
                    min(b for b, _ in begin_end),
                    max(e for _, e in begin_end),
                    sum(e - b for b, e in begin_end),
                    len(begin_end),
                )
            )
        for name, at in rec["marks"].items():
            if name not in names:
                names.append(name)
            depth.setdefault(name, 1 if "kernel_info" not in name else 0)
            per_name.setdefault(name, []).append((at, at, 0.0, 1))
    rows = []
    for name in names:
        values = per_name[name]
        rows.append(
            {
                "name": name,
                "depth": depth[name],
                "begin_ms": statistics.median(v[0] for v in values) * 1e3,
                "end_ms": statistics.median(v[1] for v in values) * 1e3,
                "duration_ms": statistics.median(v[2] for v in values) * 1e3,
                "count": statistics.median(v[3] for v in values),
                "runs": len(values),
            }
        )
    rows.sort(key=lambda r: (r["begin_ms"], -r["end_ms"]))
    return rows


STAGES = (
    ("host side, before the engine creates the container", None, "create"),
    ("engine: create + start until the process runs", "create", "process"),
    ("in the container: process start -> sockets bound", "process", "sockets"),
    ("kernel init after binding -> kernel_info reply", "sockets", "reply"),
)


def _points(rec: dict[str, Any]) -> dict[str, float]:
    points = {"start": 0.0}
    for name, begin, _end in rec["spans"]:
        if name == "engine POST /containers/create":
            points.setdefault("create", begin)
    for name, at in rec["marks"].items():
        if name.startswith("container process started"):
            points["process"] = at
        elif name.startswith("sockets bound"):
            points["sockets"] = at
        elif name == "kernel_info reply":
            points["reply"] = at
    return points


def stages(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stages of a start (they add up to the whole), median ms over the runs."""
    out = []
    for title, since, until in STAGES:
        values = []
        for rec in records:
            points = _points(rec)
            begin = points.get(since or "start")
            end = points.get(until)
            if begin is not None and end is not None:
                values.append((end - begin) * 1e3)
        if values:
            out.append(
                {
                    "stage": title,
                    "median_ms": statistics.median(values),
                    "min_ms": min(values),
                    "max_ms": max(values),
                    "runs": len(values),
                }
            )
    return out


def print_stages(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        print(
            f"    {row['stage']:<56} {row['median_ms']:7.1f}  "
            f"({row['min_ms']:.0f}-{row['max_ms']:.0f})"
        )


def print_phases(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        indent = "  " * (row["depth"] + 1)
        label = f"{indent}{row['name']}"
        if row["count"] > 1:
            label += f" (x{row['count']:g})"
        if row["duration_ms"] > 0:
            print(
                f"{label:<62} {row['begin_ms']:7.1f} -> {row['end_ms']:7.1f}  "
                f"({row['duration_ms']:.1f})"
            )
        else:
            print(f"{label:<62} {row['begin_ms']:7.1f}")

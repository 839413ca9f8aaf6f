"""Malformed and hostile requests against the sandbox service, sent as an ordinary account.

Run as a script by a test account (``python service_fuzz.py SOCKET``, or ``KS_FUZZ_SOCKET``
set). Every case opens its own connection and sends what no client of ours sends: garbage,
oversized or deeply nested lines, non-objects, unknown operations, every field of ``start``
of a wrong type, descriptors that are not readable directories or too many of them,
connections that stall, trickle or hang up halfway, kernel ids that try to leave the state
directory, 64 KiB strings. Each outcome is ``error`` (an error reply), ``dropped`` (closed
without a reply), ``not mounted`` (a workspace refused: the kernel started without it, as in
direct mode, and is removed), ``ok`` (a successful reply: a finding) or ``hang`` (no answer
within the service's own timeout plus slack: a finding). Prints one JSON object: the counts,
the findings and how long the service took to drop stalled and trickling connections. Standard
library only.
"""

from __future__ import annotations

import array
import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

REQUEST_TIMEOUT = 10.0  # the service's (kernel_sandbox.service.protocol)
MAX_REQUEST = 256 * 1024
WAIT = REQUEST_TIMEOUT + 8.0  # longest a case waits for the service to answer or hang up
BIG = "A" * 65536

Case = tuple[str, Callable[[str], str]]


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(path)
    return sock


def _outcome(sock: socket.socket) -> str:
    """Read the reply: error / dropped / ok / hang."""
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return "hang"
    except OSError:  # reset: the service hung up on a request it would not read
        return "dropped"
    finally:
        sock.close()
    if not data:
        return "dropped"
    try:
        reply = json.loads(data)
    except ValueError:
        return f"garbled reply {data[:80]!r}"
    if isinstance(reply, dict) and reply.get("ok") is False and "error" in reply:
        return "error"
    note = b"the workspace is not mounted" in data
    return f"ok {data[:200]!r}" + (" (the workspace is not mounted)" if note else "")


def send_bytes(payload: bytes, fds: list[int] | None = None) -> Callable[[str], str]:
    def case(path: str) -> str:
        sock = _connect(path)
        try:
            if fds:
                sock.sendmsg(
                    [payload],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
                )
            else:
                sock.sendall(payload)
        except OSError:
            pass  # the service stopped reading (too long): what it answered, if anything
        return _outcome(sock)

    return case


def send_json(request: Any, fds: list[int] | None = None) -> Callable[[str], str]:
    return send_bytes(json.dumps(request).encode() + b"\n", fds)


def workspace_case(request: dict[str, Any], fd: int) -> Callable[[str], str]:
    """A start whose workspace descriptor must not be mounted. As in direct mode with a
    workspace no sandbox may see, the service may start the kernel without it and say so (a
    note): the kernel is then removed here and the outcome is ``not mounted``."""
    send = send_json(request, [fd])

    def case(path: str) -> str:
        outcome = send(path)
        if outcome.startswith("ok") and "the workspace is not mounted" in outcome:
            send_json({"op": "cleanup", "kernel_id": request["kernel_id"]})(path)
            return "not mounted"
        return outcome

    return case


def hang_up_midway(payload: bytes) -> Callable[[str], str]:
    def case(path: str) -> str:
        sock = _connect(path)
        sock.sendall(payload)
        sock.close()
        return "dropped"  # nothing to read: the case is that the service survives it

    return case


def fds_in_pieces(count: int, pieces: int) -> Callable[[str], str]:
    """``pieces`` messages of ``count`` descriptors each, the line in the last one."""

    def case(path: str) -> str:
        sock = _connect(path)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(count)]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            for i in range(pieces):
                sock.sendmsg([b'{"op": "hello"}\n' if i == pieces - 1 else b" "], rights)
        except OSError:
            pass
        finally:
            for fd in fds:
                os.close(fd)
        return _outcome(sock)

    return case


def start(**fields: Any) -> dict[str, Any]:
    """A ``start`` request that would be valid but for what ``fields`` change."""
    request: dict[str, Any] = {
        "op": "start",
        "kernel_id": f"fuzz-{random.getrandbits(48):012x}",
        "kernelspec": {
            "name": "python3-sandbox",
            "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        },
        "config": {"profile": "strict"},
        "cwd": "/tmp",
        "env": {},
        "extra_arguments": [],
        "folders": [],
        "restart": False,
    }
    for dotted, value in fields.items():
        target = request
        *parents, last = dotted.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    return request


# Wrong values for each field of start: none of them is a value a client of ours sends.
WRONG = {
    "kernel_id": [5, None, [], {}, "", "../x", "a/b", "..", ".", "x" * 65, BIG, "k\x00", "k id"],
    "kernelspec": [5, "python3-sandbox", [], None, True],
    "kernelspec.name": [5, None, [], {}, "", BIG, True],
    "kernelspec.argv": [5, "python", [], [1, 2], None, {"a": "b"}, [BIG] * 2],
    "kernelspec.env": [5, "x", ["A=b"], {"A": 5}, {"A": None}],
    "kernelspec.display_name": [5, [], {}, BIG],
    "kernelspec.language": [5, [], {}, BIG],
    "config": [5, "strict", ["profile"], True],
    "config.profile": [5, [], {}, "no-such-profile", BIG],
    "config.user": ["0", "0:0", 0, "root"],
    "config.memory_limit": ["lots", [], {}, -1, "1p", True],
    "config.cpu_limit": ["many", [], -1.0, 1e300],
    "config.mounts": [5, {}, ["/etc:/etc:rw"], ["/:/host"], [BIG]],
    "config.workspace": [5, "rwx", []],
    "config.network": [5, "host", "bridge"],
    "config.runtime": [5, "runc --privileged", []],
    # (names of the right type the operator has not granted are the rules' to refuse)
    "config.datasets": [5, {"x": 5}, [5], True],
    "config.egress": [5, {}, [5]],
    "config.no_such_key": [1, "x"],
    "cwd": [5, [], {}, BIG],
    "env": [5, "A=b", ["A=b"], {"A": 5}, {"LD_PRELOAD": None}],
    "extra_arguments": [5, "--x", [5], {}],
    "folders": [5, "x", [{"for": "workspace"}], {}, [5]],
    "restart": ["yes", 5, [], {}],
}


def cases(own_file: str) -> Iterator[Case]:
    rng = random.Random(15)
    for i in range(15):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
        yield f"garbage {i}", send_bytes(garbage.replace(b"\n", b"") + b"\n")
    yield "garbage without a newline, then hang up", hang_up_midway(b"\x00\xff" * 500)
    yield "invalid UTF-8 in JSON", send_bytes(b'{"op": "hello\xff\xfe"}\n')
    yield "a line over 256 KiB", send_bytes(b'{"op":"hello","x":"' + b"A" * (MAX_REQUEST + 10))
    yield "1 MiB without a newline", send_bytes(b"B" * (4 * MAX_REQUEST))
    yield "a line of exactly the limit", send_bytes(b" " * MAX_REQUEST + b'{"op":"hello"}\n')
    yield "a NUL-filled line", send_bytes(b"\x00" * 100000 + b"\n")
    yield "deep arrays", send_bytes(b"[" * 100000 + b"]" * 100000 + b"\n")
    yield "deep objects", send_bytes(b'{"a":' * 40000 + b"1" + b"}" * 40000 + b"\n")
    deep = b'{"a":' * 30000 + b"1" + b"}" * 30000
    yield "deep config in start", send_bytes(b'{"op":"start","config":' + deep + b"}\n")
    yield "unbalanced deep", send_bytes(b"[" * 200000 + b"\n")
    for value in ("[]", "1", '"hello"', "null", "true", "1.5", '[{"op":"hello"}]', "NaN", "-0"):
        yield f"non-object {value}", send_bytes(value.encode() + b"\n")
    yield "two objects on a line", send_bytes(b'{"op":"hello"}{"op":"hello"}\n')
    for op in (5, None, [], {}, "", "HELLO", "shutdown", "exec", "__init__", "hello\x00", BIG):
        yield f"unknown op {str(op)[:20]!r}", send_json({"op": op})
    yield "no op", send_json({"kernel_id": "x"})
    yield "op not served", send_json({"op": "egress_decide", "id": "x", "allow": True})
    for field, values in WRONG.items():
        for value in values:
            yield f"start {field}={str(value)[:24]!r}", send_json(start(**{field: value}))
    for op in ("poll", "signal", "cleanup", "adopt", "stop"):
        for kernel_id in ("../../etc/passwd", "a/b", "..", "", 5, None, BIG, "\u0663" * 3):
            yield (
                f"{op} kernel_id={str(kernel_id)[:20]!r}",
                send_json({"op": op, "kernel_id": kernel_id, "signum": 9}),
            )
    for signum in ("9", 9.5, 0, 65, -1, 2**70, None, True):
        yield (
            f"signal signum={signum!r}",
            send_json({"op": "signal", "kernel_id": "nope", "signum": signum}),
        )
    # descriptors: files, sockets, O_PATH handles, pipes, a directory opened for writing...
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    home = os.path.expanduser("~")
    descriptors = {
        "a regular file": os.open(own_file, os.O_RDONLY),
        "a socket": left.fileno(),
        "a pipe": read_end,
        "/dev/null": os.open("/dev/null", os.O_RDONLY),
        "O_PATH of /root": os.open("/root", os.O_PATH | os.O_DIRECTORY),
        "O_PATH of /etc": os.open("/etc", os.O_PATH | os.O_DIRECTORY),
        "/ opened read-only": os.open("/", os.O_RDONLY | os.O_DIRECTORY),
        "the home as a whole": os.open(home, os.O_RDONLY | os.O_DIRECTORY),
        "/proc": os.open("/proc", os.O_RDONLY | os.O_DIRECTORY),
    }
    for what, fd in descriptors.items():
        yield (
            f"workspace = {what}",
            workspace_case(start(folders=[{"for": "workspace"}], **{"config.workspace": "rw"}), fd),
        )
        yield (
            f"mount = {what}",
            send_json(
                start(folders=[{"for": "mount", "index": 0}], **{"config.mounts": ["/x:/data:rw"]}),
                [fd],
            ),
        )
    null = descriptors["/dev/null"]
    yield "descriptors with hello", send_json({"op": "hello"}, [null, null])
    yield "descriptors with poll", send_json({"op": "poll", "kernel_id": "x"}, [null])
    yield "a descriptor with no folder", send_json(start(), [null])
    yield (
        "a folder with a bad index",
        send_json(
            start(folders=[{"for": "mount", "index": 7}]), [descriptors["/ opened read-only"]]
        ),
    )
    yield "17 descriptors", send_json({"op": "hello"}, [null] * 17)
    yield "250 descriptors", send_json({"op": "hello"}, [null] * 250)
    yield "10 + 10 descriptors in two messages", fds_in_pieces(10, 2)
    yield "5 descriptors in each of 6 messages", fds_in_pieces(5, 6)
    yield "hang up after half a line", hang_up_midway(b'{"op": "start", "kernel_id": ')
    yield "hang up after the op", hang_up_midway(b'{"op": "hello"')
    yield "hang up with descriptors pending", hang_up_midway(b"{")
    yield "64 KiB keys", send_json({"op": "poll", "kernel_id": "k", BIG: BIG})
    yield "many keys", send_json({"op": "poll", **{str(i): i for i in range(20000)}})
    yield "a long list", send_bytes(b'{"op":"poll","x":[' + b"1," * 100000 + b"1]}\n")


def slow_loris(path: str, count: int, trickle: bool) -> dict[str, Any]:
    """``count`` connections that never finish their line (``trickle``: one byte every 2 s,
    so no single read ever times out); how long until the service dropped them all, and
    whether a hello was answered meanwhile."""
    socks = []
    for _ in range(count):
        sock = _connect(path)
        sock.sendall(b'{"op": "hello", "x": "')
        sock.setblocking(False)
        socks.append(sock)
    started = time.monotonic()
    hello = send_json({"op": "hello"})(path)
    hello_took = time.monotonic() - started
    open_socks = set(socks)
    deadline = started + 4 * REQUEST_TIMEOUT
    next_byte = started + 2.0
    while open_socks and time.monotonic() < deadline:
        for sock in list(open_socks):
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            # a reply (an error for the timeout) or a hang-up: dropped either way
            if data == b"" or data.endswith(b"\n"):
                open_socks.discard(sock)
                sock.close()
        if trickle and time.monotonic() >= next_byte:
            for sock in list(open_socks):
                try:
                    sock.send(b"A")
                except OSError:
                    open_socks.discard(sock)
                    sock.close()
            next_byte += 2.0
        time.sleep(0.05)
    for sock in open_socks:
        sock.close()
    return {
        "connections": count,
        "still_open": len(open_socks),
        "dropped_after": round(time.monotonic() - started, 1),
        "hello_meanwhile": hello,
        "hello_took": round(hello_took, 2),
    }


def main(path: str) -> None:
    own_file = os.path.abspath(__file__) if "__file__" in globals() else "/etc/hostname"
    outcomes: dict[str, list[str]] = {}
    for name, case in cases(own_file):
        try:
            outcome = case(path)
        except OSError as exc:
            outcome = f"client error {exc}"
        kind = outcome if outcome in ("error", "dropped", "not mounted") else "finding"
        outcomes.setdefault(kind, []).append(f"{name}: {outcome}")
    stalled = slow_loris(path, 20, trickle=False)
    trickled = slow_loris(path, 20, trickle=True)
    for name, result in (("stalled", stalled), ("trickled", trickled)):
        dropped = result["connections"] - result["still_open"]
        outcomes.setdefault("dropped", []).extend([f"slow loris ({name})"] * dropped)
        if result["still_open"] or not result["hello_meanwhile"].startswith("ok"):
            outcomes.setdefault("finding", []).append(f"slow loris ({name}): {result}")
    counts = {k: len(v) for k, v in outcomes.items()}
    print(
        json.dumps(
            {
                "counts": counts,
                "total": sum(counts.values()),
                "findings": outcomes.get("finding", []),
                "stalled": stalled,
                "trickled": trickled,
                "after": send_json({"op": "hello"})(path),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ["KS_FUZZ_SOCKET"])

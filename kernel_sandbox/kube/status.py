"""What a kernel pod's status says: running, ended, or stuck and why. Pure functions.

The API server reports a pod that cannot start in several places (the scheduler's condition,
the kubelet's waiting reasons, a terminated state); :func:`read_status` gathers them in one
:class:`PodState` and :func:`start_problem` words the ones that will not fix themselves, so that
a start fails at once with the cluster's own reason instead of hanging until the timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernel_sandbox.kube.seccomp import INSTALL_HINT

__all__ = ["FATAL_WAITING", "PodState", "read_status", "start_problem", "timeout_message"]

# Waiting reasons that do not resolve by waiting (a pull that failed once is retried with
# back-off, but an image that is not there stays missing for the whole launch timeout).
FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class PodState:
    """A kernel pod as the API server describes it."""

    phase: str  # Pending, Running, Succeeded, Failed, Unknown ("" when gone)
    pod_ip: str = ""
    uid: str = ""
    node: str = ""
    running: bool = False  # the kernel's container is running
    exit_code: int | None = None  # set once the container has ended
    reason: str = ""  # the container's waiting or terminated reason (OOMKilled, ...)
    message: str = ""  # the kubelet's or scheduler's message
    unschedulable: str = ""  # the scheduler's message while it cannot place the pod
    deleting: bool = False  # a deletion is under way

    @property
    def ended(self) -> bool:
        return self.exit_code is not None or self.phase in ("Succeeded", "Failed", "")

    @property
    def oom_killed(self) -> bool:
        return self.reason == "OOMKilled"


def read_status(pod: dict[str, Any] | None) -> PodState:
    """A pod object (JSON from the API, or None when it is gone) as a :class:`PodState`."""
    if not pod:
        return PodState(phase="", exit_code=-1, reason="gone", message="the pod no longer exists")
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    unschedulable = ""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            unschedulable = condition.get("message") or condition.get("reason") or "unschedulable"
    running, exit_code, reason, message = False, None, "", status.get("message") or ""
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if "running" in state:
            running = True
        elif "terminated" in state:
            ended = state["terminated"]
            exit_code = int(ended.get("exitCode", -1))
            reason, message = ended.get("reason") or "", ended.get("message") or message
        elif "waiting" in state:
            waiting = state["waiting"]
            reason, message = waiting.get("reason") or "", waiting.get("message") or message
    return PodState(
        phase=status.get("phase") or "Unknown",
        pod_ip=status.get("podIP") or "",
        uid=meta.get("uid") or "",
        node=spec.get("nodeName") or "",
        running=running,
        exit_code=exit_code,
        reason=reason,
        message=message,
        unschedulable=unschedulable,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def start_problem(name: str, image: str, state: PodState, logs: str = "") -> str | None:
    """Why pod ``name`` will not start its kernel (one message with the cluster's reason and
    what to do), or None while it still may."""
    if state.reason in FATAL_WAITING:
        hint = ""
        if "Image" in state.reason:
            hint = (
                f" The image {image} must be on the node or in a registry it can pull from "
                "(kernel-sandbox image build, then push it or load it on every node; "
                "c.DockerSandboxProvisioner.kube_image_pull_policy says when it is pulled)."
            )
        elif "seccomp profile" in state.message:
            hint = f" The node lacks the pod's seccomp profile: {INSTALL_HINT}."
        return f"kernel pod {name} cannot start: {state.reason}: {state.message}.{hint}"
    if state.exit_code is not None or state.phase in ("Succeeded", "Failed", ""):
        how = (
            "was killed: out of memory"
            if state.oom_killed
            else f"ended ({state.reason or state.phase or 'gone'}, exit status {state.exit_code})"
        )
        tail = "\n".join(logs.splitlines()[-10:]) or "(it printed nothing)"
        return f"kernel pod {name} (image {image}) {how} during start. Last log lines:\n{tail}"
    return None


def timeout_message(name: str, image: str, state: PodState, timeout: float) -> str:
    """What a start that ran out of time was waiting for."""
    if state.unschedulable:
        why = f"the scheduler cannot place it: {state.unschedulable}"
    elif state.phase == "Pending":
        why = f"it is still pending ({state.reason or 'not started'}{': ' if state.message else ''}"
        why += f"{state.message})"
    else:
        why = "its kernel did not answer on its ports"
    return (
        f"kernel pod {name} (image {image}) did not start within {timeout:.0f}s: {why}. "
        "Raise c.DockerSandboxProvisioner.launch_timeout, or see `kubectl describe pod "
        f"{name}`."
    )

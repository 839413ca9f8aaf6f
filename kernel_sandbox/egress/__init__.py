"""Egress by allowlist, decided outside the sandbox.

A kernel whose policy says ``network: allowlist`` still has no interface but loopback. Its
only way out is a proxy on the host, one process per kernel, reached through a unix socket
in the kernel's runtime directory and a bridge on the container's loopback:

- :mod:`.rules`: the allowlist patterns and the decision (pure functions);
- :mod:`.proxy`: the proxy process (decisions, its sockets, the decision log), with
  :mod:`.http` (forwarding and CONNECT tunnels, h11), :mod:`.approvals` (ask mode) and
  :mod:`.config` (what the provisioner hands it);
- :mod:`.service`: how the provisioner starts it and wires the container to it;
- :mod:`.control`: approve-once (pending, approve, deny) for the CLI and front ends.

The in-sandbox half is :mod:`kernel_sandbox.inside.egress_bridge` (standard library only).
"""

from __future__ import annotations

from kernel_sandbox.egress.control import EgressControl, EgressControlError, PendingRequest
from kernel_sandbox.egress.rules import Decision, Rule, Target, TargetError, decide, parse_rule
from kernel_sandbox.egress.service import EgressEndpoint, default_log_path

__all__ = [
    "Decision",
    "EgressControl",
    "EgressControlError",
    "EgressEndpoint",
    "PendingRequest",
    "Rule",
    "Target",
    "TargetError",
    "decide",
    "default_log_path",
    "parse_rule",
]

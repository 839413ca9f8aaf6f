"""The provisioner's own settings: every trait of ``c.DockerSandboxProvisioner`` that is not a
policy key (those come from the policy table, :mod:`kernel_sandbox.policy.traits`), with the
values derived from them.

Kept apart so that :mod:`~kernel_sandbox.provisioner.docker_provisioner` holds only what
jupyter_client calls. Traits of this mixin are configured under the provisioner's name, like
its own.
"""

from __future__ import annotations

from traitlets import Bool, Dict, Float, HasTraits, Instance, Integer, List, Unicode, Union, default

from kernel_sandbox.broker.tokens import default_state_dir
from kernel_sandbox.egress.service import default_log_path
from kernel_sandbox.engine.backend import DockerBackend, shared_backend
from kernel_sandbox.errors import PolicyError
from kernel_sandbox.host.exits import PROCESS_EXITS, ExitRegistry
from kernel_sandbox.host.logfile import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES
from kernel_sandbox.host.logtext import DEFAULT_INTERVAL, DEFAULT_LINES, DEFAULT_RECORDS, LogLimits
from kernel_sandbox.host.reap import PROCESS_SWEEPS, SweepOnce
from kernel_sandbox.host.relay import RelayLimits
from kernel_sandbox.host.rundir import (
    default_root,
)
from kernel_sandbox.host.uids import (
    DEFAULT_CLAIM_DIR,
    DEFAULT_RANGE,
    UidRange,
    check_range,
)
from kernel_sandbox.policy.values import parse_size

__all__ = ["BASE_ENV_ALLOWLIST", "ProvisionerSettings"]

# Host variables a kernel gets without asking: none that could carry a secret.
BASE_ENV_ALLOWLIST = ("JPY_SESSION_NAME",)


class ProvisionerSettings(HasTraits):
    """Where state lives, the collaborators a test may inject, and the host-side bounds (runtime
    directory, uids, host logs, IOPub) of a sandboxed kernel."""

    profile = Unicode("strict", config=True, help="Named policy profile to start from.")
    service = Unicode(
        "",
        config=True,
        help="The sandbox service's socket (kernel-sandbox serve): start kernels through it "
        "instead of talking to the engine. Empty: the kernelspec's 'service' key, else "
        "$KERNEL_SANDBOX_SERVICE, else the default socket if it exists; 'off': never.",
    )
    profiles = Dict(
        config=True,
        help="Extra named profiles (name -> policy values), added to the built-in ones.",
    )
    ceilings = Dict(
        config=True,
        help="Operator ceilings no kernelspec may exceed, e.g. {'memory_limit': '8g'}. "
        "Only settable in Jupyter config, never from a kernelspec.",
    )
    runtime_root = Unicode(
        config=True, help="Directory holding the per-kernel runtime directories (keep it short)."
    )
    runtime_dir_size = Union(
        [Integer(), Unicode()],
        default_value="4m",
        config=True,
        help="Size of the tmpfs that holds the part of a kernel's runtime directory it can "
        "write (/run/kernel-sandbox inside: its sockets and anything it puts there), e.g. "
        "'4m'. Mounted when this process may mount (root); otherwise, or with 0, a plain "
        "directory on the runtime_root's file system (see docs/threat-model.md).",
    )
    uid_range = Unicode(
        DEFAULT_RANGE,
        config=True,
        help="When Jupyter runs as root: the uids ('FIRST-LAST') from which each sandbox gets "
        "one of its own (gid = uid), so per-user kernel limits (inotify, message queues, "
        "processes) are never shared with another sandbox or a host account. Must overlap no "
        "account, group or subordinate id range of the host. '' runs every sandbox as the "
        "image's user 1000:1000. Ignored without root (kernels run as you) "
        "and for a read-write workspace (the kernel runs as its owner).",
    )
    uid_claims = Unicode(
        DEFAULT_CLAIM_DIR,
        config=True,
        help="Directory (root's, mode 0700) of the claim files that keep uid_range's uids one "
        "per running sandbox.",
    )
    launch_timeout = Float(
        60.0, config=True, help="Seconds to wait for the kernel to bind its sockets."
    )
    orphan_timeout = Float(
        30.0,
        config=True,
        help="Seconds a kernel keeps running after its owner process vanished (so a restarted "
        "server can re-adopt it) before it ends itself; 0 disables the in-sandbox watchdog.",
    )
    reap_orphans = Bool(
        True,
        config=True,
        help="Remove sandboxes whose owner process is dead when the first kernel of a process "
        "starts (in the background).",
    )
    env_allowlist = List(
        Unicode(),
        default_value=list(BASE_ENV_ALLOWLIST),
        config=True,
        help="Host variables always passed in (the policy's env_passthrough adds more).",
    )

    iopub_max_message = Union(
        [Integer(), Unicode()],
        default_value="64m",
        config=True,
        help="Largest message a kernel may publish on IOPub (an output, a widget's buffers: "
        "all parts together), e.g. '64m'. The host-side IOPub relay discards a larger one as it "
        "arrives, without holding it, and the notebook shows a notice instead.",
    )
    iopub_rate = Union(
        [Integer(), Unicode()],
        default_value="16m",
        config=True,
        help="Bytes per second of IOPub passed on to clients, e.g. '16m' (a burst of up to "
        "iopub_max_message passes at once). Over it the relay stops reading, so the excess "
        "waits in the kernel's own memory; nothing is dropped. 0: no limit.",
    )
    iopub_hwm = Integer(
        1000,
        config=True,
        help="Messages the IOPub relay queues for each client that does not keep up (its send "
        "high-water mark); past it that client misses messages, as with any ZeroMQ PUB.",
    )
    egress_log = Unicode(
        config=True,
        help="JSON-lines log of every egress decision (default "
        "$XDG_STATE_HOME/kernel-sandbox/egress.jsonl, i.e. ~/.local/state/...).",
    )
    log_lines = Integer(
        DEFAULT_LINES,
        config=True,
        help="Lines one kernel's requests may add to this server's log (data broker, egress "
        "proxy) per log_interval; the rest are counted and summarized in one line. 0: no limit.",
    )
    log_records = Integer(
        DEFAULT_RECORDS,
        config=True,
        help="Records one kernel may add to the audit log and to the egress decision log per "
        "log_interval; the rest are still decided, only counted and summarized in one record "
        "('decision': 'suppressed'). 0: no limit.",
    )
    log_interval = Float(
        DEFAULT_INTERVAL, config=True, help="Seconds over which log_lines and log_records count."
    )
    log_max_bytes = Integer(
        DEFAULT_MAX_BYTES,
        config=True,
        help="Size at which the audit and egress logs rotate (FILE -> FILE.1 -> ...; the hash "
        "chain continues across files); 0: never.",
    )
    log_backups = Integer(
        DEFAULT_BACKUPS,
        config=True,
        help="Rotated audit and egress log files kept (retention); the oldest beyond it is "
        "deleted and its last hash kept in FILE.anchor, so `kernel-sandbox audit verify` holds.",
    )
    egress_port = Integer(
        3128, config=True, help="Port of the egress bridge on the container's loopback."
    )
    egress_upstream_ca = Unicode(
        "",
        config=True,
        help="CA bundle the egress proxy verifies servers against when it adds an "
        "egress_secrets credential (default: the host's trust store).",
    )
    token_db = Unicode(
        config=True,
        help="SQLite file of the data tokens (only their hashes, scope, expiry and revocation; "
        "default ~/.local/share/kernel-sandbox/tokens.sqlite). Host-only: no policy may mount it.",
    )
    audit_log = Unicode(
        config=True,
        help="Hash-chained JSON-lines audit log: every execute request and every data broker "
        "request (default ~/.local/share/kernel-sandbox/audit.jsonl; see docs/audit.md). "
        "Host-only: no policy may mount it.",
    )
    audit_executions = Bool(
        True,
        config=True,
        help="Relay each kernel's shell channel through the host and record every execute "
        "request (its code, who sent it, start, end, status) in the hash-chained audit_log "
        "(see docs/audit.md). False: no shell relay and no execution records.",
    )
    audit_code_limit = Integer(
        64 * 1024,
        config=True,
        help="Characters of a request's code kept in its audit record (its SHA-256 and length "
        "always cover all of it).",
    )
    audit_client = Unicode(
        "",
        config=True,
        help="A label for the client driving this process's kernels, in their audit records "
        "(default: worked out from the process and its kernel manager).",
    )
    data_credentials = Unicode(
        "",
        config=True,
        help="Host-only JSON file (mode 0600) mapping source URL prefixes to fsspec storage "
        "options, i.e. the credentials of remote datasets; the keyring (service "
        "'kernel-sandbox') is consulted too. Kernels only ever get a scoped token.",
    )
    data_broker = Instance(
        "kernel_sandbox.broker.DataBroker",
        allow_none=True,
        help="The data broker serving this kernel's datasets (default: the one this process "
        "shares among all its kernels for the same token_db, audit_log and data_credentials).",
    )

    engine = Instance(
        DockerBackend,
        help="The engine the kernel's container runs on (default: the one this process "
        "shares among its kernels). Also used by the orphan sweep.",
    )
    exit_registry = Instance(
        ExitRegistry,
        help="Where the kernel's host resources register to be closed at interpreter exit "
        "(default: this process's registry).",
    )
    orphan_sweeps = Instance(
        SweepOnce,
        help="Which runtime roots were swept for orphans already (default: this process's).",
    )

    _shared_backend: DockerBackend | None = None  # the default, not closed with the kernel

    @default("engine")
    def _default_engine(self) -> DockerBackend:
        self._shared_backend = shared_backend()
        return self._shared_backend

    @default("exit_registry")
    def _default_exit_registry(self) -> ExitRegistry:
        return PROCESS_EXITS

    @default("orphan_sweeps")
    def _default_orphan_sweeps(self) -> SweepOnce:
        return PROCESS_SWEEPS

    @default("token_db")
    def _default_token_db(self) -> str:
        return str(default_state_dir() / "tokens.sqlite")

    @default("audit_log")
    def _default_audit_log(self) -> str:
        return str(default_state_dir() / "audit.jsonl")

    @default("runtime_root")
    def _default_runtime_root(self) -> str:
        return default_root()

    @default("egress_log")
    def _default_egress_log(self) -> str:
        return default_log_path()

    def checked_uid_range(self) -> UidRange | None:
        """The ``uid_range`` trait, checked against the host's ids (None: off).

        Raises:
            PolicyError: malformed, or overlapping an account, group or subordinate range.
        """
        if not self.uid_range.strip():
            return None
        uid_range = UidRange.parse(self.uid_range, "c.DockerSandboxProvisioner.uid_range")
        check_range(uid_range)
        return uid_range

    @property
    def relay_limits(self) -> RelayLimits:
        """The ``iopub_*`` traits.

        Raises:
            PolicyError: a size that is not one.
        """
        try:
            max_message = parse_size("iopub_max_message", self.iopub_max_message)
            rate = 0 if self.iopub_rate in (0, "0") else parse_size("iopub_rate", self.iopub_rate)
        except PolicyError as exc:
            raise PolicyError(f"c.DockerSandboxProvisioner.{exc}") from exc
        if self.iopub_hwm < 1:
            raise PolicyError(
                f"c.DockerSandboxProvisioner.iopub_hwm: at least 1, got {self.iopub_hwm}"
            )
        return RelayLimits(max_message, rate, self.iopub_hwm)

    def runtime_dir_bytes(self) -> int | None:
        """The ``runtime_dir_size`` trait in bytes (None: no tmpfs).

        Raises:
            PolicyError: it is not a size.
        """
        value = self.runtime_dir_size
        if value in (0, "0", ""):
            return None
        try:
            return parse_size("runtime_dir_size", value)
        except PolicyError as exc:
            raise PolicyError(f"c.DockerSandboxProvisioner.{exc}") from exc

    @property
    def log_limits(self) -> LogLimits:
        """The ``log_*`` traits, for the broker and the egress proxy."""
        return LogLimits(
            self.log_lines,
            self.log_records,
            self.log_interval,
            self.log_max_bytes,
            self.log_backups,
        )

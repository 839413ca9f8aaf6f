"""The data broker: host-side service that serves datasets to sandboxed kernels by token.

::

    kernel (container)                          owner process (host)
    data.open("sales/x.csv")                    DataBroker thread (asyncio)
      token file  /run/kernel-sandbox/data-token  ├── TokenStore   tokens.sqlite (hashes)
      socket      /run/kernel-sandbox/data.sock ──┤── AuditLog     audit.jsonl
                                                  ├── Credentials  host file / keyring
                                                  └── sources      local dir | fsspec URL

Modules: :mod:`.server` (the broker), :mod:`.protocol` (framing, refusals), :mod:`.sources`
(path checks, local and remote sources, credentials), :mod:`.audit` (JSON lines).
"""

from kernel_sandbox.broker.audit import AuditLog
from kernel_sandbox.broker.server import DataBroker, shared_broker
from kernel_sandbox.broker.sources import Credentials

__all__ = ["AuditLog", "Credentials", "DataBroker", "shared_broker"]

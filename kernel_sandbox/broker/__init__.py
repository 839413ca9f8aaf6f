"""The data broker: host-side service that serves datasets to sandboxed kernels by token.

::

    kernel (container)                               owner process (host)
    data.open("sales/x.csv")                         DataBroker thread (asyncio)
      token file  /run/kernel-sandbox-host/data-token  ├── TokenStore   tokens.sqlite (hashes)
      socket      /run/kernel-sandbox-host/data.sock ──┤── AuditLog     audit.jsonl
                                                       ├── Credentials  host file / keyring
                                                       └── sources      local dir | fsspec URL

(``/run/kernel-sandbox-host`` is the runtime directory's read-only host part; links of the
same names in ``/run/kernel-sandbox`` point there, for images built before it existed.)

Modules: :mod:`.server` (the broker: its thread, a socket per kernel), :mod:`.operations`
(one request checked, served and audited), :mod:`.protocol` (framing, refusals),
:mod:`.tokens` (SQLite records), :mod:`.staging` (token file and socket put in place),
:mod:`.sources` (what a source is, which one a dataset names) with :mod:`.paths` (path
checks), :mod:`.roots` (local roots pinned at grant time), :mod:`.local`, :mod:`.remote`
and :mod:`.credentials`, and :mod:`.audit` (JSON lines).
"""

from kernel_sandbox.broker.audit import AuditLog
from kernel_sandbox.broker.server import DataBroker, shared_broker
from kernel_sandbox.broker.sources import Credentials

__all__ = ["AuditLog", "Credentials", "DataBroker", "shared_broker"]

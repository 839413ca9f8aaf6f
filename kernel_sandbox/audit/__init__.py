"""The host-side audit: what ran in each sandboxed kernel, in hash-chained JSON lines.

``chain.py`` appends chained records (several processes, rotation and retention without a
break), ``verify.py`` checks a chain from its anchor to its head, ``trail.py`` is how a
component records an event, ``executions.py`` turns a kernel's shell traffic (from
:mod:`kernel_sandbox.host.shell_relay`) into execute records, ``show.py`` reads them back for
``kernel-sandbox audit``. See docs/audit.md.
"""

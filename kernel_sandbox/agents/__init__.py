"""Agents first-class: ``kernel-sandbox mcp``, an MCP server giving each agent session its own
sandboxed kernel (``server.py`` the tools, ``sessions.py`` a kernel per session, ``kernel.py``
running code in it, ``outputs.py`` its results, ``workspace.py`` the file tools' safe walk,
``options.py`` the operator's settings, ``transports.py`` stdio and HTTP with an optional
bearer token). Needs the ``agents`` extra (the ``mcp`` SDK)."""

"""The sandbox service (``kernel-sandbox serve``): one trusted process owns the engine.

On a shared machine, whoever talks to the Docker engine is root. The service is the one
process that does; users' Jupyter servers and CLIs ask it over a unix socket, and it decides
from who they are (``SO_PEERCRED``, :mod:`.callers`) and the operator's policy file
(:mod:`.rules`) what they may start, mount and see. See docs/service.md.
"""

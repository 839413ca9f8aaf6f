"""A kernel's host-side resources (resources.py, with the one close) and their parts: runtime
directory, owner and lifeline, monitor, exit registry, orphan reaper."""

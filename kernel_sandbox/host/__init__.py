"""A kernel's host-side resources: runtime directory, owner and lifeline, monitor, reaper."""

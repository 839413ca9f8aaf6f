"""Batch execution of notebooks (``kernel-sandbox run``), each in its own fresh kernel."""

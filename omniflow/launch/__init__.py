"""Launchers place and supervise node processes. `local` runs a graph on this machine."""

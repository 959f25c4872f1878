"""Integration tests against real daemons on loopback (see services.py)."""

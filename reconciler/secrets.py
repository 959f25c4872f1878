"""Resolve `env:NAME` / `file:PATH` secret references at the moment a driver needs them.

Secrets never live in the model, plans, logs or output: only the reference does.
"""

from __future__ import annotations

import os
from pathlib import Path


class SecretError(RuntimeError):
    """A secret reference that cannot be resolved (the message never shows a value)."""


def resolve_secret(ref: str) -> str:
    kind, _, name = ref.partition(":")
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"secret {ref}: environment variable {name} is not set")
        return value
    if kind == "file":
        path = Path(name)
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise SecretError(f"secret {ref}: cannot read {path}: {exc.strerror}") from None
    raise SecretError(f"secret reference {ref!r} must start with env: or file:")


def describe_secret(ref: str | None) -> str:
    """For output: which reference, and whether it resolves; never the value."""
    if ref is None:
        return "(not set)"
    try:
        resolve_secret(ref)
    except SecretError:
        return f"{ref} (unresolved)"
    return f"{ref} (set)"

"""A rental provider plug-in whose dependency is missing (tests of the registry's errors)."""

from mailrec_no_such_dependency import Client  # type: ignore[import-not-found]  # noqa: F401

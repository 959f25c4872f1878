"""`python -m reconciler` is the `mailrec` command."""

from reconciler.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

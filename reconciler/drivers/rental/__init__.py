"""Rental (hosted mail service) providers: see `base.py` for the workflow."""

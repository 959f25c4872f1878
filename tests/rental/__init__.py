"""Tests of the rental providers (registry, lab, manual) and the lab rental SMTP server."""

"""Fixtures of the aux-layer tests (helpers live in aux_helpers.py, importable by name)."""

from aux_helpers import utm_parent  # noqa: F401  (re-exported as a fixture)

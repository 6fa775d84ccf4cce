"""Parity tests against the official code (a package so that its conftest does not shadow tests/conftest.py)."""

"""Preparers: turn a download (or a generator) into a prepared folder (see data/prepared.py)."""

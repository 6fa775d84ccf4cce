"""Training methods: one small module each on the shared engine (contract: methods/base.py; discovery and
construction: methods/registry.py; losses: methods/losses.py)."""

"""Training methods: one small module each on the shared engine (see methods/base.py)."""

from textseg_cli.methods.base import Batch, Method, StepContext, build_method, list_methods, register_method

__all__ = ["Batch", "Method", "StepContext", "build_method", "list_methods", "register_method"]

"""Adapters: the production implementations of the core's ports."""

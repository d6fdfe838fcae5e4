"""Ceph adapters (librados / librbd)."""

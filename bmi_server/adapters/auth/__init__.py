"""Authenticators: who a caller is, from the credentials it presented."""

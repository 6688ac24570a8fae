"""Dependency-free leaves every package shares: the error contract, the per-request record,
and the shapes a response relay hands to its filters and taps. Imports nothing from sidecar."""

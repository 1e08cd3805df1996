"""Shim manager: launching per-pod shims and driving them over the shim v2 task API."""

"""Pieces every shimd shim process shares: ttrpc, a small protobuf codec, logging, reaping, stdio.

Nothing here imports shimd.* or third-party packages: shims are long-lived, one per pod, so every
megabyte of resident memory counts.
"""

"""Domain errors shared by every layer below the CRI servers.

They carry no transport knowledge: the CRI layer maps each class to a gRPC status. Messages name
the offending field or object, because they reach kubelet/crictl users verbatim.
"""

from __future__ import annotations


class ShimdError(Exception):
    """Base class; unexpected failures (INTERNAL) use it directly."""


class InvalidArgument(ShimdError):
    pass


class NotFound(ShimdError):
    pass


class AlreadyExists(ShimdError):
    pass


class FailedPrecondition(ShimdError):
    pass


class DeadlineExceeded(ShimdError):
    pass


class ResourceExhausted(ShimdError):
    pass


class Unavailable(ShimdError):
    pass

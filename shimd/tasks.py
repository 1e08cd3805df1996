"""Waiting for work that must run to its end even when the caller is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def settle(fut: asyncio.Future[Any]) -> None:
    """Returns once fut has ended, however it ended; never raises.

    fut is shielded from the caller's cancellations (each one is absorbed and the wait goes on: the work
    cannot be stopped half way, and what comes after must find all of it done), and its outcome is
    retrieved, so asyncio never logs it as unretrieved. A caller that was cancelled re-raises after."""
    while not fut.done():
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(fut)
    if not fut.cancelled():
        fut.exception()

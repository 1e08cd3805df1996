"""PodService's bound on pod starts in their first step (FIRST_STEP_SLOTS): how many, in which order, and
that no way out of a start (early release, failure, cancellation while waiting) loses or doubles a slot."""

from __future__ import annotations

import asyncio

import pytest

from shimd.pods.service import PodService


def service(slots: int) -> PodService:
    svc = object.__new__(PodService)  # only the gate is exercised
    svc._first_steps = asyncio.Semaphore(slots)
    return svc


async def test_at_most_the_slots_hold_it_and_the_rest_go_in_arrival_order() -> None:
    svc = service(2)
    inside: list[int] = []
    order: list[int] = []
    most = 0
    gates = [asyncio.Event() for _ in range(6)]

    async def start(i: int) -> None:
        nonlocal most
        async with svc._first_step_slot() as done:
            order.append(i)
            inside.append(i)
            most = max(most, len(inside))
            await gates[i].wait()
            inside.remove(i)
            done()
            done()  # a second call is a no-op
            await asyncio.sleep(0)  # the rest of the start runs without the slot

    tasks = [asyncio.create_task(start(i)) for i in range(6)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == [0, 1]
    for i in range(6):
        gates[i].set()
        for _ in range(3):
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == list(range(6)) and most == 2
    assert svc._first_steps._value == 2  # every slot given back once


async def test_a_failed_or_cancelled_start_gives_its_slot_back() -> None:
    svc = service(1)
    with pytest.raises(RuntimeError):
        async with svc._first_step_slot():
            raise RuntimeError("first record failed")
    assert svc._first_steps._value == 1
    holder_in = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with svc._first_step_slot():
            holder_in.set()
            await release.wait()

    async def waiter() -> None:
        async with svc._first_step_slot():
            pass

    h = asyncio.create_task(holder())
    await holder_in.wait()
    w = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    w.cancel()  # cancelled while waiting: it never held a slot, so it gives none back
    with pytest.raises(asyncio.CancelledError):
        await w
    release.set()
    await h
    assert svc._first_steps._value == 1

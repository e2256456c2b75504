"""Running the engine requests of one HTTP request (the prompts of a completions request) at the same time."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")


class Runnable(Protocol):
    async def run(self) -> None: ...


async def run_all(runs: Sequence[Runnable]) -> None:
    """Runs them all at once; the first failure cancels the others (closing their engine requests) and is raised
    as it is (not wrapped in an ExceptionGroup)."""
    await _all([run.run for run in runs])


class Startable(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


async def start_all(runs: Sequence[Startable]) -> None:
    """Starts them all at once (each until its first output), as `run_all` runs them; after a failure every one
    is closed, so none is left running in the engine."""
    try:
        await _all([run.start for run in runs])
    except BaseException:
        for run in runs:
            await run.close()
        raise


async def _all(calls: Sequence[Callable[[], Awaitable[None]]]) -> None:
    if len(calls) == 1:
        return await calls[0]()
    try:
        async with asyncio.TaskGroup() as group:
            for call in calls:
                group.create_task(call())
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None


async def merge(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of all `iterators` as each produces them, each iterator consumed by its own task. The first
    failure is raised after the others are cancelled; closing the merge closes every iterator."""
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[bool, object]] = asyncio.Queue()  # (an item?, the item | None at the end | error)

    async def pump(iterator: AsyncIterator[T]) -> None:
        try:
            async with aclosing(iterator):
                async for item in iterator:
                    queue.put_nowait((True, item))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((False, exc))
        else:
            queue.put_nowait((False, None))

    tasks = [asyncio.create_task(pump(iterator)) for iterator in iterators]
    try:
        remaining = len(tasks)
        while remaining:
            is_item, value = await queue.get()
            if is_item:
                yield value  # type: ignore[misc]
            elif value is None:
                remaining -= 1
            else:
                raise value  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


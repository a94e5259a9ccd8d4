"""Natural batching of small database writes: whatever queued while the last batch ran goes next.

At low load a batch is one item and adds no wait; under load one round trip carries many items, so
the database cost per request falls as the request rate rises. A batcher given `linger_s` also waits
that long after its first item (the claims 3 ms, the marks 50 ms: services/ingress/idempotency.py).
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    pass


class Batcher(Generic[Item, Result]):
    """Runs `flush(items) -> results` (one result per item, same order) on queued items.

    Up to `workers` batches are in flight at once (each on its own database connection), each at
    most `batch_max` items. A failed flush fails every item of that batch. `linger_s` makes a worker
    wait that long after the first item before it flushes: fewer, larger batches, for writes no one
    waits for or waits short beside what follows them.
    """

    def __init__(self, name: str, flush: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]], *,
                 workers: int = 1, batch_max: int = 500, linger_s: float = 0.0):
        self.name = name
        self._flush = flush
        self._batch_max = batch_max
        self._linger_s = linger_s
        self._queue: deque[tuple[Item, asyncio.Future | None]] = deque()
        self._wakeup = asyncio.Event()
        self._in_flight = 0
        self._tasks = [asyncio.get_running_loop().create_task(self._run(), name=f"{name}-{i}")
                       for i in range(workers)]

    async def submit(self, item: Item) -> Result:
        return await self.enqueue(item)

    def enqueue(self, item: Item) -> asyncio.Future:
        """Queues the item; the returned future settles when its batch has run."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._wakeup.set()
        return future

    def enqueue_and_forget(self, item: Item) -> None:
        """Queues the item with no one to tell: `flush` itself must deal with failure."""
        self._queue.append((item, None))
        self._wakeup.set()

    async def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stops the workers, after letting them empty the queue for up to drain_timeout_s."""
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while (self._queue or self._in_flight) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            _, future = self._queue.popleft()
            if future is not None and not future.done():
                future.set_exception(BatcherClosed(self.name))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self._linger_s:
                    await asyncio.sleep(self._linger_s)
                continue
            batch = [self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))]
            self._in_flight += 1
            try:
                results = await self._flush([item for item, _ in batch])
            except asyncio.CancelledError:
                _fail(batch, BatcherClosed(self.name))
                raise
            except Exception as exc:
                _fail(batch, exc)
                continue
            finally:
                self._in_flight -= 1
            assert len(results) == len(batch), f"{self.name}: {len(results)} results for {len(batch)} items"
            for (_, future), result in zip(batch, results, strict=True):
                if future is not None and not future.done():
                    future.set_result(result)


def _fail(batch: Sequence[tuple[object, asyncio.Future[Any] | None]], exc: BaseException) -> None:
    for _, future in batch:
        if future is not None and not future.done():
            future.set_exception(exc)

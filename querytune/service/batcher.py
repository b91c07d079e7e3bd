"""The batcher: the images of concurrent requests gathered into bounded batches, one model call each. Each request
names the set of tasks (a :class:`MultiTaskServer`) it is answered by; a batch holds requests of one set only."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import torch

from ..serve import MultiTaskServer
from .metrics import Histogram


@dataclass
class _Waiting:
    server: MultiTaskServer
    images: torch.Tensor
    tasks: list[str] | None  # None: all of the server's
    answer: asyncio.Future[dict[str, torch.Tensor]]


class Batcher:
    """Collects the images of concurrent requests into batches for one model call each."""

    def __init__(self, max_batch: int, max_wait_ms: float, sizes: Histogram) -> None:
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.waiting: deque[_Waiting] = deque()
        self.arrived = asyncio.Event()
        self.sizes = sizes  # images of each model call (its count: GET /health's batches)

    async def predict(self, server: MultiTaskServer, images: torch.Tensor,
                      tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Logits of ``server``'s tasks (at least those named in ``tasks``; None: all) for these images (at most
        ``max_batch``), computed in a batch with whatever else waits for the same server: the batch computes the
        tasks its requests ask for together."""
        answer: asyncio.Future[dict[str, torch.Tensor]] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(server, images, tasks, answer))
        self.arrived.set()
        return await answer

    def _waiting_images(self) -> int:
        return sum(len(item.images) for item in self.waiting)

    async def run(self) -> None:
        """Forever: wait for a request, give others ``max_wait`` to join (or the batch to fill), answer them."""
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            deadline = loop.time() + self.max_wait
            while self._waiting_images() < self.max_batch and (left := deadline - loop.time()) > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            if not self.waiting:
                self.arrived.clear()
                continue
            batch = [self.waiting.popleft()]
            while (self.waiting and self.waiting[0].server is batch[0].server
                   and sum(len(i.images) for i in batch) + len(self.waiting[0].images) <= self.max_batch):
                batch.append(self.waiting.popleft())
            if not self.waiting:
                self.arrived.clear()
            self.sizes.observe(sum(len(item.images) for item in batch))
            try:
                asked = [item.tasks for item in batch]
                tasks = None if None in asked else sorted({name for names in asked for name in names or []})
                logits = await asyncio.to_thread(batch[0].server.predict, torch.cat([item.images for item in batch]),
                                                 tasks)
            except Exception as error:  # a model failure fails this batch's requests, not the service
                for item in batch:
                    if not item.answer.done():
                        item.answer.set_exception(error)
                continue
            start = 0
            for item in batch:
                if not item.answer.done():  # a client that went away cancelled its wait
                    item.answer.set_result({name: values[start:start + len(item.images)]
                                            for name, values in logits.items()})
                start += len(item.images)

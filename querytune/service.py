"""``querytune serve``: the multi-task engine (:mod:`querytune.serve`) behind HTTP, on Starlette and uvicorn
(the optional extra ``querytune[serve]``).

    POST /predict[?topk=K&tasks=a,b&logits=1]  images as multipart files or one image as the raw body
    GET  /tasks                                 the tasks: run, method, classes, whether it shares the trunk
    GET  /health                                status, and the batches and images answered so far
    GET  /                                      a page to drop an image on and read every task's answer

Requests arriving together are batched: the first waits at most ``max_wait_ms`` for others, and a batch
holds at most ``max_batch`` images. The model runs in a worker thread, so the server keeps reading
requests meanwhile. Every bad request (empty or oversized body, a body that is not an image, an unknown
task, too many images, a client too slow to send its body) gets a 4xx JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data import load_image
from .errors import ConfigError, QuerytuneError
from .options import check_value, option
from .serve import MultiTaskServer

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

PAGE = Path(__file__).with_name("service.html")


@dataclass
class ServiceLimits:
    """How the service batches and what it accepts (``querytune serve`` flags of the same names)."""

    max_batch: int = option(32, "most images in one trunk pass; requests arriving together share it", min=1)
    max_wait_ms: float = option(5.0, "how long a batch waits for more requests after its first one", min=0)
    max_images: int | None = option(None, "most images in one request (default and at most: --max-batch)", min=1)
    max_body_mb: float = option(20.0, "largest request body, in MB", min=0, min_open=True)
    max_pixels: int = option(40_000_000, "largest image, width x height, decoded", min=1)
    read_timeout: float = option(30.0, "seconds a client may take to send its request", min=0, min_open=True)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_value(ServiceLimits, field, getattr(self, field.name))
        if self.max_images is not None and self.max_images > self.max_batch:
            raise ConfigError(f"--max-images {self.max_images} must be at most --max-batch {self.max_batch}")


class HTTPError(Exception):
    """A bad request: answered with ``status`` and a JSON error, the service goes on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Waiting:
    images: torch.Tensor
    answer: asyncio.Future[dict[str, torch.Tensor]]


class Batcher:
    """Collects the images of concurrent requests into batches for one model call each."""

    def __init__(self, server: MultiTaskServer, max_batch: int, max_wait_ms: float) -> None:
        self.server = server
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.waiting: deque[_Waiting] = deque()
        self.arrived = asyncio.Event()
        self.batches = 0  # model calls so far (GET /health shows it)

    async def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of these images (at most ``max_batch``), computed in a batch with whatever else waits."""
        answer: asyncio.Future[dict[str, torch.Tensor]] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(images, answer))
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
            batch: list[_Waiting] = []
            while self.waiting and sum(len(i.images) for i in batch) + len(self.waiting[0].images) <= self.max_batch:
                batch.append(self.waiting.popleft())
            if not self.waiting:
                self.arrived.clear()
            self.batches += 1
            try:
                logits = await asyncio.to_thread(self.server.predict, torch.cat([item.images for item in batch]))
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


def create_app(server: MultiTaskServer, limits: ServiceLimits | None = None) -> Starlette:
    """The Starlette app answering ``server``'s tasks."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse
        from starlette.routing import Route
    except ImportError as error:
        raise ConfigError("the HTTP service needs its extra: pip install querytune[serve]") from error

    limits = limits or ServiceLimits()
    batcher = Batcher(server, limits.max_batch, limits.max_wait_ms)
    names = [task.name for task in server.tasks]
    max_body = int(limits.max_body_mb * 1e6)
    max_images = limits.max_images or limits.max_batch
    answered = {"images": 0}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise HTTPError(413, f"body of {int(declared)} bytes is larger than the {max_body} allowed")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise HTTPError(413, f"body larger than the {max_body} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_files(request: Request, kind: str) -> list[tuple[str, bytes]]:
        body = await read_body(request)
        if not body:
            raise HTTPError(400, "empty body: no image")
        if kind != "multipart/form-data":
            return [("body", body)]
        replay = Request(request.scope, _replay(body))  # the form parser reads the body already held
        form = await replay.form(max_part_size=max_body)  # the count of files is checked once they are read
        files = [(value.filename or key, await value.read())
                 for key, value in form.multi_items() if not isinstance(value, str)]
        await form.close()
        if not files:
            raise HTTPError(400, "no file in the multipart form")
        return files

    async def uploaded(request: Request) -> list[tuple[str, bytes]]:
        """The request's images as (name, bytes): multipart file parts, or the whole body."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("multipart/form-data", "application/octet-stream") and not kind.startswith("image/"):
            raise HTTPError(415, f"content type {kind or 'none'!r}: send multipart/form-data files, or one image "
                                 "as the body (image/* or application/octet-stream)")
        try:
            return await asyncio.wait_for(read_files(request, kind), limits.read_timeout)
        except asyncio.TimeoutError as error:
            raise HTTPError(408, f"the request took longer than {limits.read_timeout:g} s to arrive") from error

    def query(request: Request) -> tuple[int, list[str], bool]:
        params = request.query_params
        topk = params.get("topk", "1")
        if not topk.isdigit() or int(topk) < 1:
            raise HTTPError(400, f"topk {topk!r}: must be a positive integer")
        chosen = [name for name in params.get("tasks", "").split(",") if name] or names
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise HTTPError(404, f"unknown task {unknown[0]!r} (served: {', '.join(names)})")
        return int(topk), chosen, params.get("logits", "0").lower() in ("1", "true", "yes")

    async def predict(request: Request) -> Response:
        topk, chosen, with_logits = query(request)
        files = await uploaded(request)
        if len(files) > max_images:
            raise HTTPError(413, f"{len(files)} images in one request, more than the {max_images} allowed")

        def preprocess() -> torch.Tensor:
            return torch.stack([server.preprocess(load_image(data, name, limits.max_pixels))
                                for name, data in files])

        try:
            images = await asyncio.to_thread(preprocess)
        except QuerytuneError as error:
            raise HTTPError(400, str(error)) from error
        logits = await batcher.predict(images)
        records = server.records({name: logits[name] for name in chosen}, topk, with_logits)
        answered["images"] += len(files)
        return JSONResponse({"images": [{"name": name, **record} for (name, _), record in zip(files, records)]})

    async def tasks(request: Request) -> Response:
        return JSONResponse({"image_size": server.preprocess.image_size,
                             "tasks": [{"name": task.name, "method": task.method.name,
                                        "num_classes": task.method.num_classes,
                                        "classes": list(task.classes) if task.classes else None,
                                        "shares_trunk": task.shares_trunk} for task in server.tasks]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "tasks": len(server.tasks), "batches": batcher.batches,
                             "images": answered["images"]})

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text())

    async def bad_request(request: Request, error: Exception) -> Response:
        status = error.status if isinstance(error, HTTPError) else getattr(error, "status_code", 500)
        return JSONResponse({"error": str(error) if isinstance(error, HTTPError) else getattr(error, "detail", "")},
                            status_code=status)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    routes = [Route("/", page), Route("/predict", predict, methods=["POST"]), Route("/tasks", tasks),
              Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPError: bad_request, HTTPException: bad_request})


def serve(server: MultiTaskServer, host: str, port: int, limits: ServiceLimits | None = None) -> None:
    """Serve until interrupted."""
    try:
        import uvicorn
    except ImportError as error:
        raise ConfigError("the HTTP service needs its extra: pip install querytune[serve]") from error
    uvicorn.run(create_app(server, limits), host=host, port=port, log_level="warning")


def _replay(body: bytes) -> Any:
    """An ASGI ``receive`` that hands over ``body`` once."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive

"""The Starlette app of ``querytune serve`` (:func:`create_app`) and the uvicorn server around it (:func:`serve`):
the routes, reading and checking a request's images, and the page at ``/``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, QuerytuneError
from ..serve import MultiTaskServer
from .access import Gate, ServiceAccess
from .batcher import Batcher
from .images import DecodeBudget, decode, decoded_bytes
from .limits import ServiceLimits
from .live import LiveRuns, say_on_stderr
from .metrics import Metrics

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

PAGE = Path(__file__).with_name("service.html")


class HTTPError(Exception):
    """A bad request: answered with ``status`` and a JSON error, the service goes on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(runs: MultiTaskServer | LiveRuns, limits: ServiceLimits | None = None,
               access: ServiceAccess | None = None, poll_seconds: float = 2.0) -> Starlette:
    """The Starlette app answering the tasks of ``runs`` (to anyone, unlogged, unless ``access`` says otherwise): a
    fixed server's, or the runs of a live folder, scanned every ``poll_seconds`` and on ``POST /admin/reload``."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
        from starlette.routing import Route
    except ImportError as error:
        raise ConfigError("the HTTP service needs its extra: pip install querytune[serve]") from error
    from .connections import ConnectionGuard

    limits = limits or ServiceLimits()
    access = access or ServiceAccess()
    live = runs if isinstance(runs, LiveRuns) else None
    metrics = Metrics(limits.max_batch)
    guard = ConnectionGuard(limits, metrics)
    budget = DecodeBudget(int(limits.max_decode_inflight_mb * 1e6))
    max_decoded = int(limits.max_decode_mb * 1e6)
    batcher = Batcher(limits.max_batch, limits.max_wait_ms, metrics.batch_images)
    max_body = int(limits.max_body_mb * 1e6)
    max_images = limits.max_images or limits.max_batch

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

    def served() -> MultiTaskServer | None:
        """The set of tasks served now; a request keeps the one it started with."""
        return runs.current if isinstance(runs, LiveRuns) else runs

    def query(request: Request, names: list[str]) -> tuple[int, list[str], bool]:
        params = request.query_params
        topk = params.get("topk", "1")
        if not topk.isdigit() or int(topk) < 1:
            raise HTTPError(400, f"topk {topk!r}: must be a positive integer")
        chosen = [name for name in params.get("tasks", "").split(",") if name] or names
        request.state.tasks = chosen  # for the access log: what was asked, served or not
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise HTTPError(404, f"unknown task {unknown[0]!r} (served: {', '.join(names)})")
        return int(topk), chosen, params.get("logits", "0").lower() in ("1", "true", "yes")

    async def predict(request: Request) -> Response:
        server = served()
        if server is None:
            raise HTTPError(503, "no task is served yet: no finished run in the runs folder")
        image_size = max(server.preprocess.size)  # the side decoding must cover
        topk, chosen, with_logits = query(request, [task.name for task in server.tasks])
        files = await uploaded(request)
        request.state.images = len(files)
        if len(files) > max_images:
            raise HTTPError(413, f"{len(files)} images in one request, more than the {max_images} allowed")

        def decoded_total() -> int:
            return sum(decoded_bytes(data, name, limits.max_pixels, image_size) for name, data in files)

        def preprocess() -> torch.Tensor:
            return torch.stack([server.preprocess(decode(data, name, limits.max_pixels, image_size))
                                for name, data in files])

        try:
            size = await asyncio.to_thread(decoded_total)  # from the headers, before any decoding
            if size > max_decoded:
                raise HTTPError(413, f"the images take {size / 1e6:.1f} MB decoded, more than the "
                                     f"{limits.max_decode_mb:g} MB allowed (--max-decode-mb)")
            async with budget.hold(size):  # waits while other requests' images take the rest
                images = await asyncio.to_thread(preprocess)
        except QuerytuneError as error:
            raise HTTPError(400, str(error)) from error
        logits = await batcher.predict(server, images, chosen if "tasks" in request.query_params else None)
        records = server.records({name: logits[name] for name in chosen}, topk, with_logits)
        metrics.images += len(files)
        return JSONResponse({"images": [{"name": name, **record} for (name, _), record in zip(files, records)]})

    def described(server: MultiTaskServer | None) -> dict[str, Any]:
        return {"image_size": server.preprocess.image_size if server else None,
                "tasks": [{"name": task.name, "method": task.method.name, "num_classes": task.method.num_classes,
                           "classes": list(task.classes) if task.classes else None,
                           "shares_trunk": task.shares_trunk} for task in (server.tasks if server else [])]}

    async def tasks(request: Request) -> Response:
        return JSONResponse(described(served()))

    async def health(request: Request) -> Response:
        server = served()
        return JSONResponse({"status": "ok", "tasks": len(server.tasks) if server else 0,
                             "batches": metrics.batch_images.count, "images": metrics.images})

    scanning = asyncio.Lock()

    async def reload_now() -> None:
        """The token file and the runs folder read again; what changed is logged."""
        if (said := access.reload()) is not None:
            say_on_stderr(said)
        if live is not None:
            async with scanning:
                await asyncio.to_thread(live.scan)

    async def reload(request: Request) -> Response:
        await reload_now()
        return JSONResponse(described(served()))

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text())

    async def bad_request(request: Request, error: Exception) -> Response:
        status = error.status if isinstance(error, HTTPError) else getattr(error, "status_code", 500)
        return JSONResponse({"error": str(error) if isinstance(error, HTTPError) else getattr(error, "detail", "")},
                            status_code=status)

    async def watch(wake: asyncio.Event) -> None:
        """Forever: read the runs folder (and the token file where woken) again, every ``poll_seconds`` or when
        ``wake`` is set (SIGHUP)."""
        while True:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), poll_seconds)
            if wake.is_set():
                wake.clear()
                await reload_now()
            elif live is not None:
                async with scanning:
                    await asyncio.to_thread(live.scan)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(guard.loop_error)  # failing accepts: a line per interval
        wake = asyncio.Event()
        app.state.reload_soon = lambda: loop.call_soon_threadsafe(wake.set)  # thread- and signal-safe
        workers = [asyncio.create_task(batcher.run()), asyncio.create_task(watch(wake))]
        yield
        for worker in workers:
            worker.cancel()

    routes = [Route("/", page), Route("/predict", predict, methods=["POST"]), Route("/tasks", tasks),
              Route("/health", health), Route("/metrics", metrics_text),
              Route("/admin/reload", reload, methods=["POST"])]
    gate = Middleware(Gate, access=access, metrics=metrics,
                      max_inflight=limits.max_inflight_per_client)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[gate],
                    exception_handlers={HTTPError: bad_request, HTTPException: bad_request})
    app.state.connections = guard  # for service_config
    return app


def service_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for ``app`` (made by :func:`create_app`): HTTP/1.1 over h11 behind the app's connection
    limits (:class:`~.connections.ConnectionGuard`), no WebSocket (the service has none)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=app.state.connections.protocol,
                          ws="none")


def serve(runs: MultiTaskServer | LiveRuns, host: str, port: int, limits: ServiceLimits | None = None,
          access: ServiceAccess | None = None, poll_seconds: float = 2.0) -> None:
    """Serve until interrupted (SIGINT) or told to stop (SIGTERM): the requests in flight are answered first. SIGHUP
    reads the token file and the runs folder again."""
    try:
        import uvicorn
    except ImportError as error:
        raise ConfigError("the HTTP service needs its extra: pip install querytune[serve]") from error
    from .connections import fit_open_files

    limits = fit_open_files(limits or ServiceLimits())
    app = create_app(runs, limits, access, poll_seconds)
    service = uvicorn.Server(service_config(app, host, port))
    signal.signal(signal.SIGHUP, lambda *_: app.state.reload_soon() if hasattr(app.state, "reload_soon") else None)
    # uvicorn drains on SIGTERM, then raises it again once its own handler is gone: then this one ends with exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    with suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C stops the service without a traceback
        service.run()


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

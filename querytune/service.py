"""``querytune serve``: the multi-task engine (:mod:`querytune.serve`) behind HTTP, on Starlette and uvicorn
(the optional extra ``querytune[serve]``).

    POST /predict[?topk=K&tasks=a,b&logits=1]  images as multipart files or one image as the raw body
    GET  /tasks                                 the tasks: run, method, classes, whether it shares the trunk
    GET  /health                                status, and the batches and images answered so far (no token)
    GET  /metrics                               the counts in the Prometheus text format
    GET  /                                      a page to drop an image on and read every task's answer

Requests arriving together are batched: the first waits at most ``max_wait_ms`` for others, and a batch
holds at most ``max_batch`` images. The model runs in a worker thread, so the server keeps reading
requests meanwhile. Every bad request (empty or oversized body, a body that is not an image, an unknown
task, too many images, a client too slow to send its body) gets a 4xx JSON ``{"error": ...}``.

With a token (:class:`ServiceAccess`), every request but ``GET /health`` and the page's own HTML must carry
``Authorization: Bearer <token>`` (else 401); the page asks for the token and sends it with each request it
makes. A client (by address) with ``max_inflight_per_client`` requests unanswered gets 429 for more. Each
request is counted for ``/metrics`` and, given a log, written to it as one JSON line (never its body).
See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import os
import sys
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .data import load_image
from .errors import ConfigError, QuerytuneError, one_line
from .options import check_value, option
from .serve import MultiTaskServer

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

PAGE = Path(__file__).with_name("service.html")
TOKEN_ENV = "QUERYTUNE_TOKEN"
ROUTES = ("/", "/predict", "/tasks", "/health", "/metrics")  # the label values of /metrics (others: "other")
OPEN = (("GET", "/health"), ("GET", "/"))  # answered without a token (the page's HTML holds nothing)
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, Prometheus' defaults


@dataclass
class ServiceLimits:
    """How the service batches and what it accepts (``querytune serve`` flags of the same names)."""

    max_batch: int = option(32, "most images in one trunk pass; requests arriving together share it", min=1)
    max_wait_ms: float = option(5.0, "how long a batch waits for more requests after its first one", min=0)
    max_images: int | None = option(None, "most images in one request (default and at most: --max-batch)", min=1)
    max_body_mb: float = option(20.0, "largest request body, in MB", min=0, min_open=True)
    max_pixels: int = option(40_000_000, "largest image, width x height, decoded", min=1)
    read_timeout: float = option(30.0, "seconds a client may take to send its request", min=0, min_open=True)
    max_inflight_per_client: int = option(16, "most unanswered requests of one client address; more get 429",
                                          min=1)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_value(ServiceLimits, field, getattr(self, field.name))
        if self.max_images is not None and self.max_images > self.max_batch:
            raise ConfigError(f"--max-images {self.max_images} must be at most --max-batch {self.max_batch}")


@dataclass
class ServiceAccess:
    """Who may ask, and where each request is logged (``querytune serve --token-file/--no-auth/--access-log``)."""

    token: str | None = None  # None: anyone who reaches the port is answered
    log: TextIO | None = None  # one JSON line per request

    @classmethod
    def from_options(cls, host: str, token_file: Path | None, no_auth: bool,
                     access_log: str | None) -> ServiceAccess:
        """The token (``token_file``, else env ``QUERYTUNE_TOKEN``) and the opened log (``-``: stderr), checked
        before any model loads: a non-loopback ``host`` without a token is refused unless ``no_auth``."""
        token = read_token(token_file)
        if no_auth and token is not None:
            raise ConfigError(f"--no-auth contradicts the token of {'--token-file' if token_file else TOKEN_ENV}")
        if token is None and not no_auth and not is_loopback(host):
            raise ConfigError(f"--host {host} is reachable from other machines: give a token (--token-file FILE "
                              f"or {TOKEN_ENV}), or --no-auth to answer anyone")
        return cls(token, open_log(access_log))


def read_token(token_file: Path | None) -> str | None:
    """The token in ``token_file`` (a trailing newline stripped), else in env ``QUERYTUNE_TOKEN``, else None."""
    if token_file is not None:
        where = f"--token-file {token_file}"
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as error:
            raise ConfigError(f"{where}: {getattr(error, 'strerror', None) or one_line(error)}") from error
    elif TOKEN_ENV in os.environ:
        where, text = TOKEN_ENV, os.environ[TOKEN_ENV]
    else:
        return None
    token = text.rstrip("\r\n")
    if not token:
        raise ConfigError(f"{where} is empty: it must hold the token")
    if not all("!" <= char <= "~" for char in token):
        raise ConfigError(f"{where}: the token must be printable ASCII without spaces (it is sent in a header)")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def open_log(target: str | None) -> TextIO | None:
    """The access log: None for none, ``-`` for stderr, else the file, appended to line by line."""
    if target is None:
        return None
    if target == "-":
        return sys.stderr
    try:
        return open(target, "a", encoding="utf-8", buffering=1)
    except OSError as error:
        raise ConfigError(f"--access-log {target}: {error.strerror or one_line(error)}") from error


class Histogram:
    """Counts of observed values at or below each bound (a Prometheus histogram)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The exposition's ``_bucket`` (cumulative), ``_sum`` and ``_count`` lines; ``labels`` like ``a="b",``."""
        lines, total = [], 0
        for bound, count in zip((*(f"{b:g}" for b in self.bounds), "+Inf"), self.counts):
            total += count
            lines.append(f'{name}_bucket{{{labels}le="{bound}"}} {total}')
        inner = labels.rstrip(",")
        suffix = f"{{{inner}}}" if inner else ""
        return [*lines, f"{name}_sum{suffix} {self.sum!r}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    """What ``GET /metrics`` shows, in the Prometheus text format (version 0.0.4). Written out here rather than
    with prometheus_client: that is not a dependency, and the format of these four families is a few lines."""

    def __init__(self, max_batch: int) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.latency: dict[str, Histogram] = {}  # route -> seconds to answer
        self.batch_images = Histogram(tuple(sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})))
        self.images = 0  # images answered with 200
        self.in_flight: dict[str, int] = {}  # client address -> requests arrived, not answered (none: absent)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[route, status] = self.requests.get((route, status), 0) + 1
        self.latency.setdefault(route, Histogram(LATENCY_BOUNDS)).observe(seconds)

    def text(self) -> str:
        lines = ["# HELP querytune_requests_total Requests answered, by route and status.",
                 "# TYPE querytune_requests_total counter"]
        lines += [f'querytune_requests_total{{route="{route}",status="{status}"}} {count}'
                  for (route, status), count in sorted(self.requests.items())]
        lines += ["# HELP querytune_request_duration_seconds Time from a request's arrival to its answer.",
                  "# TYPE querytune_request_duration_seconds histogram"]
        for route, histogram in sorted(self.latency.items()):
            lines += histogram.lines("querytune_request_duration_seconds", f'route="{route}",')
        lines += ["# HELP querytune_batch_images Images in each model call.",
                  "# TYPE querytune_batch_images histogram", *self.batch_images.lines("querytune_batch_images"),
                  "# HELP querytune_images_total Images answered.", "# TYPE querytune_images_total counter",
                  f"querytune_images_total {self.images}",
                  "# HELP querytune_requests_in_flight Requests arrived and not yet answered.",
                  "# TYPE querytune_requests_in_flight gauge",
                  f"querytune_requests_in_flight {sum(self.in_flight.values())}"]
        return "\n".join(lines) + "\n"


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[None]]


class Gate:
    """ASGI middleware in front of the routes: the token (401), the per-client limit (429), then counts every
    request for ``/metrics`` and writes its access log line (the endpoint adds ``tasks`` and ``images`` to the
    request's state)."""

    def __init__(self, app: ASGIApp, access: ServiceAccess, metrics: Metrics, max_inflight: int) -> None:
        self.app = app
        self.token = access.token.encode() if access.token else None
        self.log = access.log
        self.metrics = metrics
        self.max_inflight = max_inflight

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        client = scope["client"][0] if scope.get("client") else "unknown"
        state = scope.setdefault("state", {})
        status = 500  # unless a response starts

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_flight, counted = self.metrics.in_flight, False
        try:
            refusal = None if self.token is None or (method, path) in OPEN else self.refusal(scope["headers"])
            if refusal:
                await _error(sending, 401, refusal, [(b"www-authenticate", b"Bearer")])
            elif (method, path) != ("GET", "/health") and in_flight.get(client, 0) >= self.max_inflight:
                await _error(sending, 429, f"client {client} already has {self.max_inflight} requests unanswered, "
                                           "the most allowed (--max-inflight-per-client)", [(b"retry-after", b"1")])
            else:
                in_flight[client] = in_flight.get(client, 0) + 1
                counted = True
                await self.app(scope, receive, sending)
        finally:
            if counted:
                in_flight[client] -= 1
                if not in_flight[client]:
                    del in_flight[client]
            seconds = time.perf_counter() - started
            self.metrics.request(path if path in ROUTES else "other", status, seconds)
            if self.log is not None:
                self.log.write(json.dumps({
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "client": client,
                    "method": method, "route": path[:200], "tasks": state.get("tasks"),
                    "images": state.get("images", 0), "status": status, "ms": round(1000 * seconds, 1)}) + "\n")

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why the request's ``Authorization`` header does not hold the token, or None where it does."""
        assert self.token is not None
        given = next((value for key, value in headers if key == b"authorization"), None)
        if given is None:
            return "missing token: send the header 'Authorization: Bearer <token>'"
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() != b"bearer":
            return "the Authorization header must be 'Bearer <token>'"
        if not hmac.compare_digest(credentials.strip(), self.token):  # constant time: no guessing byte by byte
            return "wrong token"
        return None


async def _error(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, message: str,
                 headers: list[tuple[bytes, bytes]]) -> None:
    """Answers a JSON ``{"error": message}`` with ``status``, without reading the request."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


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

    def __init__(self, server: MultiTaskServer, max_batch: int, max_wait_ms: float, sizes: Histogram) -> None:
        self.server = server
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.waiting: deque[_Waiting] = deque()
        self.arrived = asyncio.Event()
        self.sizes = sizes  # images of each model call (its count: GET /health's batches)

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
            self.sizes.observe(sum(len(item.images) for item in batch))
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


def create_app(server: MultiTaskServer, limits: ServiceLimits | None = None,
               access: ServiceAccess | None = None) -> Starlette:
    """The Starlette app answering ``server``'s tasks (to anyone, unlogged, unless ``access`` says otherwise)."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
        from starlette.routing import Route
    except ImportError as error:
        raise ConfigError("the HTTP service needs its extra: pip install querytune[serve]") from error

    limits = limits or ServiceLimits()
    metrics = Metrics(limits.max_batch)
    batcher = Batcher(server, limits.max_batch, limits.max_wait_ms, metrics.batch_images)
    names = [task.name for task in server.tasks]
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

    def query(request: Request) -> tuple[int, list[str], bool]:
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
        topk, chosen, with_logits = query(request)
        files = await uploaded(request)
        request.state.images = len(files)
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
        metrics.images += len(files)
        return JSONResponse({"images": [{"name": name, **record} for (name, _), record in zip(files, records)]})

    async def tasks(request: Request) -> Response:
        return JSONResponse({"image_size": server.preprocess.image_size,
                             "tasks": [{"name": task.name, "method": task.method.name,
                                        "num_classes": task.method.num_classes,
                                        "classes": list(task.classes) if task.classes else None,
                                        "shares_trunk": task.shares_trunk} for task in server.tasks]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "tasks": len(server.tasks), "batches": metrics.batch_images.count,
                             "images": metrics.images})

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

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
              Route("/health", health), Route("/metrics", metrics_text)]
    gate = Middleware(Gate, access=access or ServiceAccess(), metrics=metrics,
                      max_inflight=limits.max_inflight_per_client)
    return Starlette(routes=routes, lifespan=lifespan, middleware=[gate],
                     exception_handlers={HTTPError: bad_request, HTTPException: bad_request})


def serve(server: MultiTaskServer, host: str, port: int, limits: ServiceLimits | None = None,
          access: ServiceAccess | None = None) -> None:
    """Serve until interrupted."""
    try:
        import uvicorn
    except ImportError as error:
        raise ConfigError("the HTTP service needs its extra: pip install querytune[serve]") from error
    uvicorn.run(create_app(server, limits, access), host=host, port=port, log_level="warning")


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

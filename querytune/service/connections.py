"""The connections of ``querytune serve`` outside its requests: how long a client may take to send a request's
headers, how many connections may be open (in all and per client address), and the accept errors (no file
descriptor left) logged once per interval rather than once per attempt.

uvicorn times out neither a connection that never finishes its headers nor one that trickles a header line
now and then, and its ``limit_concurrency`` answers 503 only once a request's headers are in (the socket, its
file descriptor, is held meanwhile). :class:`ConnectionGuard` does both from the connection's first byte: its
:attr:`~ConnectionGuard.protocol` is uvicorn's h11 protocol with a timer and a count around each connection."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import time
from dataclasses import replace
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError
from ..progress import note
from .limits import ServiceLimits
from .metrics import Metrics

OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # what asyncio's accept retries on
ACCEPT_LOG_INTERVAL = 10.0  # seconds between two lines about failing accepts
SPARE_FILES = 64  # file descriptors kept for what is not a connection: the log, the model's threads, the loop
LOG = logging.getLogger("uvicorn.error")


class ConnectionGuard:
    """The connection limits of one service (``header_timeout``, ``max_connections``,
    ``max_connections_per_client`` of its :class:`ServiceLimits`), kept by its :attr:`protocol` (for uvicorn's
    ``http``); connections it closes are counted in ``metrics.connections_closed`` by reason."""

    def __init__(self, limits: ServiceLimits, metrics: Metrics) -> None:
        self.header_timeout = limits.header_timeout
        self.max_connections = limits.max_connections
        self.max_per_client = limits.max_connections_per_client
        self.metrics = metrics
        self.per_client: dict[str, int] = {}  # client address -> its open connections (none: absent)
        self.unlogged_accept_errors = 0
        self.next_accept_log = 0.0
        self.protocol: type[GuardedProtocol] = type("GuardedProtocol", (GuardedProtocol,), {"guard": self})

    def admit(self, client: str, open_connections: int) -> str | None:
        """Counts a new connection of ``client`` (``open_connections`` with it), or says why it is refused."""
        if open_connections > self.max_connections:
            self.metrics.connection_closed("max_connections")
            return f"{self.max_connections} connections are open, the most allowed (--max-connections)"
        if self.per_client.get(client, 0) >= self.max_per_client:
            self.metrics.connection_closed("max_connections_per_client")
            return (f"client {client} already has {self.max_per_client} connections open, the most allowed "
                    "(--max-connections-per-client)")
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.per_client[client] -= 1
        if not self.per_client[client]:
            del self.per_client[client]

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's exception handler: a failing accept (no file descriptor or memory left) is one line
        per :data:`ACCEPT_LOG_INTERVAL` saying how often it failed; anything else goes to asyncio's default."""
        error = context.get("exception")
        if not (isinstance(error, OSError) and error.errno in OUT_OF_RESOURCES
                and context.get("message", "").startswith("socket.accept()")):
            loop.default_exception_handler(context)
            return
        self.metrics.accept_errors += 1
        self.unlogged_accept_errors += 1
        now = time.monotonic()
        if now >= self.next_accept_log:
            LOG.error("cannot accept connections: %s (%d failed accepts since the last such line; connections "
                      "are retried every second)", error.strerror, self.unlogged_accept_errors)
            self.unlogged_accept_errors = 0
            self.next_accept_log = now + ACCEPT_LOG_INTERVAL


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, bounded by its class's :class:`ConnectionGuard`: a connection past the limits is
    answered 503 and closed as it opens; one that takes longer than ``header_timeout`` to send a request's headers
    (from opening, or from its last answer) is answered 408 and closed."""

    guard: ClassVar[ConnectionGuard]
    header_timer: asyncio.TimerHandle | None = None
    admitted: str | None = None  # the client address counted for this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        client = self.client[0] if self.client else "unknown"
        refusal = self.guard.admit(client, len(self.connections))
        if refusal:
            self._answer_and_close(503, refusal)
            return
        self.admitted = client
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self.admitted is not None:
            self.guard.release(self.admitted)
            self.admitted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():  # the headers are in: the app's --read-timeout bounds the body
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a request already received (pipelining)
        if not self._in_request() and not self.transport.is_closing():
            self._start_header_timer()

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self.header_timer = self.loop.call_later(self.guard.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self._in_request():
            return
        self.guard.metrics.connection_closed("header_timeout")
        if self.conn.their_state is h11.IDLE:  # between requests; else the rest of a body answered early
            self._answer_and_close(408, f"no complete request headers within {self.guard.header_timeout:g} s "
                                        "(--header-timeout)")
        else:
            self.transport.close()

    def _answer_and_close(self, status: int, message: str) -> None:
        """Writes a JSON ``{"error": message}`` answer outside h11 (no request was read) and closes."""
        body = json.dumps({"error": message}).encode()
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.transport.close()


def fit_open_files(limits: ServiceLimits) -> ServiceLimits:
    """``limits`` with ``max_connections`` (and the per-client limit) lowered to what the process's open-file limit
    leaves once :data:`SPARE_FILES` are kept; the soft limit is raised first, as far as the hard one allows. Says
    so on stderr when it lowers them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    wanted = in_use + SPARE_FILES + limits.max_connections
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    room = limits.max_connections if soft == resource.RLIM_INFINITY else soft - in_use - SPARE_FILES
    if room >= limits.max_connections:
        return limits
    if room < 1:
        raise ConfigError(f"the open-file limit (ulimit -n {soft}) leaves no room for connections: raise it")
    note(f"--max-connections lowered to {room}: ulimit -n is {soft}")
    return replace(limits, max_connections=room,
                   max_connections_per_client=min(limits.max_connections_per_client, room))

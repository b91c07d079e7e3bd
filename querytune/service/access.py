"""Who may ask and what is written of each request: the keys (:class:`ServiceAccess`), the loopback rule, the
access log, and the :class:`Gate` middleware that answers 401 and 429 and counts every request for ``/metrics``."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError, one_line
from .metrics import ROUTES, Metrics

TOKEN_ENV = "QUERYTUNE_TOKEN"
OPEN = (("GET", "/health"), ("GET", "/"))  # answered without a token (the page's HTML holds nothing)
BARE_KEY = "default"  # the name of a key given alone, without a name
KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclass
class ServiceAccess:
    """Who may ask, and where each request is logged (``querytune serve --token-file/--no-auth/--access-log``)."""

    keys: dict[str, str] | None = None  # key name -> key; None: anyone who reaches the port is answered
    log: TextIO | None = None  # one JSON line per request
    token_file: Path | None = None  # read again by reload()

    @classmethod
    def from_options(cls, host: str, token_file: Path | None, no_auth: bool,
                     access_log: str | None) -> ServiceAccess:
        """The keys (``token_file``, else env ``QUERYTUNE_TOKEN``) and the opened log (``-``: stderr), checked
        before any model loads: a non-loopback ``host`` without a key is refused unless ``no_auth``."""
        keys = read_keys(token_file)
        if no_auth and keys is not None:
            raise ConfigError(f"--no-auth contradicts the token of {'--token-file' if token_file else TOKEN_ENV}")
        if keys is None and not no_auth and not is_loopback(host):
            raise ConfigError(f"--host {host} is reachable from other machines: give a token (--token-file FILE "
                              f"or {TOKEN_ENV}), or --no-auth to answer anyone")
        return cls(keys, open_log(access_log), token_file)

    def reload(self) -> str | None:
        """Read the token file again (on SIGHUP or ``POST /admin/reload``); a line for the log saying which keys
        came or went (by name), or why the keys read before stay in use; None where nothing changed."""
        if self.token_file is None:
            return None
        try:
            keys = read_keys(self.token_file)
        except ConfigError as error:
            return f"{error}; the keys read before stay in use"
        assert keys is not None and self.keys is not None
        if keys == self.keys:
            return None
        old, self.keys = self.keys, keys
        changes = [f"{what} {', '.join(sorted(names))}" for what, names in (
            ("added", keys.keys() - old.keys()), ("revoked", old.keys() - keys.keys()),
            ("changed", {name for name in keys.keys() & old.keys() if keys[name] != old[name]})) if names]
        return f"--token-file {self.token_file}: keys {'; '.join(changes)}"


def read_keys(token_file: Path | None) -> dict[str, str] | None:
    """The keys in ``token_file``, else in env ``QUERYTUNE_TOKEN``, else None: one ``name:key`` a line, or one
    bare key alone (named ``default``); blank lines and lines starting with ``#`` are skipped. A token file that
    group or others may access is refused, as ssh refuses such a key."""
    if token_file is not None:
        where = f"--token-file {token_file}"
        try:
            with open(token_file, encoding="utf-8") as opened:
                mode = os.fstat(opened.fileno()).st_mode
                text = opened.read()
        except (OSError, UnicodeError) as error:
            raise ConfigError(f"{where}: {getattr(error, 'strerror', None) or one_line(error)}") from error
        if stat.S_ISREG(mode) and mode & 0o077:  # a pipe (--token-file <(...)) has no one else to guard from
            raise ConfigError(f"{where}: permissions {stat.S_IMODE(mode):04o} let group or others access it; "
                              f"chmod 600 {token_file}")
    elif TOKEN_ENV in os.environ:
        where, text = TOKEN_ENV, os.environ[TOKEN_ENV]
    else:
        return None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ConfigError(f"{where} is empty: it must hold the token")
    keys: dict[str, str] = {}
    for number, line in lines:
        name, named, key = line.partition(":")
        if not named:
            if len(lines) > 1:
                raise ConfigError(f"{where}: line {number} is not 'name:key' (a key without a name must be alone)")
            name, key = BARE_KEY, line
        if not KEY_NAME.fullmatch(name):
            raise ConfigError(f"{where}: line {number}: a key's name is 1 to 64 letters, digits, '_', '.', '@' or '-'")
        if not key or not all("!" <= char <= "~" for char in key):
            raise ConfigError(f"{where}: the token must be printable ASCII without spaces (it is sent in a header)"
                              + (f"; line {number}" if len(lines) > 1 else ""))
        if name in keys:
            raise ConfigError(f"{where}: line {number}: the name {name!r} is given twice")
        if key in keys.values():
            raise ConfigError(f"{where}: line {number}: key {name!r} is the same as another key")
        keys[name] = key
    return keys


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



ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[None]]


class Gate:
    """ASGI middleware in front of the routes: the token (401), the per-client limit (429), then counts every
    request for ``/metrics`` and writes its access log line (the endpoint adds ``tasks`` and ``images`` to the
    request's state)."""

    def __init__(self, app: ASGIApp, access: ServiceAccess, metrics: Metrics, max_inflight: int) -> None:
        self.app = app
        self.access = access  # its keys are read at each request: reload() may replace them
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
            refusal = None
            if self.access.keys is not None and (method, path) not in OPEN:
                state["key"], refusal = self.key_of(self.access.keys, scope["headers"])
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
            if status == 200 and path == "/predict":
                self.metrics.tasks_answered(state.get("tasks") or [], seconds)
            if self.log is not None:
                self.log.write(json.dumps({
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "client": client,
                    "key": state.get("key"), "method": method, "route": path[:200], "tasks": state.get("tasks"),
                    "images": state.get("images", 0), "status": status, "ms": round(1000 * seconds, 1)}) + "\n")

    @staticmethod
    def key_of(keys: dict[str, str], headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
        """The name of the key the request's ``Authorization`` header holds, or why it holds none."""
        given = next((value for key, value in headers if key == b"authorization"), None)
        if given is None:
            return None, "missing token: send the header 'Authorization: Bearer <token>'"
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() != b"bearer":
            return None, "the Authorization header must be 'Bearer <token>'"
        credentials, matched = credentials.strip(), None
        for name, key in keys.items():  # every key compared, each in constant time: no guessing byte by byte
            if hmac.compare_digest(credentials, key.encode()) and matched is None:
                matched = name
        return matched, None if matched else "wrong token"


async def _error(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, message: str,
                 headers: list[tuple[bytes, bytes]]) -> None:
    """Answers a JSON ``{"error": message}`` with ``status``, without reading the request."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})

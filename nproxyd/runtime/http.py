"""The HTTP surfaces' server: a small HTTP/1.1 server on asyncio streams, and the operations
endpoint on it (/livez, /readyz, /metrics, /status).

Why not aiohttp: importing ``aiohttp.web`` imports its client too, which builds two TLS
contexts at import; that was a quarter of ``nproxyd run``'s start (docs/benchmarks.md
"Start-up"). The two surfaces are a few fixed routes answering small bodies, so this serves
exactly that, and defensively: ``Content-Length`` bodies only (``Transfer-Encoding`` is
answered 411), bounded request line (414), head (431), header count (431) and body (413),
read and write timeouts, a connection limit, keep-alive, ``HEAD``, ``Expect: 100-continue``;
a malformed request is answered 400 and its connection closed; no input makes a connection
raise past its handler (tests/integration/test_http_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from email.utils import format_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import msgspec
import structlog

from nproxyd.core.clock import Clock, SystemClock
from nproxyd.core.errors import ConfigError
from nproxyd.runtime.ops import OpsQueries
from nproxyd.runtime.prometheus import CONTENT_TYPE

MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD_BYTES = 32 * 1024  # request line and headers
MAX_HEADERS = 100
MAX_BODY_BYTES = 64 * 1024
MAX_CONNECTIONS = 256  # more at once are closed without an answer
HEAD_TIMEOUT_SECONDS = 10.0  # from the first byte of a request to the end of its head
BODY_TIMEOUT_SECONDS = 10.0
WRITE_TIMEOUT_SECONDS = 10.0  # a peer that does not read its answer
IDLE_TIMEOUT_SECONDS = 30.0  # a kept-alive connection waiting for its next request
LINGER_BYTES = 1024 * 1024  # discarded after refusing a body, so the answer is not lost
LINGER_SECONDS = 2.0
JSON = "application/json; charset=utf-8"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
# RFC 9112 §3.2 / RFC 3986: uri-host [ ":" port ], or empty.
_HOST = re.compile(rb"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]*")
_END_OF_HEAD = b"\r\n\r\n"


class Request(msgspec.Struct, frozen=True):
    method: str
    path: str  # percent-decoded, without the query
    headers: dict[str, str]  # lower-case names; the first of repeated fields
    body: bytes = b""


class Response(msgspec.Struct, frozen=True):
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: dict[str, str] = msgspec.field(default_factory=dict)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, msgspec.json.encode(value))


def error_response(status: int, message: str | None = None) -> Response:
    """``{"error": message}``, the status's own phrase by default."""
    return json_response({"error": message or HTTPStatus(status).phrase}, status)


Handler = Callable[[Request], Awaitable[Response]]


class _Refused(Exception):
    """A request answered without reaching a handler; the connection closes after it."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Head(msgspec.Struct, frozen=True):
    method: str
    target: bytes
    version: bytes
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip() for t in self.headers.get("connection", "").lower().split(",")}
        if self.version == b"HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def content_length(self) -> int:
        if "transfer-encoding" in self.headers:
            raise _Refused(411)  # Content-Length only: a chunked body's end cannot be found
        value = self.headers.get("content-length")
        if value is None:
            return 0
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            raise _Refused(400)
        return int(value)

    def path(self) -> str:
        target = self.target.split(b"?", 1)[0].split(b"#", 1)[0]
        if target.startswith((b"http://", b"https://")):  # absolute form: keep the path
            target = b"/" + target.split(b"/", 3)[-1] if target.count(b"/") >= 3 else b"/"
        if not target.startswith(b"/"):
            raise _Refused(400)
        return unquote(target.decode("ascii", "replace"), errors="replace")


def parse_head(data: bytes) -> _Head:
    """The request line and header fields of ``data`` (a head, without its final CRLF CRLF)."""
    if any(char in data.replace(b"\r\n", b"") for char in (b"\r", b"\n", b"\0")):
        raise _Refused(400)  # bare CR or LF (header smuggling), or NUL
    line, _, rest = data.partition(b"\r\n")
    if len(line) > MAX_REQUEST_LINE:
        raise _Refused(414)
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise _Refused(400)
    if not _VERSION.fullmatch(parts[2]):
        raise _Refused(505 if parts[2].startswith(b"HTTP/") else 400)
    fields = rest.split(b"\r\n") if rest else []
    if len(fields) > MAX_HEADERS:
        raise _Refused(431)
    headers: dict[str, str] = {}
    for raw in fields:
        name, colon, value = raw.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also refuses obs-fold and bare CR/LF
            raise _Refused(400)
        key = name.decode("ascii").lower()
        value = value.strip(b" \t")
        text = value.decode("latin-1")
        if key == "content-length" and headers.get(key, text) != text:
            raise _Refused(400)  # two different lengths: no safe way to frame the body
        if key == "host" and (key in headers or not _HOST.fullmatch(value)):
            raise _Refused(400)  # RFC 9112 §3.2: more than one Host, or an invalid one
        headers.setdefault(key, text)
    if parts[2] == b"HTTP/1.1" and "host" not in headers:
        raise _Refused(400)  # RFC 9112 §3.2: an HTTP/1.1 request must name its host
    return _Head(parts[0].decode("ascii"), parts[1], parts[2], headers)


class Site:
    """An HTTP server on ``HOST:PORT`` with fixed routes; ``key`` names the setting in errors.

    ``start`` binds the socket, so a bad or busy address fails start-up before READY; the
    ``OSError`` stays the error's cause (a busy port is a temporary failure, exit 75).
    ``routes`` maps (method, path) to a handler; a ``GET`` route also answers ``HEAD``.
    """

    def __init__(
        self,
        listen: str,
        key: str,
        *,
        max_body: int = MAX_BODY_BYTES,
        on_too_large: Callable[[int], Response] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.key = key
        self.host, self.port = parse_listen(listen, key)
        self.routes: dict[tuple[str, str], Handler] = {}
        self.max_body = max_body
        self.on_too_large = on_too_large or (lambda _: error_response(413))
        self.clock = clock or SystemClock()
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[None]] = set()
        self.log = structlog.get_logger()

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    async def start(self) -> None:
        try:
            self.server = await asyncio.start_server(
                self._connection, self.host, self.port, reuse_address=True, limit=MAX_HEAD_BYTES
            )
        except OSError as exc:
            raise ConfigError(
                self.key, f"cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        if self.server.sockets:
            self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=5)
        await self.server.wait_closed()
        self.server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self.connections) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self.connections.add(task)
        clean = False
        try:
            await self._serve(reader, writer)
            clean = True
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the peer went away or stalled: nothing to answer
        except asyncio.CancelledError:
            pass  # ``stop``: Python 3.11's streams report a cancelled connection as an error
        except Exception as exc:  # a bug here ends this connection, never the server
            structlog.get_logger().error(  # the class only, as for a handler's failure
                "http_connection_failed", error_class=type(exc).__name__
            )
        finally:
            self.connections.discard(task)
            with contextlib.suppress(asyncio.CancelledError):  # ``stop`` while flushing
                await _close(writer, flush=clean)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until it is not kept alive."""
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                first = await reader.read(1)
            if not first:
                return  # closed between requests
            try:
                head, response, whole = await self._request(first, reader, writer)
            except _Refused as refused:
                head, response, whole = None, error_response(refused.status), False
            keep_alive = head is not None and head.keep_alive and whole
            method = head.method if head is not None else "GET"
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                await self._send(writer, response, method, keep_alive=keep_alive)
            if not keep_alive:
                if not whole:
                    await _linger(reader, writer)
                return

    async def _request(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[_Head, Response, bool]:
        """Read one request (``first`` is its first byte) and answer it; the flag says whether
        the whole request was read (else the connection must close after the answer)."""
        async with asyncio.timeout(HEAD_TIMEOUT_SECONDS):
            try:
                data = first + await reader.readuntil(_END_OF_HEAD)
            except asyncio.LimitOverrunError:
                raise _Refused(431) from None
        head = parse_head(data[: -len(_END_OF_HEAD)])
        length = head.content_length()
        handler = self._handler(head)
        if length > self.max_body:
            refused = handler if isinstance(handler, Response) else self.on_too_large(length)
            return head, refused, False
        if length and head.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            body = await reader.readexactly(length) if length else b""
        if isinstance(handler, Response):
            return head, handler, True
        request = Request(head.method, head.path(), head.headers, body)
        return head, await self._call(handler, request), True

    def _handler(self, head: _Head) -> Handler | Response:
        """The route's handler, or the 404/405 answer."""
        path = head.path()
        method = "GET" if head.method == "HEAD" else head.method
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler
        allowed = sorted({m for m, p in self.routes if p == path})
        if not allowed:
            return error_response(404)
        allowed += ["HEAD"] if "GET" in allowed else []
        response = error_response(405)
        response.headers["Allow"] = ", ".join(allowed)
        return response

    async def _call(self, handler: Handler, request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            structlog.get_logger().error(  # the class only: no traceback to the log's readers
                "http_handler_failed", path=request.path, error_class=type(exc).__name__
            )
            return error_response(500, "internal error")

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, method: str, *, keep_alive: bool
    ) -> None:
        status = HTTPStatus(response.status)
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Date: {format_datetime(self.clock.now(), usegmt=True)}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            *(f"{name}: {value}" for name, value in response.headers.items()),
            "Connection: keep-alive" if keep_alive else "Connection: close",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(response.body)
        await writer.drain()


async def _close(writer: asyncio.StreamWriter, *, flush: bool) -> None:
    """Close the connection, flushing what is written for a while when ``flush``; never wait
    longer on a peer that does not read."""
    try:
        if flush:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                    await writer.wait_closed()
    finally:
        writer.transport.abort()  # also when cancelled: never leave the socket open


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End our side, then read and drop what the client still sends (a refused body) for a
    while, so that closing does not reset the connection before the client read its answer."""
    with contextlib.suppress(OSError, TimeoutError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            discarded = 0
            while discarded < LINGER_BYTES:
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    return
                discarded += len(chunk)


def parse_listen(listen: str, key: str = "http.listen") -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


class OpsServer:
    def __init__(self, state: OpsQueries, listen: str) -> None:
        self.state = state
        self.site = Site(listen, "http.listen")
        for path, handler in (
            ("/livez", self.livez),
            ("/readyz", self.readyz),
            ("/metrics", self.metrics),
            ("/status", self.status),
        ):
            self.site.route("GET", path, handler)
        self.log = structlog.get_logger()

    @property
    def port(self) -> int:
        return self.site.port

    async def start(self) -> None:
        """Bind the socket (so a bad address fails start-up, before READY)."""
        await self.site.start()
        self.log.info("http_listening", host=self.site.host, port=self.site.port)

    async def stop(self) -> None:
        await self.site.stop()

    async def livez(self, _: Request) -> Response:
        return json_response({"live": True})

    async def readyz(self, _: Request) -> Response:
        ready, body = await self.state.readiness()
        return json_response(body, status=200 if ready else 503)

    async def metrics(self, _: Request) -> Response:
        body = await self.state.metrics_text()
        return Response(200, body, content_type=CONTENT_TYPE)

    async def status(self, _: Request) -> Response:
        return json_response(await self.state.status())

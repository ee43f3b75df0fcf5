"""The HTTP surfaces' own HTTP/1.1 server (``nproxyd.runtime.http.Site``), over raw sockets.

Every answer here is read byte for byte from a real TCP connection, so the tests see exactly
what a client, a reverse proxy or a hostile peer sees: status lines, framing, keep-alive and
closing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from nproxyd.core.errors import ConfigError
from nproxyd.runtime import http
from nproxyd.runtime.http import Request, Response, Site, error_response, json_response

pytestmark = pytest.mark.anyio

MAX_BODY = 1024


class Answer:
    """One response as read from the socket."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Peer:
    """A raw TCP connection to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, head_only: bool = False) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        line, *fields = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for field in fields:
            name, _, value = field.partition(":")
            headers[name.lower()] = value.strip()
        length = 0 if head_only else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return Answer(int(line.split(" ")[1]), headers, body)

    async def closed(self) -> bool:
        """True once the server closed the connection (EOF or reset)."""
        try:
            return await asyncio.wait_for(self.reader.read(), 5) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.transport.abort()


class Served:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.seen: list[Request] = []
        self.too_large: list[int] = []

    @asynccontextmanager
    async def peer(self) -> AsyncIterator[Peer]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.site.port)
        peer = Peer(reader, writer)
        try:
            yield peer
        finally:
            peer.close()

    async def exchange(self, data: bytes) -> Answer:
        async with self.peer() as peer:
            await peer.send(data)
            return await peer.answer()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """A site with a GET route, a POST route echoing its body, and one that raises."""
    served: Served

    def too_large(size: int) -> Response:
        served.too_large.append(size)
        return error_response(413, "body too large")

    site = Site("127.0.0.1:0", "test.listen", max_body=MAX_BODY, on_too_large=too_large)
    served = Served(site)

    async def hello(request: Request) -> Response:
        served.seen.append(request)
        return json_response({"hello": True})

    async def echo(request: Request) -> Response:
        served.seen.append(request)
        return Response(200, request.body, content_type="application/octet-stream")

    async def broken(_: Request) -> Response:
        raise RuntimeError("secret detail")

    site.route("GET", "/hello", hello)
    site.route("POST", "/echo", echo)
    site.route("GET", "/broken", broken)
    await site.start()
    try:
        yield served
    finally:
        await site.stop()


def get(path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *headers]) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class TestAnswers:
    async def test_a_get_is_answered_json_with_its_length(self, served: Served) -> None:
        """GET of a route: 200, JSON body, Content-Length framing, a Date."""
        answer = await served.exchange(get("/hello"))
        assert answer.status == 200
        assert answer.json() == {"hello": True}
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.headers["content-length"] == str(len(answer.body))
        assert answer.headers["date"].endswith("GMT")

    async def test_keep_alive_answers_pipelined_requests_in_order(self, served: Served) -> None:
        """Three requests in one write on one connection get three answers, in order."""
        async with served.peer() as peer:
            await peer.send(get("/hello") + post("/echo", b"abc") + get("/nope"))
            statuses = [(await peer.answer()).status for _ in range(3)]
            await peer.send(get("/hello"))
            assert (await peer.answer()).status == 200
        assert statuses == [200, 200, 404]

    async def test_head_has_the_get_headers_and_no_body(self, served: Served) -> None:
        """HEAD of a GET route: the GET's Content-Length, no body; the connection stays."""
        async with served.peer() as peer:
            await peer.send(get("/hello").replace(b"GET", b"HEAD", 1))
            head = await peer.answer(head_only=True)
            await peer.send(get("/hello"))
            answer = await peer.answer()
        assert head.status == 200
        assert head.headers["content-length"] == str(len(answer.body))
        assert answer.json() == {"hello": True}

    async def test_a_post_body_reaches_the_handler(self, served: Served) -> None:
        """The handler gets the exact body, the path and lower-case header names."""
        answer = await served.exchange(post("/echo?x=1", b"\x00\xffbody", "X-Sig: abc"))
        assert answer.body == b"\x00\xffbody"
        assert served.seen[-1].path == "/echo"
        assert served.seen[-1].headers["x-sig"] == "abc"

    async def test_unknown_path_404_and_wrong_method_405_with_allow(self, served: Served) -> None:
        """404 JSON for an unknown path; 405 JSON naming the allowed methods for a known one."""
        missing = await served.exchange(get("/nope"))
        wrong = await served.exchange(post("/hello", b""))
        assert (missing.status, missing.json()) == (404, {"error": "Not Found"})
        assert (wrong.status, wrong.json()) == (405, {"error": "Method Not Allowed"})
        assert wrong.headers["allow"] == "GET, HEAD"

    async def test_a_failing_handler_is_a_500_without_its_details(self, served: Served) -> None:
        """A handler's exception is answered 500 with no traceback or message; the connection
        serves the next request."""
        async with served.peer() as peer:
            await peer.send(get("/broken"))
            answer = await peer.answer()
            await peer.send(get("/hello"))
            assert (await peer.answer()).status == 200
        assert (answer.status, answer.json()) == (500, {"error": "internal error"})
        assert b"secret detail" not in answer.body

    async def test_expect_100_continue_gets_an_interim_answer(self, served: Served) -> None:
        """A client waiting for 100 Continue gets it before sending its body, then the answer."""
        async with served.peer() as peer:
            head = post("/echo", b"").replace(b"Content-Length: 0", b"Content-Length: 5")
            await peer.send(head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
            interim = await peer.answer(head_only=True)
            await peer.send(b"hello")
            answer = await peer.answer()
        assert interim.status == 100
        assert (answer.status, answer.body) == (200, b"hello")

    @pytest.mark.parametrize(
        ("request_bytes"),
        [
            get("/hello", "Connection: close"),
            get("/hello").replace(b"HTTP/1.1", b"HTTP/1.0"),
        ],
    )
    async def test_connection_close_and_http_1_0_close_after_the_answer(
        self, served: Served, request_bytes: bytes
    ) -> None:
        """``Connection: close`` and an HTTP/1.0 request without keep-alive close after one."""
        async with served.peer() as peer:
            await peer.send(request_bytes)
            answer = await peer.answer()
            assert await peer.closed()
        assert answer.status == 200
        assert answer.headers["connection"] == "close"


class TestLimits:
    async def test_a_body_over_the_limit_is_413_unread(self, served: Served) -> None:
        """Content-Length over the limit: 413 from ``on_too_large`` without reading the body or
        calling the handler; then the connection closes."""
        async with served.peer() as peer:
            await peer.send(post("/echo", b"x" * (MAX_BODY + 1)))
            answer = await peer.answer()
            assert await peer.closed()
        assert (answer.status, answer.json()) == (413, {"error": "body too large"})
        assert served.too_large == [MAX_BODY + 1]
        assert served.seen == []

    async def test_a_body_at_the_limit_is_accepted(self, served: Served) -> None:
        """Exactly ``max_body`` bytes is not too large."""
        answer = await served.exchange(post("/echo", b"y" * MAX_BODY))
        assert (answer.status, len(answer.body)) == (200, MAX_BODY)

    async def test_a_chunked_body_is_411_and_closes(self, served: Served) -> None:
        """Transfer-Encoding is not supported: 411, the connection closed, no handler call."""
        async with served.peer() as peer:
            await peer.send(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"
            )
            answer = await peer.answer()
            assert await peer.closed()
        assert answer.status == 411
        assert served.seen == []

    async def test_a_long_request_line_is_414(self, served: Served) -> None:
        """A request line over 8 KiB is refused with 414."""
        answer = await served.exchange(get("/" + "a" * (http.MAX_REQUEST_LINE + 1)))
        assert answer.status == 414

    async def test_too_many_header_fields_are_431(self, served: Served) -> None:
        """More than MAX_HEADERS header fields are refused with 431."""
        fields = [f"X-{n}: {n}" for n in range(http.MAX_HEADERS + 1)]
        assert (await served.exchange(get("/hello", *fields))).status == 431

    async def test_a_head_over_the_limit_is_431(self, served: Served) -> None:
        """A head larger than MAX_HEAD_BYTES is refused with 431, whatever its shape."""
        big = "X-Big: " + "b" * http.MAX_HEAD_BYTES
        assert (await served.exchange(get("/hello", big))).status == 431

    async def test_a_stalled_head_is_dropped_after_the_timeout(
        self, served: Served, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A peer that starts a request and stops is disconnected without an answer."""
        monkeypatch.setattr(http, "HEAD_TIMEOUT_SECONDS", 0.1)
        async with served.peer() as peer:
            await peer.send(b"GET /hello HTTP/1.1\r\nHost:")
            assert await peer.closed()

    async def test_a_stalled_body_is_dropped_after_the_timeout(
        self, served: Served, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A peer that announces a body and never sends it is disconnected; no handler call."""
        monkeypatch.setattr(http, "BODY_TIMEOUT_SECONDS", 0.1)
        async with served.peer() as peer:
            await peer.send(post("/echo", b"0123456789")[:-7])
            assert await peer.closed()
        assert served.seen == []

    async def test_connections_over_the_limit_are_closed(
        self, served: Served, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past MAX_CONNECTIONS open connections, a new one is closed at once; the open ones
        are still served."""
        monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
        async with served.peer() as first, served.peer() as second:
            await first.send(get("/hello"))
            await second.send(get("/hello"))
            assert (await first.answer()).status == (await second.answer()).status == 200
            async with served.peer() as third:
                await third.send(get("/hello"))
                assert await third.closed()


MALFORMED = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
    b"GET /hello\r\n\r\n",  # HTTP/0.9
    b"GET  /hello HTTP/1.1\r\n\r\n",
    b"G(T /hello HTTP/1.1\r\n\r\n",
    b"GET hello HTTP/1.1\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nX-A: 1\nX-B: 2\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa3\r\n\r\nabc",
    # RFC 9112 §3.2: an HTTP/1.1 request without Host, with two, or with an invalid one.
    b"GET /hello HTTP/1.1\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /hello HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a/b\r\n\r\n",
]


class TestHostileBytes:
    @pytest.mark.parametrize("data", MALFORMED)
    async def test_a_malformed_request_is_400_and_closes(self, served: Served, data: bytes) -> None:
        """A request that cannot be parsed safely is answered 400 and its connection closed;
        no handler runs."""
        async with served.peer() as peer:
            await peer.send(data)
            answer = await peer.answer()
            assert await peer.closed()
        assert answer.status == 400
        assert answer.json() == {"error": "Bad Request"}
        assert served.seen == []

    @pytest.mark.parametrize(
        "data",
        [
            b"GET /hello HTTP/1.0\r\n\r\n",
            b"GET /hello HTTP/1.1\r\nHost: [::1]:9187\r\n\r\n",
            b"GET /hello HTTP/1.1\r\nHost: nproxyd.example:80\r\n\r\n",
            b"GET /hello HTTP/1.1\r\nHost:\r\n\r\n",
        ],
    )
    async def test_a_host_is_required_of_http_1_1_only(self, served: Served, data: bytes) -> None:
        """HTTP/1.0 needs no Host; HTTP/1.1 takes one, empty or a host with a port."""
        assert (await served.exchange(data)).status == 200

    async def test_an_unknown_http_version_is_505(self, served: Served) -> None:
        """HTTP/2.0 in a request line: 505."""
        assert (await served.exchange(b"GET /hello HTTP/2.0\r\n\r\n")).status == 505

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(data=st.binary(min_size=1, max_size=300))
    async def test_any_bytes_leave_the_server_serving(self, served: Served, data: bytes) -> None:
        """Whatever a peer sends, then closes, the server answers the next connection."""
        async with served.peer() as peer:
            await peer.send(data + b"\r\n\r\n")
        assert (await served.exchange(get("/hello"))).status == 200


class TestFailures:
    async def test_a_failure_while_answering_ends_only_its_connection(self, served: Served) -> None:
        """An answer the server cannot write (a status code HTTP does not know) closes that
        connection and is logged by its class; the server keeps answering others."""

        async def unknown_status(_: Request) -> Response:
            return Response(299)

        served.site.route("GET", "/odd", unknown_status)
        with capture_logs() as logs:
            async with served.peer() as peer:
                await peer.send(get("/odd"))
                assert await peer.closed()
        assert (await served.exchange(get("/hello"))).status == 200
        failures = [e for e in logs if e["event"] == "http_connection_failed"]
        assert [e["error_class"] for e in failures] == ["ValueError"]


class TestBinding:
    async def test_a_busy_port_is_a_config_error_with_the_os_error_as_cause(self) -> None:
        """Binding a port in use fails ``start`` naming the setting, the OSError its cause."""
        first = Site("127.0.0.1:0", "http.listen")
        await first.start()
        try:
            second = Site(f"127.0.0.1:{first.port}", "http.listen")
            with pytest.raises(ConfigError, match=r"http\.listen") as caught:
                await second.start()
            assert isinstance(caught.value.__cause__, OSError)
        finally:
            await first.stop()

    async def test_stop_closes_open_connections(self) -> None:
        """``stop`` ends kept-alive connections instead of waiting for their peers."""
        site = Site("127.0.0.1:0", "http.listen")

        async def hello(_: Request) -> Response:
            return json_response({})

        site.route("GET", "/", hello)
        await site.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        peer = Peer(reader, writer)
        try:
            await peer.send(get("/"))
            assert (await peer.answer()).status == 200
            await asyncio.wait_for(site.stop(), 5)
            assert await peer.closed()
        finally:
            peer.close()

    async def test_stop_ends_connections_without_an_asyncio_error(self) -> None:
        """``stop`` ends a kept-alive connection and one mid-request without asyncio reporting
        an unhandled exception (an error record with a traceback in the daemon's log)."""
        site = Site("127.0.0.1:0", "http.listen")

        async def hello(_: Request) -> Response:
            return json_response({})

        site.route("GET", "/", hello)
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        previous = loop.get_exception_handler()
        loop.set_exception_handler(lambda _, context: reported.append(context))
        await site.start()
        peers = [Peer(*await asyncio.open_connection("127.0.0.1", site.port)) for _ in range(2)]
        try:
            await peers[0].send(get("/"))
            assert (await peers[0].answer()).status == 200
            await peers[1].send(b"GET / HTTP/1.1\r\n")
            await asyncio.wait_for(site.stop(), 5)
            assert [await peer.closed() for peer in peers] == [True, True]
            await asyncio.sleep(0)  # the connections' done-callbacks run
        finally:
            loop.set_exception_handler(previous)
            for peer in peers:
                peer.close()
        assert [context.get("message") for context in reported] == []

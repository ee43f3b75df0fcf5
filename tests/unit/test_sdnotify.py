"""The sd_notify client, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nproxyd.runtime.sdnotify import Notifier, watchdog_interval_seconds


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to about 108 bytes.
    with (
        tempfile.TemporaryDirectory(prefix="sdn") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = str(Path(directory) / "notify")
        sock.bind(path)
        sock.settimeout(1)
        yield sock, path


class TestSend:
    def test_datagrams_reach_the_socket(self, listener: tuple[socket.socket, str]) -> None:
        """READY=1, WATCHDOG=1 (with STATUS=...), and STOPPING=1 each arrive as one datagram."""
        sock, path = listener
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.ready()
        assert notifier.watchdog()
        assert notifier.watchdog("4 actors running")
        assert notifier.stopping()
        received = [sock.recv(4096) for _ in range(4)]
        assert received == [
            b"READY=1",
            b"WATCHDOG=1",
            b"WATCHDOG=1\nSTATUS=4 actors running",
            b"STOPPING=1",
        ]

    def test_several_fields_share_one_datagram(self, listener: tuple[socket.socket, str]) -> None:
        """send() joins fields with newlines; a newline inside a field cannot split it."""
        sock, path = listener
        Notifier.from_environ({"NOTIFY_SOCKET": path}).send("READY=1", "STATUS=up\nX=1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up X=1"

    @pytest.mark.skipif(sys.platform != "linux", reason="abstract sockets are Linux-only")
    def test_abstract_namespace_socket(self) -> None:
        """NOTIFY_SOCKET=@name addresses the abstract socket \\0name."""
        name = f"nproxyd-test-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            sock.settimeout(1)
            assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready()
            assert sock.recv(4096) == b"READY=1"

    def test_unset_notify_socket_is_a_silent_no_op(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing is logged."""
        with capture_logs() as logs:
            notifier = Notifier.from_environ({})
            sent = [notifier.ready(), notifier.watchdog(), notifier.stopping()]
        assert not notifier.enabled
        assert sent == [False, False, False]
        assert logs == []

    def test_unreachable_socket_never_raises_and_logs_once(self, tmp_path: Path) -> None:
        """Sending to a missing socket returns False and logs sd_notify_failed once."""
        with capture_logs() as logs:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
            sent = [notifier.watchdog() for _ in range(3)]
        assert sent == [False, False, False]
        assert [e["event"] for e in logs] == ["sd_notify_failed"]

    def test_relative_socket_path_is_refused(self) -> None:
        """A NOTIFY_SOCKET that is neither absolute nor @abstract is reported, then ignored."""
        with capture_logs() as logs:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": "relative/sock"})
            assert not notifier.ready()
        assert not notifier.enabled
        assert [e["event"] for e in logs] == ["sd_notify_failed"]


class TestWatchdog:
    def test_interval_is_half_of_watchdog_usec(self) -> None:
        """WATCHDOG_USEC=30 s asks for a ping every 15 s."""
        assert watchdog_interval_seconds({"WATCHDOG_USEC": "30000000"}) == 15.0

    def test_watchdog_pid_must_be_ours(self) -> None:
        """WATCHDOG_PID naming this process keeps the interval; another pid disables it."""
        ours = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        theirs = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        assert watchdog_interval_seconds(ours) == 1.0
        assert watchdog_interval_seconds(theirs) is None

    @pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon"])
    def test_missing_or_bad_watchdog_usec_means_no_watchdog(self, usec: str | None) -> None:
        """No usable WATCHDOG_USEC means no watchdog pings."""
        environ = {} if usec is None else {"WATCHDOG_USEC": usec}
        assert watchdog_interval_seconds(environ) is None

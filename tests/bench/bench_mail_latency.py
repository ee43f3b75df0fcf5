"""Mail from another writer (docs/design.md §6, second round): commit -> SMTP receipt latency.

``nproxyd run`` at its default intervals (the mail sender sweeps every 15 s) delivers over SMTP
to a recording server in a child process. A separate plain connection, as the web API would,
inserts one mail every 200 ms for 30 s and notes the time each INSERT committed; the server
notes when each message arrived. Printed: p50, p99 and max of commit -> receipt. The floor
measured in the same run is the NOTIFY itself, received by a LISTEN connection of the
benchmark's own (progress line on stderr).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from nproxyd.store.listener import MAIL_DUE_CHANNEL
from tests.bench.common import Databases, Figure, duration, note
from tests.pg import TestServer

INTERVAL_SECONDS = 0.2
RUN_SECONDS = 30.0
P50_TARGET_SECONDS = 0.030
P99_TARGET_SECONDS = 0.100
START_TIMEOUT_SECONDS = 60.0
DRAIN_TIMEOUT_SECONDS = 40.0
REPO_ROOT = Path(__file__).resolve().parents[2]
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


def _serve(pipe: Connection) -> None:
    """The child process: an SMTP server noting ``time.time()`` as each message arrives."""
    from aiosmtpd.controller import Controller  # noqa: PLC0415 - child process only

    arrivals: dict[str, float] = {}

    class Recorder:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received = time.time()
            match = _MESSAGE_ID.search(envelope.original_content or envelope.content)
            if match:
                arrivals[match.group(1).decode()] = received
            return "250 OK"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Recorder(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        pipe.send(port)
        while pipe.recv() != "stop":
            pipe.send(dict(arrivals))
    finally:
        controller.stop()


class RecordingSmtp:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process: BaseProcess = context.Process(target=_serve, args=(child,), daemon=True)
        self.port = 0

    def __enter__(self) -> RecordingSmtp:
        self.process.start()
        if not self.pipe.poll(30):
            raise TimeoutError("the SMTP server process did not start")
        self.port = self.pipe.recv()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pipe.send("stop")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()

    def arrivals(self) -> dict[str, float]:
        self.pipe.send("arrivals")
        received: dict[str, float] = self.pipe.recv()
        return received


def start_daemon(dsn: str, state_dir: Path, smtp_port: int) -> subprocess.Popen[bytes]:
    """``nproxyd run`` with the defaults, delivering over SMTP to the recording server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPROXYD_", "NOTIFY_SOCKET"))}
    env.update(
        NPROXYD__DATABASE__DSN=dsn,
        NPROXYD__DAEMON__STATE_DIR=str(state_dir),
        NPROXYD__HTTP__LISTEN="127.0.0.1:0",
        NPROXYD__EMAIL__TRANSPORT="smtp",
        NPROXYD__EMAIL__SMTP__HOST="127.0.0.1",
        NPROXYD__EMAIL__SMTP__PORT=str(smtp_port),
        PYTHONUNBUFFERED="1",
    )
    with (state_dir / "out").open("wb") as stdout, (state_dir / "err").open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "nproxyd", "run"],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )


async def wait_listening(daemon: subprocess.Popen[bytes], stdout: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while b'"listener_connected"' not in stdout.read_bytes():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nproxyd did not start listening (exit {daemon.poll()})")
        await anyio.sleep(0.05)
    await anyio.sleep(1.0)  # the start-up ticks are over


async def insert_steadily(dsn: str) -> tuple[dict[str, float], list[float]]:
    """One mail every ``INTERVAL_SECONDS`` for ``RUN_SECONDS``: (commit time by Message-ID,
    commit -> NOTIFY delays seen by a listener of our own)."""
    writer = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    notified: list[float] = []
    await listener.add_listener(MAIL_DUE_CHANNEL, lambda *_: notified.append(time.time()))
    committed: dict[str, float] = {}
    floor: list[float] = []
    try:
        count = int(RUN_SECONDS / INTERVAL_SECONDS)
        start = time.monotonic()
        for number in range(count):
            await anyio.sleep(max(0.0, start + number * INTERVAL_SECONDS - time.monotonic()))
            message_id = f"<latency-{number}@nproxy.localhost>"
            await writer.execute(
                "INSERT INTO mail_outbox (to_address, subject, body, message_id)"
                " VALUES ($1, 'Latency', 'One line.', $2)",
                f"user{number}@example.com",
                message_id,
            )
            committed[message_id] = time.time()
            seen = len(notified)
            while len(notified) == seen and time.time() - committed[message_id] < 1:
                await anyio.sleep(0)
            if len(notified) > seen:
                floor.append(max(0.0, notified[-1] - committed[message_id]))
    finally:
        await writer.close()
        await listener.close()
    return committed, floor


async def measure(dsn: str, smtp: RecordingSmtp, state_dir: Path) -> list[float]:
    daemon = start_daemon(dsn, state_dir, smtp.port)
    try:
        await wait_listening(daemon, state_dir / "out")
        committed, floor = await insert_steadily(dsn)
        note("mail_latency_external", f"NOTIFY alone: p50 {duration(_pct(floor, 50))}")
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        arrivals = smtp.arrivals()
        while len(set(committed) & set(arrivals)) < len(committed):
            if time.monotonic() > deadline:
                break
            await anyio.sleep(0.2)
            arrivals = smtp.arrivals()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    missing = len(set(committed) - set(arrivals))
    note("mail_latency_external", f"{len(committed)} mails, {missing} not received")
    return [
        arrivals[key] - at if key in arrivals else float("inf") for key, at in committed.items()
    ]


def _pct(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("inf")
    index = min(len(ordered) - 1, max(0, round(percent / 100 * len(ordered)) - 1))
    return ordered[index]


def _figure(name: str, seconds: float, target: float | None) -> Figure:
    limit = f"{duration(target)}(limit)" if target else "-"
    return Figure(
        name=name,
        measured=duration(seconds),
        reference=limit,
        ratio=seconds / target if target else 0.0,
        target=f"<{duration(target)}" if target else "(none)",
        passed=seconds < target if target else seconds != float("inf"),
    )


async def run(server: TestServer) -> list[Figure]:
    async with Databases(server, "latency") as databases:
        dsn = await databases.clone()
        with (
            tempfile.TemporaryDirectory(prefix="nproxyd-bench-latency-") as state,
            RecordingSmtp() as smtp,
        ):
            latencies = await measure(dsn, smtp, Path(state))
    note(
        "mail_latency_external",
        json.dumps({"mean_ms": round(statistics.fmean(latencies) * 1000, 2)}),
    )
    return [
        _figure("mail_latency_external_p50", _pct(latencies, 50), P50_TARGET_SECONDS),
        _figure("mail_latency_external_p99", _pct(latencies, 99), P99_TARGET_SECONDS),
        _figure("mail_latency_external_max", max(latencies), None),
    ]

"""Mail against the real limit: nproxyd's sender next to Postfix's C client, into one sink.

10,000 due outbox mails are delivered by one ``MailSender.tick`` (built as the daemon builds
it: ``SmtpTransport`` with ``max_connections = 4``, ``concurrency = 8``, the batch size of the
default configuration) into Postfix's ``smtp-sink``, which offers PIPELINING. The reference is
``smtp-source -s 4 -d -m 10000 -F message`` into the same sink: four parallel sessions, each
reusing its connection, sending the very message nproxyd composes for an outbox row (same
size, same headers). smtp-source itself never pipelines. Runs are A/B interleaved, three
repetitions, each nproxyd run on an identical copy of the seeded outbox.

Both programs come with Debian's ``postfix`` package; without them the benchmark says how
to install them and is skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import msgspec

from nproxyd.core.config import Config
from nproxyd.core.mail import compose_message
from tests.bench.bench_mail import MAILS, MAX_CONNECTIONS, seed_outbox, sender_tick
from tests.bench.common import (
    NOW,
    Databases,
    Figure,
    Stopwatch,
    connected,
    duration,
    median,
    note,
    significant,
    spread,
)
from tests.pg import TestServer

BENCH = "mail_vs_smtp_source"
REPETITIONS = 3
RATIO_TARGET = 0.5
SESSIONS = MAX_CONNECTIONS
INSTALL = (
    "smtp-sink/smtp-source not found: they come with Debian's postfix package"
    " (as root: DEBIAN_FRONTEND=noninteractive apt-get install -y postfix;"
    " the postfix daemon itself is not needed and need not run)"
)
_SEARCH = "/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin"


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SEARCH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Sink:
    """``smtp-sink`` on 127.0.0.1 (it offers PIPELINING by default), stopped on exit."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sink:
        command = [self.binary, f"127.0.0.1:{self.port}", "256"]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]  # it refuses to run as root otherwise
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("smtp-sink exited at start") from None
                time.sleep(0.05)
        raise TimeoutError("smtp-sink did not listen")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def sink_config(port: int) -> Config:
    config = Config()
    smtp = msgspec.structs.replace(
        config.email.smtp, host="127.0.0.1", port=port, max_connections=MAX_CONNECTIONS
    )
    email = msgspec.structs.replace(config.email, transport="smtp", smtp=smtp)
    return msgspec.structs.replace(config, email=email)


async def one_message(dsn: str, config: Config) -> bytes:
    """The bytes nproxyd composes for the first seeded outbox row."""
    async with connected(dsn) as connection:
        row = await connection.fetchrow(
            "SELECT to_address, subject, body, message_id FROM mail_outbox ORDER BY id LIMIT 1"
        )
    assert row is not None
    message = compose_message(
        from_address=config.email.from_address,
        to_address=row["to_address"],
        subject=row["subject"],
        body=row["body"],
        message_id=row["message_id"],
        date=NOW,
    )
    return message.as_bytes()


async def smtp_source(binary: str, port: int, message_file: Path) -> float:
    command = [
        binary,
        "-s",
        str(SESSIONS),
        "-d",
        "-m",
        str(MAILS),
        "-F",
        str(message_file),
        "-f",
        "billing@nproxy.localhost",
        "-t",
        "user@example.com",
        f"127.0.0.1:{port}",
    ]
    with Stopwatch() as watch:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, errors = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {errors.decode(errors='replace')[:500]}")
    return watch.seconds


async def run(server: TestServer) -> list[Figure]:
    sink_binary, source_binary = tool("smtp-sink"), tool("smtp-source")
    if sink_binary is None or source_binary is None:
        note(BENCH, f"skipped: {INSTALL}")
        return []
    ours: list[float] = []
    theirs: list[float] = []
    sent: list[int] = []
    async with Databases(server, "mailsrc") as databases:
        seeded = await databases.clone()
        await seed_outbox(seeded)
        with Sink(sink_binary) as sink, tempfile.TemporaryDirectory() as scratch:
            config = sink_config(sink.port)
            message_file = Path(scratch) / "message.eml"
            message_file.write_bytes(await one_message(seeded, config))
            copies = [await databases.copy(seeded) for _ in range(REPETITIONS)]
            for repetition, dsn in enumerate(copies, start=1):
                seconds, report = await sender_tick(dsn, config)
                ours.append(seconds)
                sent.append(report.sent_count)
                theirs.append(await smtp_source(source_binary, sink.port, message_file))
                note(
                    BENCH,
                    f"run {repetition}: nproxyd {duration(seconds)} ({report.sent_count} sent),"
                    f" smtp-source {duration(theirs[-1])}",
                )
                await databases.drop(dsn)
    ratio = median(theirs) / median(ours)
    complete = all(count == MAILS for count in sent)
    rate = MAILS / median(ours)
    return [
        Figure(
            name=BENCH,
            measured=f"{duration(median(ours))}{spread(ours)}({significant(rate)}/s)",
            reference=f"{duration(median(theirs))}{spread(theirs)}(smtp-source -s {SESSIONS} -d)",
            ratio=ratio,
            target=f">={RATIO_TARGET:g}x",
            passed=complete and ratio >= RATIO_TARGET,
        )
    ]

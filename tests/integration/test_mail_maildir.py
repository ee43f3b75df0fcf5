"""MaildirTransport writes real files into a Maildir."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import anyio
import pytest

from nproxyd.adapters.mail_maildir import MaildirTransport
from nproxyd.core.errors import MailPermanentError, MailTransientError

pytestmark = pytest.mark.anyio


def compose(subject: str = "Hello") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "nproxy billing <billing@nproxy.localhost>"
    message["To"] = "alice@example.test"
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="nproxy.localhost")
    message.set_content("Your current subscription period is ending soon.\nÜmlaut ok.\n")
    return message


def files_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


class TestMaildir:
    async def test_message_lands_in_new_with_identical_bytes(self, tmp_path: Path) -> None:
        """The file in new/ is the message's bytes after a Delivered-To line."""
        maildir = tmp_path / "mail"
        transport = MaildirTransport(maildir, hostname="host.example")
        message = compose()

        await transport.send(message, "alice@example.test")

        [stored] = files_in(maildir / "new")
        content = stored.read_bytes()
        assert content == b"Delivered-To: alice@example.test\n" + message.as_bytes()
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        assert parsed["Delivered-To"] == "alice@example.test"
        assert parsed["Subject"] == "Hello"
        assert parsed["Message-ID"] == message["Message-ID"]
        assert parsed.get_content() == message.get_content()
        assert stored.name.endswith(".host.example")
        assert files_in(maildir / "tmp") == []
        assert (maildir / "cur").is_dir()

    async def test_injected_time_names_the_file(self, tmp_path: Path) -> None:
        """The file name starts with the injected time, not the wall clock."""
        transport = MaildirTransport(tmp_path, hostname="h", now=lambda: 1_700_000_000.25)
        await transport.send(compose(), "alice@example.test")

        [stored] = files_in(tmp_path / "new")
        assert stored.name.startswith("1700000000.M250000P")

    async def test_concurrent_writes_produce_distinct_files(self, tmp_path: Path) -> None:
        """100 concurrent sends at one frozen instant give 100 distinct, complete files."""
        transport = MaildirTransport(tmp_path, hostname="h", now=lambda: 1_700_000_000.0)
        async with anyio.create_task_group() as group:
            for index in range(100):
                group.start_soon(transport.send, compose(subject=f"m{index}"), "a@example.test")
        await transport.aclose()

        stored = files_in(tmp_path / "new")
        assert len({path.name for path in stored}) == 100
        subjects = {
            email.message_from_bytes(path.read_bytes(), policy=email.policy.default)["Subject"]
            for path in stored
        }
        assert subjects == {f"m{index}" for index in range(100)}
        assert files_in(tmp_path / "tmp") == []

    async def test_recipient_with_line_break_is_permanent(self, tmp_path: Path) -> None:
        """A recipient that would inject a header is refused for good and nothing is written."""
        transport = MaildirTransport(tmp_path)
        with pytest.raises(MailPermanentError):
            await transport.send(compose(), "a@example.test\nBcc: evil@example.test")
        assert files_in(tmp_path / "new") == []

    async def test_unwritable_maildir_is_transient(self, tmp_path: Path) -> None:
        """An OS error (here: the path is a file) is transient."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        transport = MaildirTransport(blocker)
        with pytest.raises(MailTransientError, match="not-a-dir"):
            await transport.send(compose(), "alice@example.test")

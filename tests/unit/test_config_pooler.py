"""Configuration for running behind a pooler: database.pooler, database.direct_dsn(_file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nproxyd.app import session_dsn
from nproxyd.core.config import load, redact_text, redacted, secrets_of
from nproxyd.core.errors import ConfigError

DIRECT = "postgresql://owner:s3cret-direct@db.internal:5432/nproxy"
POOLED = "postgresql://app:hunter2@pgbouncer.internal:6432/nproxy"


class TestPoolerConfig:
    def test_pooler_defaults_to_none_without_direct_dsn(self) -> None:
        """By default there is no pooler and no direct DSN."""
        database = load(None, {}).database
        assert (database.pooler, database.direct_dsn) == ("none", "")

    def test_unknown_pooler_is_an_error_naming_the_key(self) -> None:
        """Only "none" and "pgbouncer" are accepted."""
        with pytest.raises(ConfigError) as raised:
            load(None, {"NPROXYD__DATABASE__POOLER": "pgpool"})
        assert raised.value.key == "database.pooler"

    def test_direct_dsn_is_a_secret_everywhere(self) -> None:
        """direct_dsn shows as *** and its password is scrubbed from logs and errors."""
        config = load(
            None,
            {
                "NPROXYD__DATABASE__POOLER": "pgbouncer",
                "NPROXYD__DATABASE__DSN": POOLED,
                "NPROXYD__DATABASE__DIRECT_DSN": DIRECT,
            },
        )
        text = json.dumps(redacted(config))
        assert "s3cret-direct" not in text
        assert redacted(config)["database"]["direct_dsn"] == "***"
        scrubbed = redact_text("auth failed owner:s3cret-direct@db", secrets_of(config))
        assert scrubbed == "auth failed owner:***@db"

    def test_direct_dsn_file_fills_direct_dsn(self, tmp_path: Path) -> None:
        """direct_dsn_file is read like the other *_file secrets."""
        (tmp_path / "direct").write_text(DIRECT + "\n")
        environ = {
            "NPROXYD__DATABASE__DIRECT_DSN_FILE": "direct",
            "CREDENTIALS_DIRECTORY": str(tmp_path),
        }
        config = load(None, environ)
        assert config.database.direct_dsn == DIRECT


class TestSessionDsn:
    @pytest.mark.parametrize(
        ("environ", "expected"),
        [
            ({}, POOLED),
            ({"NPROXYD__DATABASE__POOLER": "pgbouncer"}, None),
            (
                {"NPROXYD__DATABASE__POOLER": "pgbouncer", "NPROXYD__DATABASE__DIRECT_DSN": DIRECT},
                DIRECT,
            ),
            ({"NPROXYD__DATABASE__DIRECT_DSN": DIRECT}, DIRECT),
        ],
        ids=["no-pooler", "pgbouncer-alone", "pgbouncer-direct", "direct-without-pooler"],
    )
    def test_session_dsn(self, environ: dict[str, str], expected: str | None) -> None:
        """A session (LISTEN, migration lock) uses direct_dsn, else dsn unless behind a pooler."""
        assert session_dsn(load(None, environ), POOLED) == expected

"""The one table from error classes to exit codes, and the driver's refusals at the store."""

from __future__ import annotations

import asyncpg
import pytest

from nproxyd.cli import EXIT_CODES, exit_code, project_error
from nproxyd.core.errors import (
    ConfigError,
    DaemonUnreachable,
    DatabaseRefused,
    DatabaseUnavailable,
    MigrationError,
    NproxydError,
    PortBusy,
    StoreError,
    SupervisorGaveUp,
)
from nproxyd.runtime.status import render, status_url
from nproxyd.store.database import map_errors


class TestExitCodes:
    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (ConfigError("http.listen", "bad"), 78),
            (DatabaseRefused("the server refused the password"), 78),
            (DatabaseUnavailable(), 69),
            (DaemonUnreachable("cannot reach http://127.0.0.1:1/status"), 69),
            (PortBusy("http.listen: in use"), 75),
            (SupervisorGaveUp("mail-sender"), 70),
            (MigrationError("0003 failed"), 1),
            (StoreError("database error 23505"), 1),
        ],
    )
    def test_each_error_class_has_the_exit_code_of_its_meaning(
        self, error: NproxydError, code: int
    ) -> None:
        """78 config/credentials, 69 unreachable now, 75 busy port, 70 only the supervisor."""
        assert exit_code(error)[0] == code

    def test_the_daemon_being_unreachable_is_not_a_database_error(self) -> None:
        """`status` against a stopped daemon does not claim the database failed."""
        assert not isinstance(DaemonUnreachable(), StoreError)

    def test_only_the_supervisor_exits_70(self) -> None:
        """No row but SupervisorGaveUp's maps to 70."""
        assert [kind for kind, code, _ in EXIT_CODES if code == 70] == [SupervisorGaveUp]

    def test_an_error_inside_nested_task_groups_is_found(self) -> None:
        """A project error wrapped by task groups decides the exit code, not the group."""
        group = ExceptionGroup(
            "outer", [ExceptionGroup("inner", [ValueError("x"), DatabaseUnavailable()])]
        )
        assert isinstance(project_error(group), DatabaseUnavailable)
        assert project_error(ExceptionGroup("g", [ValueError("x")])) is None


class TestStoreBoundary:
    @pytest.mark.parametrize(
        "driver_error",
        [
            asyncpg.InvalidPasswordError,
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError,
        ],
    )
    def test_credentials_refused_by_the_server_are_a_database_dsn_error(
        self, driver_error: type[asyncpg.PostgresError]
    ) -> None:
        """A wrong password, unknown role or database is a config error naming database.dsn."""
        with pytest.raises(DatabaseRefused) as caught, map_errors():
            raise driver_error('password authentication failed for user "billing"')
        assert caught.value.key == "database.dsn"
        assert isinstance(caught.value, ConfigError)
        assert "billing" not in str(caught.value)


class TestStatusRendering:
    def test_status_url_accepts_the_base_or_the_full_url(self) -> None:
        """A base URL gains /status; a /status URL is kept; a bare host:port gets http://."""
        assert status_url("http://h:9187") == "http://h:9187/status"
        assert status_url("http://h:9187/") == "http://h:9187/status"
        assert status_url("http://h:9187/status") == "http://h:9187/status"
        assert status_url("h:9187") == "http://h:9187/status"

    def test_the_table_has_no_python_reprs(self) -> None:
        """Mappings render as key=value, booleans as yes/no, nothing as '-'."""
        text = render(
            {
                "instance": "i-1",
                "ready": False,
                "outbox": {"pending": 0, "dead": 2},
                "provider_keys": None,
                "actors": {
                    "mail-sender": {
                        "ready": False,
                        "last_outcome": "error",
                        "last_error": "MailTransientError: connection refused",
                    }
                },
            }
        )
        assert "pending=0 dead=2" in text
        assert "{" not in text
        assert "None" not in text
        assert "False" not in text
        assert "mail-sender: MailTransientError: connection refused" in text

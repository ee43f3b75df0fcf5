"""Configuration loading, overrides, secrets and redaction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from nproxyd.core import config
from nproxyd.core.config import (
    dsn_password,
    load,
    redact_text,
    redacted,
    secrets_of,
)
from nproxyd.core.errors import ConfigError

# The built-in defaults, written out: a changed default is a decision, not a side effect.
# (Keys added later are documented and checked by test_configdoc.)
DEFAULTS: dict[str, object] = {
    "database.dsn": "",
    "database.dsn_file": "",
    "database.auto_migrate": True,
    "database.pool_max_size": 10,
    "database.connect_timeout_seconds": 5.0,
    "database.pooler": "none",
    "database.direct_dsn": "",
    "database.direct_dsn_file": "",
    "daemon.state_dir": "",
    "daemon.instance_id": "",
    "daemon.shutdown_grace_seconds": 10.0,
    "daemon.max_restarts": 5,
    "daemon.restart_window_seconds": 60.0,
    "http.listen": "127.0.0.1:9187",
    "log.level": "info",
    "log.format": "json",
    "urls.app_base_url": "http://127.0.0.1:3000",
    "billing.renewal_lead_time_hours": 72.0,
    "billing.payment_provider": "simulated",
    "billing.provider_concurrency": 8,
    "billing.failed_retry_hours": 24.0,
    "billing.claim_lease_seconds": 120.0,
    "billing.retry_base_seconds": 60.0,
    "billing.retry_max_seconds": 3600.0,
    "billing.operator_email": "",
    "payment.simulated.invoice_ttl_hours": 24.0,
    "payment.simulated.latency_ms": 0,
    "payment.simulated.failure_rate": 0.0,
    "payment.simulated.paid_after_seconds": 300.0,
    "payment.simulated.partial_fraction": 0.0,
    "payment.nowpayments.api_base_url": "https://api.nowpayments.io/v1",
    "payment.nowpayments.api_key": "",
    "payment.nowpayments.api_key_file": "",
    "payment.nowpayments.pay_currency": "usdttrc20",
    "payment.nowpayments.timeout_seconds": 30.0,
    "payment.nowpayments.ipn_secret": "",
    "payment.nowpayments.ipn_secret_file": "",
    "payment.nowpayments.max_requests_per_second": 5.0,
    "email.transport": "maildir",
    "email.from_address": "nproxy billing <billing@nproxy.localhost>",
    "email.smtp.host": "127.0.0.1",
    "email.smtp.port": 25,
    "email.smtp.security": "none",
    "email.smtp.username": "",
    "email.smtp.password": "",
    "email.smtp.password_file": "",
    "email.smtp.timeout_seconds": 30.0,
    "email.smtp.max_connections": 4,
    "email.smtp.helo_name": "",
    "email.maildir.path": "",
    "key_pool.cooldown_minutes": 10.0,
    "key_pool.failures_before_manual_review": 3,
    "key_pool.balance_poll_seconds": 60.0,
    "key_pool.balance_probe_concurrency": 8,
    "actors.invoice_expirer.enabled": True,
    "actors.invoice_expirer.interval_seconds": 60.0,
    "actors.invoice_expirer.batch_size": 10000,
    "actors.renewal_scheduler.enabled": True,
    "actors.renewal_scheduler.interval_seconds": 300.0,
    "actors.renewal_scheduler.batch_size": 500,
    "actors.mail_sender.enabled": True,
    "actors.mail_sender.interval_seconds": 15.0,
    "actors.mail_sender.max_attempts": 8,
    "actors.mail_sender.batch_size": 1000,
    "actors.mail_sender.lease_seconds": 120.0,
    "actors.mail_sender.retry_base_seconds": 30.0,
    "actors.mail_sender.retry_max_seconds": 3600.0,
    "actors.key_pool_recoverer.enabled": True,
    "actors.key_pool_recoverer.interval_seconds": 60.0,
    "actors.payment_watcher.enabled": True,
    "actors.payment_watcher.interval_seconds": 60.0,
    "actors.payment_watcher.min_check_seconds": 60.0,
    "actors.payment_watcher.max_check_seconds": 1800.0,
    "actors.payment_watcher.grace_hours": 72.0,
    "health.outbox_stuck_seconds": 900.0,
    "health.provider_failing_seconds": 1800.0,
    "health.mail_failing_seconds": 1800.0,
    "health.max_tick_seconds": 900.0,
    "ipn.listen": "",
}


def flatten(value: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted.key, value)`` for every leaf of a nested dict."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "nproxyd.toml"
    path.write_text(text)
    return str(path)


class TestLoad:
    def test_no_file_and_no_environment_gives_the_defaults(self) -> None:
        """Built-in defaults apply when nothing is configured."""
        values = dict(flatten(msgspec.to_builtins(load(None, {}))))
        assert {key: values.get(key) for key in DEFAULTS} == DEFAULTS

    def test_file_values_override_defaults(self, tmp_path: Path) -> None:
        """A TOML file sets nested keys."""
        path = write(tmp_path, "[actors.mail_sender]\ninterval_seconds = 3\nbatch_size = 9\n")
        config = load(path, {})
        assert (
            config.actors.mail_sender.interval_seconds,
            config.actors.mail_sender.batch_size,
        ) == (
            3,
            9,
        )

    def test_environment_overrides_file_with_typed_values(self, tmp_path: Path) -> None:
        """NPROXYD__SECTION__KEY wins over the file and is parsed to the key's type."""
        path = write(tmp_path, "[billing]\nrenewal_lead_time_hours = 24\n")
        config = load(
            path,
            {
                "NPROXYD__BILLING__RENEWAL_LEAD_TIME_HOURS": "48",
                "NPROXYD__ACTORS__MAIL_SENDER__ENABLED": "false",
                "NPROXYD__EMAIL__SMTP__PORT": "2525",
                "UNRELATED": "x",
            },
        )
        assert config.billing.renewal_lead_time_hours == 48
        assert config.actors.mail_sender.enabled is False
        assert config.email.smtp.port == 2525

    @pytest.mark.parametrize(
        ("environ", "key"),
        [
            ({"NPROXYD__BILLING__NOPE": "1"}, "billing.nope"),
            (
                {"NPROXYD__BILLING__RENEWAL_LEAD_TIME_HOURS": "soon"},
                "billing.renewal_lead_time_hours",
            ),
            ({"NPROXYD__BILLING__PROVIDER_CONCURRENCY": "0"}, "billing.provider_concurrency"),
            ({"NPROXYD__EMAIL__TRANSPORT": "pigeon"}, "email.transport"),
            ({"NPROXYD__EMAIL": "x"}, "email"),
        ],
    )
    def test_bad_environment_values_name_the_key(self, environ: dict[str, str], key: str) -> None:
        """Unknown keys, wrong types and out-of-range values are errors naming the key."""
        with pytest.raises(ConfigError) as caught:
            load(None, environ)
        assert caught.value.key == key

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ("[email.smtp]\nfoo = 1\n", "email.smtp.foo"),
            ("[billing]\nrenewal_lead_time_hours = 'x'\n", "billing.renewal_lead_time_hours"),
            ("[email.smtp]\nport = 70000\n", "email.smtp.port"),
            ("[nonsense]\n", "nonsense"),
            ("not toml at all [", "--config"),
        ],
    )
    def test_bad_file_values_name_the_key(self, tmp_path: Path, text: str, key: str) -> None:
        """Errors in the file name the dotted key (or the file when it is not TOML)."""
        with pytest.raises(ConfigError) as caught:
            load(write(tmp_path, text), {})
        assert caught.value.key == key

    def test_missing_file_is_a_config_error(self, tmp_path: Path) -> None:
        """A config path that does not exist is a configuration error."""
        with pytest.raises(ConfigError, match="file not found"):
            load(str(tmp_path / "missing.toml"), {})

    def test_config_is_frozen(self) -> None:
        """Config Structs cannot be mutated."""
        config = load(None, {})
        with pytest.raises(AttributeError):
            config.billing.renewal_lead_time_hours = 1  # type: ignore[misc]


class TestSecretFiles:
    def test_file_keys_fill_secrets_relative_to_credentials_directory(self, tmp_path: Path) -> None:
        """A relative *_file path is read from $CREDENTIALS_DIRECTORY, trailing newline dropped."""
        (tmp_path / "np-key").write_text("k-123\n")
        config = load(
            None,
            {
                "NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY_FILE": "np-key",
                "CREDENTIALS_DIRECTORY": str(tmp_path),
            },
        )
        assert config.payment.nowpayments.api_key == "k-123"

    def test_both_secret_and_file_is_an_error(self, tmp_path: Path) -> None:
        """Setting a secret and its *_file at once is refused, naming the file key."""
        (tmp_path / "pw").write_text("x")
        with pytest.raises(ConfigError) as caught:
            load(
                None,
                {
                    "NPROXYD__EMAIL__SMTP__PASSWORD": "y",
                    "NPROXYD__EMAIL__SMTP__PASSWORD_FILE": str(tmp_path / "pw"),
                },
            )
        assert caught.value.key == "email.smtp.password_file"

    def test_unreadable_secret_file_names_the_key(self, tmp_path: Path) -> None:
        """A *_file that cannot be read stops loading with its key."""
        with pytest.raises(ConfigError) as caught:
            load(None, {"NPROXYD__DATABASE__DSN_FILE": str(tmp_path / "none")})
        assert caught.value.key == "database.dsn_file"


class TestRedaction:
    ENV = {
        "NPROXYD__DATABASE__DSN": "postgresql://app:hunter2@db.internal:5432/nproxy",
        "NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY": "np-secret-key",
        "NPROXYD__EMAIL__SMTP__PASSWORD": "smtp-pass",
    }

    def test_redacted_config_hides_every_secret(self) -> None:
        """check-config's JSON shows secrets as *** and contains no secret value."""
        config = load(None, self.ENV)
        text = json.dumps(redacted(config))
        for secret in ("hunter2", "np-secret-key", "smtp-pass"):
            assert secret not in text
        data = redacted(config)
        assert data["payment"]["nowpayments"]["api_key"] == "***"
        assert data["email"]["smtp"]["password"] == "***"
        assert data["database"]["dsn"] == "***"

    def test_empty_secrets_stay_empty(self) -> None:
        """An unset secret is shown as empty, not as ***."""
        assert redacted(load(None, {}))["email"]["smtp"]["password"] == ""

    def test_secrets_include_the_dsn_password(self) -> None:
        """The DSN's password is a secret of its own, for scrubbing logs and errors."""
        secrets = secrets_of(load(None, self.ENV))
        assert "hunter2" in secrets
        assert redact_text("failed for app:hunter2@db", secrets) == "failed for app:***@db"

    @pytest.mark.parametrize(
        ("dsn", "password"),
        [
            ("postgresql://u:p%40ss@h/db", "p%40ss"),
            ("postgresql://u@h/db", ""),
            ("host=h user=u password=pw dbname=d", "pw"),
        ],
    )
    def test_dsn_password_forms(self, dsn: str, password: str) -> None:
        """The password is found in URL and keyword DSNs."""
        assert dsn_password(dsn) == password

    def test_redacted_output_round_trips_as_json(self) -> None:
        """The effective config encodes to JSON with every section."""
        encoded = msgspec.json.encode(redacted(load(None, {})))
        assert set(json.loads(encoded)) == {
            "database",
            "daemon",
            "http",
            "log",
            "urls",
            "billing",
            "payment",
            "email",
            "key_pool",
            "actors",
            "health",
            "ipn",
        }


def _parse_with_asyncpg(dsn: str) -> bool:
    """Whether asyncpg's own DSN parser accepts ``dsn`` (the driver nproxyd connects with)."""
    from nproxyd.store.database import driver_dsn_problem  # noqa: PLC0415 - the driver side

    return driver_dsn_problem(dsn, []) is None


BAD_DSNS = [
    "mysql://billing:pw@db/nproxy",
    "postgresql+asyncpg://billing:pw@db/nproxy",
    "host=db dbname=nproxy user=billing",
    "postgresql://billing:pw@db/nproxy?sslmode=bogus",
    "postgresql://billing:se/cret@db/nproxy",
    "postgresql://billing:se#cret@db/nproxy",
    "postgresql://billing:se?cret@db/nproxy",
    "postgresql://billing:pw@db:port/nproxy",
    "postgresql://billing:pw@db,/nproxy",
    "postgresql://billing:pw@[::1/nproxy",
]
GOOD_DSNS = [
    "postgresql://billing:pw@db.internal:5432/nproxy",
    "postgres://billing@db/nproxy?sslmode=require",
    "postgresql://billing:se%2Fcret%23x%3F@db/nproxy",
    "postgresql://postgres:@/postgres?host=/tmp/pg",
    "postgresql://billing@[::1]:6432/nproxy",
    "postgresql://billing@db1:5432,db2:5433/nproxy?target_session_attrs=primary",
    "postgresql:///nproxy?host=/run/postgresql&port=5433",
]


class TestValidation:
    """`load` runs every check `run` relies on, so `check-config` refuses what `run` refuses."""

    @pytest.mark.parametrize(
        ("variable", "value", "key"),
        [
            ("ACTORS__MAIL_SENDER__INTERVAL_SECONDS", "inf", "actors.mail_sender.interval_seconds"),
            ("ACTORS__MAIL_SENDER__INTERVAL_SECONDS", "1e-9", "actors.mail_sender"),
            ("ACTORS__INVOICE_EXPIRER__INTERVAL_SECONDS", "0.05", "actors.invoice_expirer"),
            ("ACTORS__MAIL_SENDER__LEASE_SECONDS", "1e300", "actors.mail_sender.lease_seconds"),
            ("BILLING__CLAIM_LEASE_SECONDS", "1e300", "billing.claim_lease_seconds"),
            ("BILLING__RENEWAL_LEAD_TIME_HOURS", "1e300", "billing.renewal_lead_time_hours"),
            ("BILLING__RENEWAL_LEAD_TIME_HOURS", "inf", "billing.renewal_lead_time_hours"),
            ("DAEMON__SHUTDOWN_GRACE_SECONDS", "inf", "daemon.shutdown_grace_seconds"),
            ("KEY_POOL__COOLDOWN_MINUTES", "1e300", "key_pool.cooldown_minutes"),
            ("PAYMENT__SIMULATED__LATENCY_MS", "99999999999", "payment.simulated.latency_ms"),
            ("ACTORS__MAIL_SENDER__MAX_ATTEMPTS", "99999999999", "actors.mail_sender.max_attempts"),
            ("HTTP__LISTEN", "localhost", "http.listen"),
            ("HTTP__LISTEN", "127.0.0.1:99999", "http.listen"),
            ("HTTP__LISTEN", "local host:9187", "http.listen"),
            ("BILLING__PAYMENT_PROVIDER", "nowpayments", "payment.nowpayments.api_key"),
            ("EMAIL__FROM_ADDRESS", "", "email.from_address"),
            ("EMAIL__FROM_ADDRESS", "billing@nproxy.example\r\nBcc: x@y", "email.from_address"),
            ("EMAIL__FROM_ADDRESS", "nproxy billing <not an address>", "email.from_address"),
            ("URLS__APP_BASE_URL", "app.nproxy.example", "urls.app_base_url"),
            ("EMAIL__SMTP__HELO_NAME", "mail.example\r\nRSET", "email.smtp.helo_name"),
            ("EMAIL__SMTP__HELO_NAME", "mail host", "email.smtp.helo_name"),
            ("EMAIL__SMTP__HELO_NAME", "-mail.example", "email.smtp.helo_name"),
            ("EMAIL__SMTP__HELO_NAME", "a" * 64 + ".example", "email.smtp.helo_name"),
        ],
    )
    def test_unusable_values_are_refused_naming_the_key(
        self, variable: str, value: str, key: str
    ) -> None:
        """Values `run` cannot work with (infinite, tiny, huge, malformed) are refused by key."""
        with pytest.raises(ConfigError) as caught:
            load(None, {f"NPROXYD__{variable}": value})
        assert caught.value.key.startswith(key)

    def test_zero_stays_allowed_where_the_key_allows_it(self) -> None:
        """A duration of 0 where 0 is allowed (no shutdown grace) and a small latency in ms pass."""
        config = load(
            None,
            {
                "NPROXYD__DAEMON__SHUTDOWN_GRACE_SECONDS": "0",
                "NPROXYD__PAYMENT__SIMULATED__LATENCY_MS": "20",
                "NPROXYD__HTTP__LISTEN": "[::1]:9187",
                "NPROXYD__EMAIL__FROM_ADDRESS": "billing@nproxy.example",
                "NPROXYD__EMAIL__SMTP__HELO_NAME": "[192.0.2.1]",
            },
        )
        assert config.daemon.shutdown_grace_seconds == 0

    @pytest.mark.parametrize("dsn", BAD_DSNS)
    def test_a_dsn_the_driver_refuses_is_refused_without_quoting_it(self, dsn: str) -> None:
        """A DSN asyncpg cannot use is a database.dsn error that shows no part of the DSN."""
        with pytest.raises(ConfigError) as caught:
            load(None, {"NPROXYD__DATABASE__DSN": dsn})
        assert caught.value.key == "database.dsn"
        for part in ("pw", "cret", "billing", "nproxy?", "db/"):
            assert part not in caught.value.reason

    @pytest.mark.parametrize("dsn", BAD_DSNS + GOOD_DSNS)
    def test_dsn_rule_agrees_with_the_drivers_parser(self, dsn: str) -> None:
        """nproxyd's DSN check accepts exactly what asyncpg's own parser accepts."""
        assert (config.dsn_problem(dsn) is None) == _parse_with_asyncpg(dsn)

    def test_a_non_utf8_config_file_is_refused(self, tmp_path: Path) -> None:
        """A config file that is not UTF-8 is a --config error, not a traceback."""
        path = tmp_path / "nproxyd.toml"
        path.write_bytes(b'[email]\nfrom_address = "caf\xe9 <a@b.example>"\n')
        with pytest.raises(ConfigError) as caught:
            load(str(path), {})
        assert caught.value.key == "--config"
        assert "UTF-8" in caught.value.reason

    def test_a_non_utf8_secret_file_is_refused_naming_its_key(self, tmp_path: Path) -> None:
        """A secret file that is not UTF-8 is an error naming the *_file key."""
        secret = tmp_path / "api-key"
        secret.write_bytes(b"key-\xff\xfe\n")
        with pytest.raises(ConfigError) as caught:
            load(None, {"NPROXYD__PAYMENT__NOWPAYMENTS__API_KEY_FILE": str(secret)})
        assert caught.value.key == "payment.nowpayments.api_key_file"

    def test_a_nul_in_a_text_setting_is_refused_naming_its_key(self, tmp_path: Path) -> None:
        """A NUL in any text setting, however deep its section, is an error naming the key."""
        path = write(tmp_path, '[email.smtp]\nhost = "mail\\u0000.example"\n')
        with pytest.raises(ConfigError) as caught:
            load(path, {})
        assert caught.value.key == "email.smtp.host"
        assert "NUL" in caught.value.reason

    def test_a_non_utf8_environment_value_is_refused_naming_its_key(self) -> None:
        """An environment value with bytes that are not UTF-8 is an error naming the key."""
        value = b"caf\xe9 <a@b.example>".decode("utf-8", "surrogateescape")
        with pytest.raises(ConfigError) as caught:
            load(None, {"NPROXYD__EMAIL__FROM_ADDRESS": value})
        assert caught.value.key == "email.from_address"

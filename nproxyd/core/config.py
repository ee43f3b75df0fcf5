"""Configuration: TOML file -> environment overrides -> secret files -> frozen Structs.

Precedence, lowest first: built-in defaults, the TOML file, ``NPROXYD__SECTION__KEY``
environment variables, then ``*_file`` keys that fill the matching secret key.
"""

# No postponed annotations here: msgspec reads these types when a configuration is first
# converted, and resolving string annotations was most of reading one (docs/benchmarks.md
# "Start-up").

import email.utils
import math
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from nproxyd.core.errors import ConfigError
from nproxyd.core.rules import address_problem

ENV_PREFIX = "NPROXYD__"
REDACTED = "***"

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A configuration section: frozen, and unknown keys are errors."""


class DatabaseConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    dsn: str = ""
    dsn_file: str = ""
    auto_migrate: bool = True
    pool_max_size: Annotated[int, msgspec.Meta(ge=2, le=500)] = 10
    connect_timeout_seconds: Positive = 5.0
    pooler: Literal["none", "pgbouncer"] = "none"
    direct_dsn: str = ""
    direct_dsn_file: str = ""


class DaemonConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    state_dir: str = ""
    instance_id: str = ""
    shutdown_grace_seconds: NonNegative = 10.0
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_window_seconds: Positive = 60.0


class HttpConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:9187"


class LogConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class UrlsConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    app_base_url: str = "http://127.0.0.1:3000"


class BillingConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    renewal_lead_time_hours: Positive = 72.0
    payment_provider: Literal["simulated", "nowpayments"] = "simulated"
    provider_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    failed_retry_hours: Positive = 24.0
    claim_lease_seconds: Positive = 120.0
    retry_base_seconds: Positive = 60.0
    retry_max_seconds: Positive = 3600.0
    operator_email: str = ""


class SimulatedPaymentConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    invoice_ttl_hours: Positive = 24.0
    latency_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    failure_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    paid_after_seconds: NonNegative = 300.0
    partial_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0


class NowPaymentsConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    api_base_url: str = "https://api.nowpayments.io/v1"
    api_key: str = ""
    api_key_file: str = ""
    pay_currency: str = "usdttrc20"
    timeout_seconds: Positive = 30.0
    ipn_secret: str = ""
    ipn_secret_file: str = ""
    max_requests_per_second: Annotated[float, msgspec.Meta(ge=0.1, le=1000)] = 5.0


class PaymentConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    simulated: SimulatedPaymentConfig = SimulatedPaymentConfig()
    nowpayments: NowPaymentsConfig = NowPaymentsConfig()


class SmtpConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 25
    security: Literal["none", "starttls", "tls"] = "none"
    username: str = ""
    password: str = ""
    password_file: str = ""
    timeout_seconds: Positive = 30.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    helo_name: str = ""


class MaildirConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    path: str = ""


class EmailConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    transport: Literal["smtp", "maildir"] = "maildir"
    from_address: str = "nproxy billing <billing@nproxy.localhost>"
    smtp: SmtpConfig = SmtpConfig()
    maildir: MaildirConfig = MaildirConfig()


class KeyPoolConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    cooldown_minutes: Positive = 10.0
    failures_before_manual_review: Count = 3
    balance_poll_seconds: Positive = 60.0
    balance_probe_concurrency: Count = 8


class InvoiceExpirerConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    interval_seconds: Positive = 60.0
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10_000


class RenewalSchedulerConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    interval_seconds: Positive = 300.0
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500
    full_pass_seconds: Positive = 3600.0


class MailSenderConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    interval_seconds: Positive = 15.0
    max_attempts: Count = 8
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    lease_seconds: Positive = 120.0
    retry_base_seconds: Positive = 30.0
    retry_max_seconds: Positive = 3600.0


class KeyPoolRecovererConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    interval_seconds: Positive = 60.0


class PaymentWatcherConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    interval_seconds: Annotated[float, msgspec.Meta(ge=0.1)] = 60.0
    min_check_seconds: Annotated[float, msgspec.Meta(ge=1)] = 60.0
    max_check_seconds: Annotated[float, msgspec.Meta(ge=1)] = 1800.0
    grace_hours: NonNegative = 72.0


class ActorsConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    invoice_expirer: InvoiceExpirerConfig = InvoiceExpirerConfig()
    renewal_scheduler: RenewalSchedulerConfig = RenewalSchedulerConfig()
    mail_sender: MailSenderConfig = MailSenderConfig()
    key_pool_recoverer: KeyPoolRecovererConfig = KeyPoolRecovererConfig()
    payment_watcher: PaymentWatcherConfig = PaymentWatcherConfig()


class IpnConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = ""


class HealthConfig(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    outbox_stuck_seconds: Annotated[float, msgspec.Meta(ge=1, le=604_800)] = 900.0
    provider_failing_seconds: Annotated[float, msgspec.Meta(ge=1, le=604_800)] = 1800.0
    mail_failing_seconds: Annotated[float, msgspec.Meta(ge=1, le=604_800)] = 1800.0
    max_tick_seconds: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 900.0


class Config(Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    database: DatabaseConfig = DatabaseConfig()
    daemon: DaemonConfig = DaemonConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    urls: UrlsConfig = UrlsConfig()
    billing: BillingConfig = BillingConfig()
    payment: PaymentConfig = PaymentConfig()
    email: EmailConfig = EmailConfig()
    key_pool: KeyPoolConfig = KeyPoolConfig()
    actors: ActorsConfig = ActorsConfig()
    health: HealthConfig = HealthConfig()
    ipn: IpnConfig = IpnConfig()


# (dotted secret key, dotted file key). The file key fills the secret key.
SECRET_KEYS: tuple[tuple[str, str], ...] = (
    ("database.dsn", "database.dsn_file"),
    ("database.direct_dsn", "database.direct_dsn_file"),
    ("payment.nowpayments.api_key", "payment.nowpayments.api_key_file"),
    ("email.smtp.password", "email.smtp.password_file"),
    ("payment.nowpayments.ipn_secret", "payment.nowpayments.ipn_secret_file"),
)

_PATH_IN_ERROR = re.compile(r" - at `\$\.?([^`]*)`$")


def load(path: str | None, environ: Mapping[str, str]) -> Config:
    """Load and validate the configuration; raises :class:`ConfigError` naming the key."""
    data = _read_toml(path) if path else {}
    _apply_env(data, environ)
    config = _convert(data)
    config = validate(_resolve_secret_files(config, environ))
    check_payment_watch(config)
    return config


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"invalid TOML in {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", f"{path} is not UTF-8 (byte {exc.start})") from None


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        if not _is_utf8(name):
            raise ConfigError("environment", "an NPROXYD__ variable name is not valid UTF-8")
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        key = ".".join(parts)
        field_type = _field_type(parts, key)
        if not _is_utf8(raw):
            raise ConfigError(key, f"environment variable {name} is not valid UTF-8")
        value = _coerce(raw, field_type, key)
        target = data
        for part in parts[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, "is a section in the file and a value in the environment")
            target = child
        target[parts[-1]] = value


def _field_type(parts: list[str], key: str) -> Any:
    struct_type: Any = Config
    for index, part in enumerate(parts):
        fields = {field.name: field.type for field in msgspec.structs.fields(struct_type)}
        if part not in fields:
            raise ConfigError(key, f"unknown key (from environment variable {ENV_PREFIX}…)")
        field_type = fields[part]
        is_section = isinstance(field_type, type) and issubclass(field_type, Section)
        if index == len(parts) - 1:
            if is_section:
                raise ConfigError(key, "is a section, not a value")
            return field_type
        if not is_section:
            raise ConfigError(key, "unknown key (from environment variable)")
        struct_type = field_type
    raise ConfigError(key, "empty key")


def _coerce(raw: str, field_type: Any, key: str) -> Any:
    try:
        return msgspec.convert(raw, field_type, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(key, _reason(exc)) from None


def _convert(data: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH_IN_ERROR.search(text)
        key = match.group(1) if match else "config"
        unknown = re.search(r"unknown field `([^`]*)`", text)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if match else unknown.group(1)
            raise ConfigError(key, "unknown key") from None
        raise ConfigError(key, _reason(exc)) from None


def _reason(exc: msgspec.ValidationError) -> str:
    return _PATH_IN_ERROR.sub("", str(exc))


def _resolve_secret_files(config: Config, environ: Mapping[str, str]) -> Config:
    for secret_key, file_key in SECRET_KEYS:
        file_name = _get(config, file_key)
        if not file_name:
            continue
        if _get(config, secret_key):
            raise ConfigError(file_key, f"set together with {secret_key}; use one of them")
        path = Path(file_name)
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and credentials:
            path = Path(credentials) / path
        try:
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(file_key, f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(file_key, f"{path} is not valid UTF-8") from None
        config = _replace(config, secret_key, secret)
    return config


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _replace(struct: Any, dotted: str, new: Any) -> Any:
    head, _, rest = dotted.partition(".")
    if not rest:
        return msgspec.structs.replace(struct, **{head: new})
    return msgspec.structs.replace(struct, **{head: _replace(getattr(struct, head), rest, new)})


def secrets_of(config: Config) -> list[str]:
    """Every secret value set in the configuration, including a DSN's password."""
    values = [_get(config, key) for key, _ in SECRET_KEYS]
    password = dsn_password(config.database.dsn)
    direct_password = dsn_password(config.database.direct_dsn)
    return [value for value in [*values, password, direct_password] if value]


def dsn_password(dsn: str) -> str:
    """The password part of a ``postgresql://user:password@host/db`` DSN, or ``""``."""
    match = re.match(r"^[a-z]+://[^:/@]*:([^@]*)@", dsn)
    if match:
        return match.group(1)
    keyword = re.search(r"(?:^|\s)password=(\S+)", dsn)
    return keyword.group(1) if keyword else ""


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration as builtins, every secret replaced by ``"***"``."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    for secret_key, _ in SECRET_KEYS:
        *parents, leaf = secret_key.split(".")
        section = data
        for part in parents:
            section = section[part]
        if section[leaf]:
            section[leaf] = REDACTED
    return data


def redact_text(text: str, secrets: list[str]) -> str:
    """Replace every occurrence of a known secret in ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


# --- Validation -------------------------------------------------------------------------------
# One path for `run` and `check-config`: `load` ends with `validate`, so whatever `run` would
# refuse, `check-config` refuses too. Each check is its own function returning (key, reason)
# problems; a key added elsewhere is covered by the generic numeric and text checks.

# A duration is a number whose key ends with one of these units (value x factor = seconds).
_DURATION_UNITS: tuple[tuple[str, float], ...] = (
    ("_ms", 0.001),
    ("_seconds", 1.0),
    ("_minutes", 60.0),
    ("_hours", 3600.0),
    ("_days", 86400.0),
)
MIN_DURATION_SECONDS = 0.1
MAX_DURATION_SECONDS = 90 * 86400.0
MAX_NUMBER = 1e9
_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
_DSN_SCHEMES = frozenset({"postgresql", "postgres"})
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+|[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*)$")

Problem = tuple[str, str]


def validate(config: Config) -> Config:
    """Every check ``run`` relies on; raises :class:`ConfigError` naming the first bad key."""
    for check in _CHECKS:
        for key, reason in check(config):
            raise ConfigError(key, reason)
    return config


def _settings(struct: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every setting below ``struct`` (sections walked, not listed) by its dotted key."""
    found: list[tuple[str, Any]] = []
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        key = f"{prefix}{name}"
        if isinstance(value, Section):
            found.extend(_settings(value, f"{key}."))
        else:
            found.append((key, value))
    return found


def number_problem(key: str, value: float) -> str | None:
    """Why a numeric setting is unusable: not finite, beyond sane bounds, a too-short duration."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    unit = next((factor for suffix, factor in _DURATION_UNITS if key.endswith(suffix)), None)
    if unit is None:
        if abs(value) > MAX_NUMBER:
            return f"must be at most {MAX_NUMBER:.0e}, got {value:g}"
        return None
    seconds = value * unit
    # Intervals, timeouts and leases (whole seconds and up) below 0.1 s would spin; a key in
    # milliseconds (a simulated latency) is meant to be small.
    if 0 < seconds < MIN_DURATION_SECONDS and unit >= 1:
        return f"must be at least {MIN_DURATION_SECONDS} s, got {value:g}"
    if seconds > MAX_DURATION_SECONDS:
        limit = MAX_DURATION_SECONDS / unit
        return (
            f"must be at most {limit:.0f} ({MAX_DURATION_SECONDS / 86400:.0f} days), got {value:g}"
        )
    return None


def _check_numbers(config: Config) -> list[Problem]:
    numbers = [
        (key, value)
        for key, value in _settings(config)
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    problems = ((key, number_problem(key, value)) for key, value in numbers)
    return [(key, reason) for key, reason in problems if reason]


def _check_texts(config: Config) -> list[Problem]:
    return [
        (key, "contains a NUL character or text that is not valid UTF-8")
        for key, value in _settings(config)
        if isinstance(value, str) and ("\x00" in value or not _is_utf8(value))
    ]


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dsn_problem(dsn: str) -> str | None:
    """Why the PostgreSQL driver (asyncpg) would refuse ``dsn``; never quotes the DSN.

    The same rules as asyncpg's own DSN parser (``tests/unit/test_config.py`` checks both agree),
    kept here because the core layer does not import the driver.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return "expected a postgresql://user:password@host:port/database URL"
    if scheme not in _DSN_SCHEMES:
        shown = scheme if re.fullmatch(r"[A-Za-z0-9+.-]{1,32}", scheme) else "?"
        return f"the scheme must be postgresql:// or postgres://, not {shown}://"
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    tail = rest[len(authority) :].split("=", 1)[0]  # up to the first query value
    if "@" in tail or authority.count("@") > 1:
        return (
            "the user or password contains an unencoded '@', '/', '?' or '#' "
            "(percent-encode it, e.g. '/' as %2F)"
        )
    return _dsn_hosts_problem(authority.rpartition("@")[2]) or _dsn_query_problem(rest)


def _dsn_hosts_problem(hostlist: str) -> str | None:
    if not hostlist:
        return None
    for spec in hostlist.split(","):
        if not spec:
            return "empty host in the host list"
        if spec.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", spec)
            if not match:
                return "invalid IPv6 address in the host list"
            port = match.group(2) or ""
        else:
            port = spec.partition(":")[2]
        if port and not _valid_port(port):
            return "a port must be a number from 1 to 65535"
    return None


def _dsn_query_problem(rest: str) -> str | None:
    query = rest.partition("?")[2].partition("#")[0]
    if not query:
        return None
    try:
        params = urllib.parse.parse_qs(query, strict_parsing=True)
    except ValueError:
        return "the query string (after '?') is not key=value pairs joined by '&'"
    sslmode = params.get("sslmode", [""])[-1]
    if "sslmode" in params and sslmode not in _SSLMODES:
        return f"sslmode must be one of {', '.join(sorted(_SSLMODES))}"
    if "port" in params and not all(_valid_port(p) for p in params["port"][-1].split(",")):
        return "a port must be a number from 1 to 65535"
    return None


def _valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _check_dsn(config: Config) -> list[Problem]:
    problem = dsn_problem(config.database.dsn) if config.database.dsn else None
    return [("database.dsn", problem)] if problem else []


def listen_problem(listen: str) -> str | None:
    """Why ``HOST:PORT`` cannot be listened on as written (the value is not secret)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"expected HOST:PORT with a port from 0 to 65535, got {listen!r}"
    if not _HOST.match(host):
        return f"not a host name or IP address: {host!r}"
    return None


def _check_listen(config: Config) -> list[Problem]:
    problem = listen_problem(config.http.listen)
    return [("http.listen", problem)] if problem else []


def _check_provider(config: Config) -> list[Problem]:
    if config.billing.payment_provider == "nowpayments" and not config.payment.nowpayments.api_key:
        return [
            (
                "payment.nowpayments.api_key",
                "required when billing.payment_provider = nowpayments (or set api_key_file)",
            )
        ]
    return []


def _check_urls(config: Config) -> list[Problem]:
    urls = {
        "urls.app_base_url": config.urls.app_base_url,
        "payment.nowpayments.api_base_url": config.payment.nowpayments.api_base_url,
    }
    return [
        (key, f"expected an http:// or https:// URL, got {value!r}")
        for key, value in urls.items()
        if urllib.parse.urlsplit(value).scheme not in {"http", "https"}
        or not urllib.parse.urlsplit(value).netloc
    ]


def from_address_problem(value: str) -> str | None:
    """Why ``email.from_address`` (``Name <local@domain>`` or ``local@domain``) is unusable."""
    if not value.strip():
        return "must not be empty"
    if "\r" in value or "\n" in value:
        return "contains a line break"
    _, address = email.utils.parseaddr(value)
    return address_problem(address)


def _check_from_address(config: Config) -> list[Problem]:
    problem = from_address_problem(config.email.from_address)
    return [("email.from_address", problem)] if problem else []


# A host name (letters, digits, hyphens; labels of 1-63 separated by dots) or an address
# literal such as [192.0.2.1] or [IPv6:2001:db8::1]: what RFC 5321 allows after EHLO.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_ADDRESS_LITERAL = re.compile(r"\[[A-Za-z0-9:.]+\]")


def helo_name_problem(value: str) -> str | None:
    """Why ``email.smtp.helo_name`` cannot follow EHLO; empty is fine (the host's own name)."""
    if not value:
        return None
    if len(value) > 255:
        return "is longer than 255 characters"
    if _HOST_NAME.fullmatch(value) or _ADDRESS_LITERAL.fullmatch(value):
        return None
    return "is not a host name (letters, digits, hyphens, dots) or an address literal ([192.0.2.1])"


def _check_helo_name(config: Config) -> list[Problem]:
    problem = helo_name_problem(config.email.smtp.helo_name)
    return [("email.smtp.helo_name", problem)] if problem else []


_CHECKS = (
    _check_texts,
    _check_numbers,
    _check_dsn,
    _check_listen,
    _check_provider,
    _check_urls,
    _check_from_address,
    _check_helo_name,
)


def check_payment_watch(config: Config) -> None:
    """Rules across the payment watcher's keys, checked by ``run`` and ``check-config`` alike."""
    watcher = config.actors.payment_watcher
    if watcher.min_check_seconds > watcher.max_check_seconds:
        raise ConfigError(
            "actors.payment_watcher.min_check_seconds", "must not exceed max_check_seconds"
        )
    operator = config.billing.operator_email
    problem = address_problem(operator) if operator else None
    if problem is not None:
        raise ConfigError("billing.operator_email", problem)
    if not config.ipn.listen:
        return
    listen = listen_problem(config.ipn.listen)
    if listen is not None:
        raise ConfigError("ipn.listen", listen)
    if config.ipn.listen == config.http.listen:
        raise ConfigError("ipn.listen", "must differ from http.listen (a listener of its own)")
    if config.billing.payment_provider != "nowpayments":
        raise ConfigError("ipn.listen", "needs billing.payment_provider = nowpayments")
    if not config.payment.nowpayments.ipn_secret:
        raise ConfigError("ipn.listen", "needs payment.nowpayments.ipn_secret (or ipn_secret_file)")


def state_directory(config: Config) -> Path:
    """``daemon.state_dir``, or the user's state directory for nproxyd when it is empty."""
    import platformdirs  # noqa: PLC0415 - only when the default is needed

    return Path(config.daemon.state_dir or platformdirs.user_state_dir("nproxyd"))

"""The project's exception tree.

One root, the docstring as default message, data as attributes. Adapters translate driver
exceptions into these at the boundary; nothing above the adapters sees a driver's types.
"""

from __future__ import annotations


class NproxydError(Exception):
    """nproxyd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class OperatorMustFix(NproxydError):
    """Something the operator must fix in the configuration or credentials (exit 78)."""


class Unavailable(NproxydError):
    """Something needed cannot be reached now; the same command may succeed later (exit 69)."""


class TemporaryFailure(NproxydError):
    """Start-up failed for a reason that may pass on its own, e.g. a busy port (exit 75)."""


class UsageError(NproxydError):
    """The command line asks for something nproxyd refuses to do (exit 64)."""


class ConfigError(OperatorMustFix):
    """The configuration is invalid."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class StoreError(NproxydError):
    """The database failed."""


class DatabaseUnavailable(StoreError, Unavailable):
    """The database cannot be reached."""


class LockUnavailable(StoreError):
    """A row lock was not granted within the statement's lock timeout."""


class DatabaseRefused(ConfigError, StoreError):
    """The database server refused the configured credentials, role or database (exit 78).

    Named ``database.dsn``; the message never contains the DSN or its password.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("database.dsn", reason)


class MigrationError(StoreError):
    """A schema migration failed."""


class StoreDataError(StoreError):
    """The database refused a value, or returned one that cannot be read.

    A SQL data exception (SQLSTATE class 22) or an encoding/decoding error: the statement's
    data is at fault, not the database, so repeating the same statement will fail the same way.
    """


class ProviderError(NproxydError):
    """The payment provider failed."""


class ProviderTransientError(ProviderError):
    """The payment provider failed for now; the same request may succeed later."""


class ProviderPermanentError(ProviderError):
    """The payment provider refused the request; repeating it will not help."""


class MailError(NproxydError):
    """Mail delivery failed."""


class MailTransientError(MailError):
    """Mail delivery failed for now; it will be retried."""


class MailUnavailableError(MailTransientError):
    """The mail server is unreachable or refuses service; nothing was said about the message.

    Connection refused or timed out, TLS or login failures, a 421 or a dropped connection:
    the message may succeed later and has not used up one of its attempts.
    """


class MailPermanentError(MailError):
    """The mail was refused for good."""


class BalanceProbeError(NproxydError):
    """The provider-key balance probe failed."""


class DaemonUnreachable(Unavailable):
    """The daemon's HTTP endpoint cannot be reached."""


class PortBusy(TemporaryFailure):
    """The HTTP port is in use by another process."""


class SupervisorGaveUp(NproxydError):
    """An actor was restarted too often; the supervisor stopped the daemon."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"actor {actor} restarted too often")
        self.actor = actor


class ProviderRateLimited(ProviderTransientError):
    """The payment provider asked us to slow down (HTTP 429)."""

    def __init__(self, message: str | None = None, *, retry_after_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ProviderInvalidAnswer(ProviderTransientError):
    """The payment provider answered something nproxyd cannot store (bad JSON, number or date)."""


class IpnRejected(NproxydError):
    """An instant payment notification was refused (bad signature or body)."""


class ProviderCredentialsRefused(ProviderPermanentError):
    """The payment provider refused nproxyd's credentials (HTTP 401 or 403).

    Unlike a refusal of one request (404, another 4xx), this fails every request until the
    operator fixes the API key.
    """

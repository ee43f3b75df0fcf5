"""The project's exception tree.

One root, the docstring as default message, data as attributes. Adapters translate driver
exceptions into these at the boundary; nothing above the adapters sees a driver's types.
"""

from __future__ import annotations

from typing import ClassVar


class NproxydError(Exception):
    """nproxyd failed."""

    transient: ClassVar[bool] = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(NproxydError):
    """The configuration is invalid."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class StoreError(NproxydError):
    """The database failed."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached."""

    transient = True


class MigrationError(StoreError):
    """A schema migration failed."""


class ProviderError(NproxydError):
    """The payment provider failed."""


class ProviderTransientError(ProviderError):
    """The payment provider failed for now; the same request may succeed later."""

    transient = True


class ProviderPermanentError(ProviderError):
    """The payment provider refused the request; repeating it will not help."""


class MailError(NproxydError):
    """Mail delivery failed."""


class MailTransientError(MailError):
    """Mail delivery failed for now; it will be retried."""

    transient = True


class MailPermanentError(MailError):
    """The mail was refused for good."""


class BalanceProbeError(NproxydError):
    """The provider-key balance probe failed."""


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

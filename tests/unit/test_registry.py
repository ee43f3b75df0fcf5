"""The actor registry and the settings built from the configuration (nproxyd.app)."""

from __future__ import annotations

import msgspec
import pytest

from nproxyd import app, cli
from nproxyd.actors.mail_sender import MailSettings
from nproxyd.actors.renewal_scheduler import RenewalSettings
from nproxyd.core.config import Config, load


class TestRegistry:
    def test_every_entry_names_an_actor_section_with_an_enabled_flag(self) -> None:
        """Each registry entry's section exists under [actors] and has ``enabled``."""
        config = Config()
        for entry in app.REGISTRY:
            section = getattr(config.actors, entry.section)
            assert "enabled" in section.__struct_fields__, entry.name
            assert entry.enabled(config) is True

    def test_the_command_line_offers_exactly_the_registered_actors(self) -> None:
        """``once`` chooses among the registry's names, in its order."""
        assert tuple(entry.name for entry in app.REGISTRY) == cli.ACTORS

    def test_a_disabled_section_disables_its_entry(self) -> None:
        """``actors.<section>.enabled = false`` is what the registry reads."""
        config = load(None, {"NPROXYD__ACTORS__KEY_POOL_RECOVERER__ENABLED": "false"})
        assert [e.name for e in app.REGISTRY if not e.enabled(config)] == ["key-pool-recoverer"]


class TestSettingsFrom:
    def test_fields_come_from_the_first_section_having_the_key(self) -> None:
        """The mail sender's retry keys come from [actors.mail_sender], not from [billing]."""
        config = load(
            None,
            {
                "NPROXYD__ACTORS__MAIL_SENDER__RETRY_MAX_SECONDS": "120",
                "NPROXYD__BILLING__RETRY_MAX_SECONDS": "900",
            },
        )
        mail = app.mail_settings(config, "i-1")
        renewal = app.renewal_settings(config, "i-1")
        assert (mail.retry_max_seconds, renewal.retry_max_seconds) == (120.0, 900.0)
        assert (mail.instance_id, renewal.renewal_lead_time_hours) == ("i-1", 72.0)

    def test_explicit_values_win_and_a_missing_key_is_an_error(self) -> None:
        """Values given by name fill the fields no section has; a field nothing fills raises."""
        config = Config()
        settings = app.settings_from(
            MailSettings, config.actors.mail_sender, config.email, instance_id="x", concurrency=2
        )
        assert msgspec.structs.asdict(settings)["concurrency"] == 2
        with pytest.raises(TypeError, match=r"RenewalSettings\.interval_seconds names no key"):
            app.settings_from(RenewalSettings, config.billing, instance_id="x")


class TestMailConcurrency:
    def test_three_sends_per_smtp_connection(self) -> None:
        """Over SMTP, three sends per connection are in flight: one waiting with the next
        envelope when a message's 354 comes, so its body and that envelope share a write."""
        config = Config()
        smtp = msgspec.structs.replace(config.email.smtp, max_connections=4)
        email = msgspec.structs.replace(config.email, transport="smtp", smtp=smtp)
        assert app.mail_concurrency(msgspec.structs.replace(config, email=email)) == 12

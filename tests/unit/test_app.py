"""Composition-root rules that need no I/O."""

from __future__ import annotations

import pytest

from nproxyd import app
from nproxyd.core.clock import SystemClock
from nproxyd.core.config import load
from nproxyd.core.errors import ConfigError


class TestPaymentProvider:
    def test_nowpayments_without_an_api_key_is_a_config_error(self) -> None:
        """Selecting nowpayments without a key stops loading (run and check-config) naming it."""
        with pytest.raises(ConfigError) as caught:
            load(None, {"NPROXYD__BILLING__PAYMENT_PROVIDER": "nowpayments"})
        assert caught.value.key == "payment.nowpayments.api_key"

    def test_simulated_is_the_default(self) -> None:
        """With no configuration the simulated provider is used."""
        assert app.payment_provider(load(None, {}), SystemClock()).name == "simulated"

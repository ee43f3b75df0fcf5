"""nproxyd's own Prometheus metrics (nproxyd.runtime.prometheus): the text exposition is the one
the reference client library writes for the same metrics, and misuse is refused by name."""

from __future__ import annotations

import math
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from nproxyd.runtime.prometheus import (
    Counter,
    Family,
    Gauge,
    Histogram,
    Registry,
    gauge_family,
    go_float,
)

BUCKETS = (0.005, 0.1, 1, 2.5, 300)
OBSERVED = (0.0, 0.005, 0.0051, 0.7, 2.5, 299.0, 301.0, 1e6)
AWKWARD = 'a "quoted" back\\slash\nand a newline, ünïcode'
HELP = 'Help with a back\\slash\nand a "quote".'


class _ReferenceGauges(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("t_single", HELP, value=1733112345.125)
        family = GaugeMetricFamily("t_labelled", "Labelled.", labels=["state"])
        family.add_metric(["claimed"], 3)
        family.add_metric([AWKWARD], -2.5)
        yield family


def _reference() -> bytes:
    """The exposition of the reference client for the metrics of :func:`_ours`."""
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        r = prometheus_client.CollectorRegistry(auto_describe=True)
        plain = prometheus_client.Counter("t_plain", HELP, registry=r)
        plain.inc(3)
        by_kind = prometheus_client.Counter("t_by_kind", "By kind.", ["kind", "actor"], registry=r)
        by_kind.labels(kind="transient", actor="x").inc()
        by_kind.labels(kind=AWKWARD, actor="y").inc(0.25)
        prometheus_client.Counter("t_unused", "No series yet.", ["reason"], registry=r)
        gauge = prometheus_client.Gauge("t_gauge", "A gauge.", registry=r)
        gauge.set(12345678.5)
        stamps = prometheus_client.Gauge("t_stamps", "Stamps.", ["actor"], registry=r)
        stamps.labels(actor="a").set(1e-7)
        stamps.labels(actor="b").set(math.inf)
        stamps.labels(actor="c").set(-math.inf)
        stamps.labels(actor="d").set(math.nan)
        durations = prometheus_client.Histogram(
            "t_duration_seconds", "Durations.", ["actor"], buckets=BUCKETS, registry=r
        )
        for value in OBSERVED:
            durations.labels(actor="a").observe(value)
        durations.labels(actor="b")
        r.register(_ReferenceGauges())
        return prometheus_client.generate_latest(r)
    finally:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]


class _OurGauges:
    def collect(self) -> Iterator[Family]:
        yield gauge_family("t_single", HELP, 1733112345.125)
        family = gauge_family("t_labelled", "Labelled.")
        family.add(3, {"state": "claimed"})
        family.add(-2.5, {"state": AWKWARD})
        yield family


def _ours() -> bytes:
    r = Registry()
    plain = Counter("t_plain", HELP, registry=r)
    plain.inc(3)
    by_kind = Counter("t_by_kind", "By kind.", ["kind", "actor"], registry=r)
    by_kind.labels(kind="transient", actor="x").inc()
    by_kind.labels(kind=AWKWARD, actor="y").inc(0.25)
    Counter("t_unused", "No series yet.", ["reason"], registry=r)
    gauge = Gauge("t_gauge", "A gauge.", registry=r)
    gauge.set(12345678.5)
    stamps = Gauge("t_stamps", "Stamps.", ["actor"], registry=r)
    stamps.labels(actor="a").set(1e-7)
    stamps.labels(actor="b").set(math.inf)
    stamps.labels(actor="c").set(-math.inf)
    stamps.labels(actor="d").set(math.nan)
    durations = Histogram(
        "t_duration_seconds", "Durations.", ["actor"], buckets=BUCKETS, registry=r
    )
    for value in OBSERVED:
        durations.labels(actor="a").observe(value)
    durations.labels(actor="b")
    r.register(_OurGauges())
    return r.render()


class TestExposition:
    def test_the_text_is_the_reference_clients_byte_for_byte(self) -> None:
        """Counters (labelled, unlabelled, without series), gauges, histograms and collector
        families, with escaped help and label values and Go-formatted floats."""
        assert _ours() == _reference()

    @pytest.mark.parametrize(
        "value", [0.0, -0.0, 1.0, 0.1, 123456.0, 1234567.0, 1e21, 1.5e-300, -1234567.5]
    )
    def test_floats_are_formatted_like_the_reference_client(self, value: float) -> None:
        from prometheus_client.utils import floatToGoString  # noqa: PLC0415

        assert go_float(value) == floatToGoString(value)  # type: ignore[no-untyped-call]

    def test_an_unregistered_collector_is_no_longer_exposed(self) -> None:
        r = Registry()
        Counter("t_kept", "Kept.", registry=r)
        dropped = Gauge("t_dropped", "Dropped.", registry=r)
        r.unregister(dropped)
        text = r.render().decode()
        assert "t_kept_total 0.0" in text
        assert "t_dropped" not in text

    def test_a_sample_is_read_back_by_name_and_labels(self) -> None:
        r = Registry()
        Counter("t_by", "By.", ["kind"], registry=r).labels(kind="a").inc(2)
        assert r.sample("t_by_total", {"kind": "a"}) == 2.0
        assert r.sample("t_by_total", {"kind": "b"}) is None


class TestMisuse:
    def test_a_counter_refuses_to_go_down(self) -> None:
        counter = Counter("t_down", "Down.", registry=Registry())
        with pytest.raises(ValueError, match="only goes up"):
            counter.inc(-1)
        assert counter.value == 0.0

    def test_wrong_label_names_are_named(self) -> None:
        counter = Counter("t_labels", "Labels.", ["kind"], registry=Registry())
        with pytest.raises(ValueError, match=r"t_labels takes the labels .*kind.*, not .*sort"):
            counter.labels(sort="x")

    def test_a_labelled_metric_is_not_used_without_its_labels(self) -> None:
        counter = Counter("t_needs", "Needs labels.", ["kind"], registry=Registry())
        with pytest.raises(ValueError, match="t_needs has labels"):
            counter.inc()

    def test_a_name_registered_twice_is_refused(self) -> None:
        r = Registry()
        Counter("t_twice", "Once.", registry=r)
        with pytest.raises(ValueError, match="t_twice_total"):
            Counter("t_twice", "Twice.", registry=r)

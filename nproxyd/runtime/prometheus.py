"""Prometheus metrics without a client library (docs/design.md, "Metrics").

Counters, gauges and histograms with labels, collectors that yield families of their own, and
the text exposition format 0.0.4, written as ``prometheus_client`` writes it (sample values
and ``le`` bounds formatted like Go's, labels sorted by name, ``_total`` on counters, no
``_created`` series). The daemon updates its metrics and renders them on one event-loop
thread, so nothing here takes a lock; and importing this module costs nothing like the client
library's ~10-13 ms of start-up (``http.server``, ``urllib.request``, ``wsgiref``;
docs/benchmarks.md "Start-up").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import ClassVar, Generic, NamedTuple, Protocol, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INF = math.inf


class Sample(NamedTuple):
    name: str
    labels: Mapping[str, str]
    value: float


class Family:
    """One metric family as exposed: its name, help, type and samples."""

    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name = name
        self.help = help_text
        self.type = kind
        self.samples: list[Sample] = []

    def add(self, value: float, labels: Mapping[str, str] | None = None) -> Family:
        self.samples.append(Sample(self.name, labels or {}, float(value)))
        return self


def gauge_family(name: str, help_text: str, value: float | None = None) -> Family:
    """A gauge family for a collector to yield: with ``value``, its one unlabelled sample;
    without, samples are added by label (:meth:`Family.add`)."""
    family = Family(name, help_text, "gauge")
    if value is not None:
        family.add(value)
    return family


class Collector(Protocol):
    def collect(self) -> Iterable[Family]: ...


class Registry:
    """The collectors of one process, exposed in the order they were registered."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: dict[str, Collector] = {}

    def register(self, collector: Collector, names: Sequence[str] = ()) -> None:
        """Add ``collector``; ``names`` are the sample names it owns, refused when taken."""
        taken = [name for name in names if name in self._names]
        if taken:
            raise ValueError(f"metric names already registered: {', '.join(taken)}")
        self._collectors.append(collector)
        for name in names:
            self._names[name] = collector

    def unregister(self, collector: Collector) -> None:
        self._collectors.remove(collector)
        self._names = {name: c for name, c in self._names.items() if c is not collector}

    def collect(self) -> Iterator[Family]:
        for collector in list(self._collectors):
            yield from collector.collect()

    def render(self) -> bytes:
        """Every family in the text exposition format 0.0.4."""
        lines: list[str] = []
        for family in self.collect():
            name = f"{family.name}_total" if family.type == "counter" else family.name
            help_text = family.help.replace("\\", r"\\").replace("\n", r"\n")
            lines.append(f"# HELP {name} {help_text}\n# TYPE {name} {family.type}\n")
            lines.extend(_sample_line(sample) for sample in family.samples)
        return "".join(lines).encode()

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The value of the sample ``name`` with exactly ``labels``; None when there is none."""
        wanted = dict(labels or {})
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == wanted:
                    return sample.value
        return None


def go_float(value: float) -> str:
    """A float as Go's strconv formats it, the way Prometheus clients write sample values."""
    if value == INF:
        return "+Inf"
    if value == -INF:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample_line(sample: Sample) -> str:
    if not sample.labels:
        return f"{sample.name} {go_float(sample.value)}\n"
    labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}} {go_float(sample.value)}\n"


class _Series(Protocol):
    def samples(self, name: str, labels: dict[str, str]) -> Iterator[Sample]: ...


S = TypeVar("S", bound=_Series)


class _Metric(Generic[S]):
    """A family of series, one per combination of label values (one series without labels)."""

    kind: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ("",)

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), *, registry: Registry
    ) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        exposed = f"{name}_total" if self.kind == "counter" else name
        registry.register(self, [exposed + suffix for suffix in self.suffixes])
        if not self.labelnames:
            self.labels()  # the one series, exposed at zero from the start

    def _new(self) -> S:
        raise NotImplementedError

    def labels(self, **values: object) -> S:
        """The series of these label values, created (at zero) on first use."""
        if set(values) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes the labels {list(self.labelnames)}, not {sorted(values)}"
            )
        key = tuple(str(values[name]) for name in self.labelnames)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new()
        return series

    def _only(self) -> S:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels()")
        return self.labels()

    def collect(self) -> Iterator[Family]:
        family = Family(self.name, self.help, self.kind)
        sample_name = f"{self.name}_total" if self.kind == "counter" else self.name
        for key, series in self._series.items():
            labels = dict(zip(self.labelnames, key, strict=True))
            family.samples.extend(series.samples(sample_name, labels))
        yield family


class _ScalarSeries:
    """One number: a counter's or a gauge's series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def samples(self, name: str, labels: dict[str, str]) -> Iterator[Sample]:
        yield Sample(name, labels, self.value)


class CounterSeries(_ScalarSeries):
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up, not by {amount}")
        self.value += amount


class GaugeSeries(_ScalarSeries):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HistogramSeries:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                return

    def samples(self, name: str, labels: dict[str, str]) -> Iterator[Sample]:
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            total += count
            yield Sample(f"{name}_bucket", {**labels, "le": go_float(bound)}, total)
        yield Sample(f"{name}_count", labels, total)
        yield Sample(f"{name}_sum", labels, self.sum)


class _Incrementable(Protocol):
    value: float

    def inc(self, amount: float = 1) -> None: ...

    def samples(self, name: str, labels: dict[str, str]) -> Iterator[Sample]: ...


V = TypeVar("V", bound=_Incrementable)


class _Scalar(_Metric[V]):
    """A counter or a gauge: without labels, used through its one series."""

    def inc(self, amount: float = 1) -> None:
        self._only().inc(amount)

    @property
    def value(self) -> float:
        return self._only().value


class Counter(_Scalar[CounterSeries]):
    """A count that only goes up; exposed as ``<name>_total``."""

    kind = "counter"

    def _new(self) -> CounterSeries:
        return CounterSeries()


class Gauge(_Scalar[GaugeSeries]):
    kind = "gauge"

    def _new(self) -> GaugeSeries:
        return GaugeSeries()

    def set(self, value: float) -> None:
        self._only().set(value)


class Histogram(_Metric[HistogramSeries]):
    """Observations counted in cumulative ``le`` buckets (``+Inf`` added), with their sum."""

    kind = "histogram"
    suffixes = ("_bucket", "_count", "_sum")

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: Registry,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets))
        self.bounds = bounds if bounds and bounds[-1] == INF else (*bounds, INF)
        super().__init__(name, help_text, labelnames, registry=registry)

    def _new(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def observe(self, value: float) -> None:
        self._only().observe(value)

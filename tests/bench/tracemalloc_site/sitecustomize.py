"""Loaded by the soak benchmark's daemon when asked (``--trace``): what grows, by line.

A thread takes a tracemalloc snapshot at each of ``NPROXYD_SOAK_SNAPSHOTS`` (seconds after
start) and writes the top differences against the first one to ``NPROXYD_SOAK_TRACE_FILE``.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc

_MARKS = [float(mark) for mark in os.environ.get("NPROXYD_SOAK_SNAPSHOTS", "").split(",") if mark]
_OUT = os.environ.get("NPROXYD_SOAK_TRACE_FILE", "")


def _watch() -> None:
    started = time.monotonic()
    first: tracemalloc.Snapshot | None = None
    for mark in _MARKS:
        time.sleep(max(0.0, started + mark - time.monotonic()))
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        if first is None:
            first = snapshot
            continue
        with open(_OUT, "a", encoding="utf-8") as out:
            out.write(f"== {mark:.0f}s against {_MARKS[0]:.0f}s\n")
            for stat in snapshot.compare_to(first, "traceback")[:15]:
                out.write(f"{stat}\n")
                for line in stat.traceback.format()[-8:]:
                    out.write(f"    {line}\n")


if _MARKS and _OUT:
    tracemalloc.start(12)
    threading.Thread(target=_watch, name="soak-tracemalloc", daemon=True).start()

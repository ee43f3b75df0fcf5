"""``python -m tests.bench [name ...]``: the benchmarks of docs/design.md §6, run on demand.

Each benchmark gets fresh databases cloned from the migrated template of one throwaway
PostgreSQL server (``tests.pg.TestServer``; ``NPROXYD_TEST_DSN`` points it at another server)
and prints one line per figure on stdout; progress goes to stderr. The exit status is 1 when
a figure misses its target, 64 for an unknown benchmark name.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable

import anyio

from nproxyd.runtime import logs
from tests.bench import (
    bench_expiry,
    bench_idle,
    bench_mail,
    bench_mail_latency,
    bench_mail_smtp_source,
    bench_renewal,
    bench_renewal_limits,
    bench_soak,
    bench_startup,
)
from tests.bench.common import Figure, Machine, duration, note
from tests.pg import TestServer

Benchmark = Callable[[TestServer], Awaitable[list[Figure]]]

BENCHMARKS: dict[str, Benchmark] = {
    "renewal_provider_bound": bench_renewal.provider_bound,
    "renewal_db_bound": bench_renewal.db_bound,
    "expiry_correlated": bench_expiry.correlated,
    "expiry_interleaved": bench_expiry.interleaved,
    "mail": bench_mail.run,
    "idle": bench_idle.run,
    "mail_latency_external": bench_mail_latency.run,
    "startup": bench_startup.run,
    "renewal_vs_set_based": bench_renewal_limits.vs_set_based,
    "renewal_idle_window": bench_renewal_limits.idle_window,
    "mail_vs_smtp_source": bench_mail_smtp_source.run,
}
# On demand only, by name: it runs for NPROXYD_SOAK_MINUTES (default 20).
SLOW_BENCHMARKS: dict[str, Benchmark] = {"soak": bench_soak.run}
EX_USAGE = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    known_all = {**BENCHMARKS, **SLOW_BENCHMARKS}
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(known_all))
    names = parser.parse_args(argv).names or list(BENCHMARKS)
    unknown = [name for name in names if name not in known_all]
    if unknown:
        known = ", ".join(known_all)
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {known}", file=sys.stderr)
        return EX_USAGE
    # The actors log as in production (JSON at info level), into nothing: stdout is for figures.
    with open(os.devnull, "w") as devnull:
        logs.configure(level="info", fmt="json", stream=devnull)
        server = TestServer()
        server.start()
        try:
            return anyio.run(run_all, names, server)
        finally:
            # pgserver logs its clean-up at exit, after this stream is closed.
            logging.getLogger().handlers.clear()


async def run_all(names: list[str], server: TestServer) -> int:
    failed = 0
    started = time.perf_counter()
    for name in names:
        machine = Machine()
        for figure in await {**BENCHMARKS, **SLOW_BENCHMARKS}[name](server):
            print(figure.line(), flush=True)
            failed += not figure.passed
        note(name, machine.summary())
    print(
        f"[bench] {len(names)} benchmark(s) in {duration(time.perf_counter() - started)}",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

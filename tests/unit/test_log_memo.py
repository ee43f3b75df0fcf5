"""A warning about one bad row is logged at most once an hour (renewal scheduler's LogMemo)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nproxyd.actors.renewal_scheduler import LogMemo

T0 = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


class TestLogMemo:
    def test_once_an_hour_per_row(self) -> None:
        """A row is due first, then not within the hour, then again after it."""
        memo = LogMemo()
        assert memo.due("s1", "bad", T0)
        assert not memo.due("s1", "bad", T0 + timedelta(minutes=59))
        assert memo.due("s2", "bad", T0 + timedelta(minutes=59))
        assert memo.due("s1", "bad", T0 + HOUR)

    def test_new_reason_or_earlier_time_logs_again(self) -> None:
        """A changed reason, or a clock set back, is logged at once."""
        memo = LogMemo()
        assert memo.due("s1", "bad", T0)
        assert memo.due("s1", "worse", T0 + timedelta(minutes=1))
        assert memo.due("s1", "worse", T0 - timedelta(minutes=1))

    def test_memory_is_bounded(self) -> None:
        """Past its size the memo forgets the least recently logged rows."""
        memo = LogMemo(size=3)
        for key in ("a", "b", "c", "d"):
            assert memo.due(key, "bad", T0)
        assert len(memo._logged) == 3
        assert memo.due("a", "bad", T0)  # forgotten, so logged again
        assert not memo.due("d", "bad", T0)

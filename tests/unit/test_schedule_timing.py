"""Ticks of cron schedules in a time zone and of interval schedules; webhook URL refusals; retry backoff."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from service.errors import InvalidInput
from service.schedules import next_tick
from service.settings import Settings
from service.webhooks import check_url
from worker.deliveries import backoff_s

BERLIN = ZoneInfo("Europe/Berlin")


def test_a_nightly_cron_fires_at_local_time_across_the_daylight_saving_change():
    # 2026-10-25: Berlin goes from UTC+2 to UTC+1; 02:30 local is 00:30 UTC before, 01:30 UTC after.
    before = next_tick("30 2 * * *", "Europe/Berlin", None, datetime(2026, 10, 24, 12, tzinfo=UTC), datetime.now(UTC))
    after = next_tick("30 2 * * *", "Europe/Berlin", None, datetime(2026, 10, 26, 12, tzinfo=UTC), datetime.now(UTC))
    assert before == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert after == datetime(2026, 10, 27, 1, 30, tzinfo=UTC)
    assert after.astimezone(BERLIN).hour == before.astimezone(BERLIN).hour == 2


def test_interval_ticks_stay_on_their_grid_and_skip_what_passed():
    anchor = datetime(2026, 1, 1, tzinfo=UTC)
    assert next_tick(None, "UTC", 60.0, anchor, anchor) == datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    # Down for 10.5 minutes: the next tick is the first one after now, not the ten that passed.
    now = datetime(2026, 1, 1, 0, 10, 30, tzinfo=UTC)
    assert next_tick(None, "UTC", 60.0, now, anchor) == datetime(2026, 1, 1, 0, 11, tzinfo=UTC)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",  # the cloud metadata service
        "http://[::1]:8080/",
        "ftp://example.com/hook",
        "http://user:pass@example.com/",
        "http://localhost/hook",
    ],
)
def test_webhook_urls_to_private_ranges_or_odd_schemes_are_refused(url):
    with pytest.raises(InvalidInput):
        check_url(url, Settings())


def test_the_service_itself_is_refused_even_when_private_ranges_are_allowed():
    settings = Settings(webhook_refuse_private_urls=False, host="127.0.0.1", port=8123)
    with pytest.raises(InvalidInput, match="this service itself"):
        check_url("http://127.0.0.1:8123/v1/audits", settings)
    check_url("http://127.0.0.1:8124/hook", settings)  # another port on the same host is a test receiver


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    settings = Settings(webhook_backoff_base_s=1.0, webhook_backoff_max_s=30.0)
    for attempt in range(1, 12):
        ceiling = min(30.0, 2 ** (attempt - 1))
        delays = [backoff_s(attempt, settings) for _ in range(200)]
        assert all(min(0.5, ceiling) <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered

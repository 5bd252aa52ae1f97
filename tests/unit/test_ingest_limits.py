"""service.ingest.limits: the bytes uploads being decoded at once may hold in one process."""

from __future__ import annotations

import threading

import pytest

from service.errors import PayloadTooLarge, ServiceBusy
from service.ingest.limits import DecodeBudget


def test_an_upload_that_could_never_fit_is_413_at_once():
    with pytest.raises(PayloadTooLarge) as info, DecodeBudget(100, wait_s=60).reserve(101):
        pass
    assert "takes 101 bytes, more than the 100 bytes this server decodes at once (setting max_decoding_bytes)" in (
        info.value.detail
    )


def test_uploads_wait_for_room_then_get_503():
    budget = DecodeBudget(100, wait_s=0.05)
    with budget.reserve(60):
        assert budget.in_flight == 60
        with pytest.raises(ServiceBusy) as info, budget.reserve(60):
            pass
        assert "at most 100 bytes at once, setting max_decoding_bytes" in info.value.detail
        assert info.value.status == 503
        with budget.reserve(40):  # what fits goes ahead
            assert budget.in_flight == 100
    assert budget.in_flight == 0


def test_a_waiting_upload_proceeds_when_room_is_freed():
    budget = DecodeBudget(100, wait_s=30)
    entered, release = threading.Event(), threading.Event()

    def first() -> None:
        with budget.reserve(80):
            entered.set()
            release.wait(5)

    holder = threading.Thread(target=first)
    holder.start()
    entered.wait(5)
    threading.Timer(0.05, release.set).start()
    with budget.reserve(80):
        assert budget.in_flight == 80
    holder.join(5)
    assert budget.in_flight == 0

"""The worker's own health metrics: event loop lateness, time spent in periodic tasks, events' waits per stage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from streams.app import event_loop_lag_monitor, observe_waits, timed


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_a_blocked_loop_shows_as_lateness_of_the_probe():
    lag_before = _sample("echolm_event_loop_lag_seconds_sum")
    probes_before = _sample("echolm_event_loop_lag_seconds_count")
    monitor = asyncio.create_task(event_loop_lag_monitor(interval_s=0.02))
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # what a synchronous call on the event loop does to every other task
    await asyncio.sleep(0.05)
    monitor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await monitor

    assert _sample("echolm_event_loop_lag_seconds_count") - probes_before >= 3
    # The probe sleeping when the block began woke ~0.18 s late (0.2 s block minus the time it had left).
    assert _sample("echolm_event_loop_lag_seconds_sum") - lag_before == pytest.approx(0.19, abs=0.04)


async def test_timed_records_each_run_under_the_function_name_even_when_it_fails():
    async def settle_usages_for_test() -> None:
        await asyncio.sleep(0.03)

    async def failing_timer_for_test() -> None:
        raise RuntimeError("database down")

    await timed(settle_usages_for_test)()
    await timed(settle_usages_for_test)()
    with pytest.raises(RuntimeError):
        await timed(failing_timer_for_test)()

    labels = {"timer": "settle_usages_for_test"}
    assert _sample("echolm_timer_seconds_count", labels) == 2
    assert _sample("echolm_timer_seconds_sum", labels) == pytest.approx(0.06, abs=0.03)
    assert _sample("echolm_timer_seconds_count", {"timer": "failing_timer_for_test"}) == 1
    assert timed(settle_usages_for_test).__name__ == "settle_usages_for_test"  # faust names the task after it


def test_each_event_s_wait_since_production_is_observed_per_stage():
    def event(timestamp: float | None) -> SimpleNamespace:
        return SimpleNamespace(message=SimpleNamespace(timestamp=timestamp))

    labels = {"stage": "retrieve-for-test"}
    observe_waits("retrieve-for-test", [event(100.0), event(100.5), event(None), event(101.2)], taken_at=101.0)

    assert _sample("echolm_stage_wait_seconds_count", labels) == 3  # no timestamp: not counted
    # 1.0 + 0.5 + 0 (a create time after the take, another machine's clock, counts as no wait)
    assert _sample("echolm_stage_wait_seconds_sum", labels) == pytest.approx(1.5)

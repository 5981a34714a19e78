"""corral.retry: Retry-After parsing, backoff, bounded attempts (no real waiting)."""

from __future__ import annotations

import email.utils

import pytest

from corral.errors import LLMError, RateLimitError
from corral.retry import (
    backoff_delay,
    parse_retry_after,
    run_with_backoff,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize("headers, expected", [
    ({"Retry-After": "7"}, 7.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "250"}, 0.25),
    ({"Retry-After-Ms": "250", "Retry-After": "9"}, 0.25),
    ({"Retry-After": email.utils.formatdate(NOW + 42, usegmt=True)}, 42.0),
    ({"Retry-After": email.utils.formatdate(NOW - 42, usegmt=True)}, 0.0),
    ({"Retry-After": "99999999"}, 3600.0),
    ({"Retry-After": "-5"}, 0.0),
    ({"Retry-After": "soon"}, None),
    ({}, None),
])
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == expected


def test_backoff_grows_caps_and_jitters_down() -> None:
    delays = [backoff_delay(n, base_s=0.5, cap_s=8.0, rand=lambda: 0.0) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff_delay(3, base_s=0.5, cap_s=8.0, rand=lambda: 1.0) == 1.5


async def test_run_with_backoff_bounded_attempts() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    async def attempt(n: int) -> str:
        calls.append(n)
        raise LLMError("boom", retryable=True)

    with pytest.raises(LLMError):
        await run_with_backoff(attempt, attempts=3, should_retry=lambda e: True,
                               sleep=sleep, rand=lambda: 0.0)
    assert calls == [1, 2, 3]
    assert sleeps == [0.5, 1.0]


async def test_run_with_backoff_does_not_wait_out_a_long_retry_after() -> None:
    calls = 0

    async def attempt(n: int) -> str:
        nonlocal calls
        calls += 1
        raise RateLimitError("limit", retry_after_s=600.0)

    async def sleep(s: float) -> None:
        raise AssertionError("must not sleep 600s")

    with pytest.raises(RateLimitError):
        await run_with_backoff(attempt, attempts=3, should_retry=lambda e: True,
                               retry_after=lambda e: 600.0, sleep=sleep)
    assert calls == 1

"""Retry policy shared by the LLM client and the executor.

``parse_retry_after`` reads what a peer asked for; ``backoff_delay`` is exponential with jitter;
``run_with_backoff`` runs an attempt function a bounded number of times. Sleep and randomness are
injectable so tests never wait for real time.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

T = TypeVar("T")

MAX_RETRY_AFTER_S = 3600.0
# 429 Too Many Requests, and Anthropic's 529 Overloaded.
RATE_LIMIT_STATUSES = frozenset({429, 529})
# Worth another try soon: rate limits, and a server or gateway that is briefly unavailable.
# A 500 is not: a local server answers it for a request it will never accept (llama.cpp's
# "tools param requires --jinja flag").
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504, 529})

Sleep = Callable[[float], Awaitable[None]]


def parse_retry_after(
    headers: Mapping[str, str], *, now: float | None = None, cap_s: float = MAX_RETRY_AFTER_S
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP-date).

    Returns ``None`` when the server said nothing usable. Values are clamped to ``[0, cap_s]``.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return _clamp(float(raw_ms) / 1000.0, cap_s)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return _clamp(float(raw), cap_s)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return _clamp(when.timestamp() - current, cap_s)


def _clamp(value: float, cap_s: float) -> float | None:
    if value != value:  # NaN
        return None
    return max(0.0, min(value, cap_s))


def backoff_delay(
    attempt: int,
    *,
    base_s: float = 0.5,
    cap_s: float = 8.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retry ``attempt`` (1-based): ``min(base*2^(n-1), cap)`` less up to 25%."""
    raw = min(base_s * 2.0 ** max(attempt - 1, 0), cap_s)
    return raw * (1.0 - 0.25 * rand())


async def run_with_backoff(
    attempt_fn: Callable[[int], Awaitable[T]],
    *,
    attempts: int = 3,
    should_retry: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException], float | None] = lambda _exc: None,
    base_s: float = 0.5,
    cap_s: float = 8.0,
    max_wait_s: float = 120.0,
    sleep: Sleep = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """Call ``attempt_fn(n)`` for n = 1..attempts until it returns.

    An exception for which ``should_retry`` is false, or one on the last attempt, propagates.
    A server-given delay is honoured when it is within ``max_wait_s``; a longer one is not
    waited out here (the caller's queue is the better place to wait that long).
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return await attempt_fn(attempt)
        except Exception as exc:
            if attempt == attempts or not should_retry(exc):
                raise
            asked = retry_after(exc)
            if asked is not None and asked > max_wait_s:
                raise
            delay = asked if asked is not None else backoff_delay(
                attempt, base_s=base_s, cap_s=cap_s, rand=rand
            )
            await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover

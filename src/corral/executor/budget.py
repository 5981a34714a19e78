"""Spend caps per agent and in total, per day and per month of the daemon's local calendar.

An agent whose recorded spend for the period has reached its cap is paused exactly as a
cool-down pauses it: nothing new starts there until the period ends (what runs finishes); its
pinned tasks wait, unpinned ones go to other agents. The spend is read from the store's daily
usage counters (kept by the transactions that record executions), never added up in memory,
so a restart or several daemons see the same figure. A log line warns once per period when a
cap is nearly reached.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral.config import BudgetSettings
from corral.storage.base import Store

log = logging.getLogger(__name__)

TOTAL = "total"


@dataclass(frozen=True, slots=True)
class Pause:
    until: float
    reason: str


def _day(ts: float) -> dt.date:
    return dt.date.fromtimestamp(ts)


def _midnight_after(day: dt.date) -> float:
    return time.mktime((day + dt.timedelta(days=1)).timetuple())


def _first_of_next_month(day: dt.date) -> float:
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return time.mktime(dt.date(year, month, 1).timetuple())


class Budgets:
    """The caps of ``[budget]`` against the store's spend; ``refresh`` after every execution."""

    def __init__(self, store: Store, settings: BudgetSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.spend_today: dict[str, float] = {}
        self.spend_month: dict[str, float] = {}
        self._pauses: dict[str, Pause] = {}
        self._warned: set[tuple[str, str, str]] = set()
        self._read_on: dt.date | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.daily_usd or self.settings.monthly_usd)

    async def refresh(self) -> None:
        """Read this day's and month's spend and work out which agents are paused."""
        if not self.enabled:
            return
        today = _day(self.clock())
        self._read_on = today
        self.spend_today = await self.store.spend_since(today.isoformat())
        self.spend_month = await self.store.spend_since(today.replace(day=1).isoformat())
        for spend in (self.spend_today, self.spend_month):
            spend[TOTAL] = sum(v for k, v in spend.items() if k != TOTAL)
        self._pauses = {}
        periods = (("daily", self.settings.daily_usd, self.spend_today, _midnight_after(today)),
                   ("monthly", self.settings.monthly_usd, self.spend_month,
                    _first_of_next_month(today)))
        for period, caps, spend, ends in periods:
            for name, cap in caps.items():
                spent = spend.get(name, 0.0)
                if spent >= cap:
                    self._pause(name, Pause(ends, f"spent ${spent:.4g} of its {period} cap"
                                                  f" of ${cap:.4g}"))
                elif spent >= cap * self.settings.warn_at:
                    self._warn(name, period, today.isoformat(), spent, cap)

    def _pause(self, name: str, pause: Pause) -> None:
        known = self._pauses.get(name)
        if known is None or pause.until > known.until:
            self._pauses[name] = pause

    def _warn(self, name: str, period: str, day: str, spent: float, cap: float) -> None:
        key = (name, period, day if period == "daily" else day[:7])
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s has spent $%.4g of its %s cap of $%.4g", name, spent, period, cap)

    def stale(self) -> bool:
        """Whether the day turned since the spend was read (a new period, new figures)."""
        return self.enabled and self._read_on != _day(self.clock())

    def paused(self, agent: str) -> Pause | None:
        """Why and until when ``agent`` takes no new work (its own cap, or the total's)."""
        now = self.clock()
        found = [p for p in (self._pauses.get(agent), self._pauses.get(TOTAL))
                 if p is not None and p.until > now]
        return max(found, key=lambda p: p.until) if found else None

    def next_end(self) -> float | None:
        """When the earliest pause ends (the dispatcher wakes then)."""
        now = self.clock()
        ends = [p.until for p in self._pauses.values() if p.until > now]
        return min(ends) if ends else None

    def describe(self, agent: str) -> dict[str, object]:
        """What ``corral agents`` shows of an agent's spend."""
        if not self.enabled:
            return {}
        pause = self.paused(agent)
        return {
            "spend_today_usd": round(self.spend_today.get(agent, 0.0), 6),
            "spend_month_usd": round(self.spend_month.get(agent, 0.0), 6),
            "daily_cap_usd": self.settings.daily_usd.get(agent),
            "monthly_cap_usd": self.settings.monthly_usd.get(agent),
            "paused_until": pause.until if pause else None,
            "paused_because": pause.reason if pause else None,
        }

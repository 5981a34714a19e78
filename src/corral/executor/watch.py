"""Wake-ups for whoever waits on something the pool does: a task ending, a log growing.

A waiter registers *before* it looks at the state it waits on, then waits; whatever happens
after it registered wakes it, so nothing is missed and nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Iterator


class Watchers:
    """Events per key; :meth:`notify` sets every event registered for a key."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, key: Hashable) -> Iterator[asyncio.Event]:
        """An event set by every :meth:`notify` of ``key`` while the block runs."""
        event = asyncio.Event()
        self._waiting.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[key]

    def notify(self, key: Hashable) -> None:
        for event in self._waiting.get(key, ()):
            event.set()

    def __len__(self) -> int:
        """How many waiters are registered (a follower that left must not linger)."""
        return sum(len(events) for events in self._waiting.values())


class Feed:
    """Which keys changed since each subscriber last looked (a live view's feed).

    A subscriber gets each changed key once however often it changed meanwhile, so a slow
    reader costs memory for the keys, never a growing queue of events.
    """

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        subscription = Subscription()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    def publish(self, key: Hashable) -> None:
        for subscription in self._subscribers:
            subscription.changed.add(key)
            subscription.event.set()

    def __len__(self) -> int:
        return len(self._subscribers)


class Subscription:
    def __init__(self) -> None:
        self.changed: set[Hashable] = set()
        self.event = asyncio.Event()

    async def next(self) -> set[Hashable]:
        """The keys changed since the last call, once there is at least one."""
        await self.event.wait()
        self.event.clear()
        changed, self.changed = self.changed, set()
        return changed

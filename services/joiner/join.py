"""The join state machine, free of I/O so it can be tested on its own.

Impressions and clicks meet on (request id, item id). A click on a known impression yields a
positive at once; an impression whose window passes without a click yields a negative; a click
that arrives before its impression waits for it until the window passes (then it is an orphan).
Keys stay remembered for ``3 × window`` after they resolve so duplicates are recognised.
Time is processing time, passed in by the caller.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from freshet.events.v1 import events_pb2

Key = tuple[str, int]


@dataclass
class Held:
    """An event waiting in the window, with the handle used to acknowledge it later."""

    event: Any
    handle: Any
    deadline: float


@dataclass(frozen=True)
class Resolution:
    """A labelled impression, and the input handles to acknowledge once it is published."""

    impression: events_pb2.Impression
    label: float
    handles: tuple[Any, ...]


@dataclass
class JoinState:
    window_s: float
    impressions: dict[Key, Held] = field(default_factory=dict)
    early_clicks: dict[Key, Held] = field(default_factory=dict)
    resolved: dict[Key, float] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def on_impression(self, imp: events_pb2.Impression, handle: Any, now: float) -> Resolution | None:
        """Holds an impression; returns a positive when its click came first. ``None``: nothing to emit."""
        key = (imp.request_id, imp.item_id)
        self.counts["impressions"] += 1
        if key in self.resolved or key in self.impressions:
            self.counts["duplicate_impressions"] += 1
            return Resolution(imp, -1.0, (handle,))  # label -1: nothing to emit, just acknowledge
        click = self.early_clicks.pop(key, None)
        if click is not None:
            self.resolved[key] = now + 3 * self.window_s
            self.counts["positives"] += 1
            return Resolution(imp, 1.0, (handle, click.handle))
        self.impressions[key] = Held(imp, handle, now + self.window_s)
        return None

    def on_click(self, action: events_pb2.Action, handle: Any, now: float) -> Resolution | None:
        """Joins a click with its impression; returns the positive, or ``None`` while it waits."""
        key = (action.request_id, action.item_id)
        self.counts["clicks"] += 1
        held = self.impressions.pop(key, None)
        if held is not None:
            self.resolved[key] = now + 3 * self.window_s
            self.counts["positives"] += 1
            return Resolution(held.event, 1.0, (held.handle, handle))
        if key in self.resolved or key in self.early_clicks:
            self.counts["duplicate_clicks"] += 1
            return Resolution(events_pb2.Impression(), -1.0, (handle,))
        self.early_clicks[key] = Held(action, handle, now + self.window_s)
        return None

    def expire(self, now: float) -> tuple[list[Resolution], list[Any]]:
        """Negatives for impressions whose window passed, and handles of orphaned clicks to acknowledge."""
        negatives = []
        for key in [k for k, h in self.impressions.items() if h.deadline <= now]:
            held = self.impressions.pop(key)
            self.resolved[key] = now + 2 * self.window_s
            self.counts["negatives"] += 1
            negatives.append(Resolution(held.event, 0.0, (held.handle,)))
        orphans = []
        for key in [k for k, h in self.early_clicks.items() if h.deadline <= now]:
            orphans.append(self.early_clicks.pop(key).handle)
            self.counts["orphan_clicks"] += 1
        for key in [k for k, until in self.resolved.items() if until <= now]:
            del self.resolved[key]
        return negatives, orphans

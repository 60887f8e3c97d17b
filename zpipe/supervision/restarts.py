"""When a replica that died is started again: exponential backoff, and when it is flapping.

A stage with ``restart = "on-failure"`` has each replica that exits without
finishing started again under the same name, after a backoff that doubles
from FIRST_BACKOFF to MAX_BACKOFF with each death inside ``restart_window``
seconds. More than ``max_restarts`` deaths of one replica within the window
and the stage is flapping: the run fails, saying so (as circus and
Kubernetes' CrashLoopBackOff do, a replica that dies at once every time is
not worth starting for ever).
"""

from __future__ import annotations

import collections

FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0


class RestartPolicy:
    """The deaths of one replica, and what follows from the next one."""

    def __init__(self, max_restarts: int, window: float):
        self.max_restarts = max_restarts
        self.window = window
        self.deaths: collections.deque[float] = collections.deque()
        self.restarts = 0  # in all, over the whole run

    def died(self, now: float) -> float | None:
        """A death at ``now``: the seconds to wait before starting it again, or None
        when that would be more than max_restarts within the window (flapping)."""
        deaths = self.deaths
        deaths.append(now)
        while deaths and now - deaths[0] > self.window:
            deaths.popleft()
        if len(deaths) > self.max_restarts:
            return None
        self.restarts += 1
        return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (len(deaths) - 1))

    def recent(self) -> int:
        """Deaths within the window, the last one included."""
        return len(self.deaths)

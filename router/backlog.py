"""When a rank's in-flight requests can be expected to end: each running
request's remaining output budget at the rank's pace (`pace.py`), the
waiting ones then taking the slots as they free (`completion_times`); read
later as a view (`Ends`), and how long until some of them have ended
(`wait_for_slots`). Admission's retry delays and deadline checks rest on it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import overload

from router.ledger import Backlog


def completion_times(backlog: Backlog) -> list[float] | None:
    """Seconds from now at which each in-flight request of a rank can be
    expected to end, soonest first; None while its pace is not known.

    A running request ends its budget at the rank's pace with the batch it
    runs now, from when it got its slot, and, the more of its budget it has
    produced, at its own pace so far (a few first tokens say little). The
    others wait, take the slots as they free up and run in a full batch."""
    pace = backlog.pace
    capacity = backlog.slots
    now_running = min(len(backlog.running), capacity) or 1
    in_batch, in_full_batch = pace.request_s_at(now_running), pace.request_s_at(capacity)
    floor = pace.itl_at(now_running)  # one step: none ends sooner
    if in_batch is None or in_full_batch is None or floor is None:
        return None
    running = [
        _remaining_s(in_batch(prompt, budget), budget, elapsed, tokens, floor)
        for prompt, budget, elapsed, tokens in backlog.running
    ]
    queue: deque[tuple[int, int]] = deque(backlog.waiting)
    while queue and len(running) < capacity:  # a bound lowered, or a slot not yet noted
        running.append(in_full_batch(*queue.popleft()))
    heapq.heapify(running)
    ends = []
    while running:
        end = heapq.heappop(running)
        ends.append(end)
        if queue:
            heapq.heappush(running, end + in_full_batch(*queue.popleft()))
    return ends


def _remaining_s(whole_s: float, budget: int, elapsed: float, tokens: int, floor: float) -> float:
    """Seconds left to a running request that takes `whole_s` at the rank's
    pace, `elapsed` since its slot, with `tokens` of its `budget` out."""
    by_rank = max(whole_s - elapsed, 0.0)
    by_itself = (budget - tokens) * elapsed / tokens if tokens else by_rank
    done = min(tokens / budget, 1.0) if budget else 1.0
    return max(done * by_itself + (1 - done) * by_rank, floor)


class Ends(Sequence[float]):
    """A rank's in-flight requests' expected ends (`completion_times`) as
    seen `elapsed` seconds later: each less that time, at least 0. A view,
    not a copy: a refusal reads one or two of the hundreds a rank has."""

    def __init__(self, ends: Sequence[float], elapsed: float) -> None:
        self._ends = ends
        self._elapsed = elapsed

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> float: ...
    @overload
    def __getitem__(self, i: slice) -> list[float]: ...
    def __getitem__(self, i: int | slice) -> float | list[float]:
        if isinstance(i, slice):
            return [max(end - self._elapsed, 0.0) for end in self._ends[i]]
        return max(self._ends[i] - self._elapsed, 0.0)


def wait_for_slots(ends: Sequence[float] | None, count: int) -> float | None:
    """Seconds until `count` of the requests have ended (0 for none); None
    when not known."""
    if count <= 0:
        return 0.0
    if ends is None or count > len(ends):
        return None
    return ends[count - 1]

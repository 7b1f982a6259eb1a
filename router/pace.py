"""How fast a rank works: the time of one engine step by how many requests
the step runs, and prompt tokens per second to a first token.

A step gives each request it runs one token, so the step time is each
request's time between two tokens. It grows with the batch: on a CPU about
in proportion, on a GPU much less. One figure measured at one load says
little of another, which is what deadline admission must judge (admitting
one more request slows every request its rank runs), so the steps are kept
by batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Weight of the newest step in its batch size's moving average: steps come
# many a second, about the last twenty count. The first steps of a batch
# size are averaged evenly, and it counts once it has MIN_STEPS: one step
# can take many times another of the same batch (a burst's prefill, the
# host's other work).
STEP_WEIGHT = 0.05
MIN_STEPS = 8
# An estimate is kept above this share of the quickest step seen: a line
# through two close, noisy points can run down to zero.
FLOOR_SHARE = 0.25


@dataclass(frozen=True)
class Pace:
    """A rank's recent steps, one point per range of batch sizes, and its
    prefill rate (empty, None: not known yet)."""

    # (requests the step ran, seconds it took): moving averages, by batch size.
    steps: tuple[tuple[float, float], ...] = ()
    prefill_tps: float | None = None  # prompt tokens per second to the first token

    @property
    def known(self) -> bool:
        return bool(self.steps)

    def itl_at(self, running: int) -> float | None:
        """Seconds between two tokens of a request while the rank runs
        `running` requests: between the batch sizes seen, on the line
        through the nearest two; beyond them, on the line through the last
        two (in proportion when only one was seen)."""
        points = self.steps
        if not points:
            return None
        n = max(running, 1)
        if len(points) == 1:
            ((seen, seconds),) = points
            estimate = seconds * n / seen
        else:
            i = next((i for i in range(1, len(points) - 1) if n <= points[i][0]), len(points) - 1)
            (n0, s0), (n1, s1) = points[i - 1], points[i]
            estimate = s0 + (s1 - s0) * (n - n0) / (n1 - n0)
        return max(estimate, FLOOR_SHARE * min(seconds for _, seconds in points))

    def first_token_s(self, prompt_tokens: int, running: int) -> float | None:
        if self.prefill_tps is not None:
            return prompt_tokens / self.prefill_tps
        return self.itl_at(running)

    def _first_token_s(self, prompt_tokens: int, itl: float) -> float:
        return prompt_tokens / self.prefill_tps if self.prefill_tps is not None else itl

    def request_s(self, prompt_tokens: int, budget: int, running: int) -> float | None:
        """Seconds a request takes from its slot, its prompt then its whole
        output budget, while the rank runs `running` requests."""
        at_batch = self.request_s_at(running)
        return None if at_batch is None else at_batch(prompt_tokens, budget)

    def request_s_at(self, running: int) -> Callable[[int, int], float] | None:
        """`request_s` of many requests at one batch size, the step time
        looked up once: (prompt tokens, budget) -> seconds."""
        itl = self.itl_at(running)
        if itl is None:
            return None

        def request_s(prompt_tokens: int, budget: int) -> float:
            return self._first_token_s(prompt_tokens, itl) + budget * itl

        return request_s


@dataclass
class _Steps:
    """The steps of one range of batch sizes."""

    count: int = 0
    batch: float = 0.0  # mean requests run
    seconds: float = 0.0  # mean time

    def add(self, batch: int, seconds: float) -> None:
        self.count += 1
        weight = max(1 / self.count, STEP_WEIGHT)
        self.batch += weight * (batch - self.batch)
        self.seconds += weight * (seconds - self.seconds)


class StepTimes:
    """One engine's step times, as it reports its steps. `capacity`: the
    requests it runs at once (vLLM's max_num_seqs)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ranges: dict[int, _Steps] = {}  # by batch size's bit length
        self._last: tuple[float, bool] | None = None  # (when, whether it had work)

    def note(self, at: float, running: int, waiting: int) -> None:
        """A step ended at `at` (the engine's clock) with `running` requests
        running and `waiting` waiting. After a step that left work, the next
        began at once: the time between their ends is the later one's.
        Steps that left prompts waiting while slots were free are not kept:
        a burst's prompts then fill them, and such a step's time is theirs
        (prefilling many prompts takes far longer than a decode step)."""
        last, self._last = self._last, (at, running + waiting > 0)
        if last is None or not last[1] or running == 0 or at <= last[0]:
            return
        if waiting and running < self._capacity:
            return
        self._ranges.setdefault(running.bit_length(), _Steps()).add(running, at - last[0])

    def points(self) -> tuple[tuple[float, float], ...]:
        ranges = [self._ranges[key] for key in sorted(self._ranges)]
        return tuple((r.batch, r.seconds) for r in ranges if r.count >= MIN_STEPS)

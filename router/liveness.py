"""Whether a rank is alive: a pure function of the evidence about it.

Busy is not dead. An engine answers the router only between two steps, and a
step of several seconds is normal work (a long prefill, a big batch,
first-use compilation, preemption recompute). Silence alone therefore proves
nothing while the rank server's vitals (`router/vitals.py`) show its engine
process running and using CPU. What does prove a failure:
- dead: the engine's connection to the router dropped, or its process exited;
- stopped: its process is stopped (SIGSTOP);
- hung: it runs but uses no CPU and answers nothing, or it has used CPU
  for `busy_timeout_s` without a single output or answer (a livelock);
- unreachable: no answer, no output and no vitals (the rank server was
  stopped, its host went down, or the network was cut).
A rank that sends no vitals at all (a rank server without them, or UDP
blocked) is judged on probes and outputs alone, as silence for
`timeout_s`: there a long step cannot be told from a hang.

The watchdog (`router/watchdog.py`) gathers the evidence; this module only
decides. Durations are in the router's own running time (see the watchdog).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from router.vitals import EngineState


@dataclass(frozen=True)
class Timeouts:
    timeout_s: float = 3.0  # silence that needs explaining
    busy_timeout_s: float = 300.0  # the longest a working engine may go without output
    join_grace_s: float = 9.0  # for the first answer after a rank (re)joined
    stop_confirm_s: float = 0.5  # a stop this long is not a passing state
    replace_after_s: float = 30.0  # unhealthy and silent: give it a new engine client


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True)
class Evidence:
    """What the router knows about one rank at one moment."""

    healthy: bool  # the rank's state now
    silent_s: float  # since its last answer to a probe or output
    since_join_s: float
    answered_since_join: bool
    # A probe sent after the rank was last failed has been answered.
    answered_since_failure: bool
    # Its own connection dropped, and it has not answered a probe sent since.
    connection_dropped: bool = False
    # A connection shared with other ranks dropped, and this rank has not
    # answered a probe sent after the drop (coupled topology).
    shared_drop_unanswered: bool = False
    vitals_age_s: float | None = None  # None: it never sent any
    engine: EngineState | None = None  # as its latest vitals say
    stopped_s: float = 0.0  # how long its vitals have said stopped
    cpu_idle_s: float | None = None  # since its engine's CPU time last advanced
    unhealthy_s: float = 0.0  # since it was failed (0 while healthy)


class Condition(enum.Enum):
    ALIVE = "alive"
    BUSY = "busy"
    JOINING = "joining"
    RECOVERING = "recovering"  # looks alive again, waiting for a fresh answer
    DEAD = "dead"
    STOPPED = "stopped"
    HUNG = "hung"
    UNREACHABLE = "unreachable"


_HEALTHY = {Condition.ALIVE, Condition.BUSY, Condition.JOINING}


@dataclass(frozen=True)
class Verdict:
    condition: Condition
    reason: str
    # Give it a new engine client: its old one cannot recover (the engine
    # behind it is gone, or has been silent for long).
    replace: bool = False

    @property
    def healthy(self) -> bool:
        return self.condition in _HEALTHY


def judge(e: Evidence, t: Timeouts = DEFAULT_TIMEOUTS) -> Verdict:
    """The rank's verdict. A failed rank serves again only once a probe sent
    after its failure has been answered: outputs the router reads late may
    have left the engine before."""
    verdict = _condition(e, t)
    if not e.healthy:
        if verdict.healthy and not e.answered_since_failure:
            return Verdict(Condition.RECOVERING, f"{verdict.reason}; waiting for a new answer")
        if not verdict.healthy and e.unhealthy_s >= t.replace_after_s:
            return Verdict(verdict.condition, verdict.reason, replace=True)
    return verdict


def _condition(e: Evidence, t: Timeouts) -> Verdict:
    fresh = e.vitals_age_s is not None and e.vitals_age_s < t.timeout_s
    engine = e.engine if fresh else None
    silent = f"{e.silent_s:.1f} s"
    if e.connection_dropped:
        return Verdict(Condition.DEAD, "its connection to the router dropped", replace=True)
    if engine is EngineState.GONE:
        return Verdict(Condition.DEAD, "its engine process exited", replace=True)
    if engine is EngineState.STOPPED and (
        e.stopped_s >= t.stop_confirm_s or e.silent_s >= t.timeout_s
    ):
        return Verdict(Condition.STOPPED, f"its engine process is stopped ({e.stopped_s:.1f} s)")
    if e.shared_drop_unanswered and engine not in (EngineState.RUNNING, EngineState.STOPPED):
        return Verdict(
            Condition.DEAD, "an engine of its shared connection dropped, and it did not answer"
        )
    if e.silent_s < t.timeout_s:
        return Verdict(Condition.ALIVE, f"answered or sent output {silent} ago")
    if not e.answered_since_join and e.since_join_s < t.join_grace_s:
        return Verdict(Condition.JOINING, f"joined {e.since_join_s:.1f} s ago, no answer yet")
    if engine is EngineState.STARTING:
        return Verdict(
            Condition.DEAD, "its rank server has no engine process (restarting?)", replace=True
        )
    if engine is EngineState.RUNNING:
        if e.cpu_idle_s is None or e.cpu_idle_s >= t.timeout_s:
            return Verdict(
                Condition.HUNG, f"its engine runs but used no CPU and answered nothing for {silent}"
            )
        if e.silent_s >= t.busy_timeout_s:
            return Verdict(
                Condition.HUNG,
                f"its engine used CPU but sent no output or answer for {silent} "
                f"(over the busy timeout of {t.busy_timeout_s:.0f} s)",
            )
        return Verdict(
            Condition.BUSY, f"no answer for {silent}, but its engine runs and uses CPU: a long step"
        )
    if e.vitals_age_s is not None:
        return Verdict(
            Condition.UNREACHABLE,
            f"no answer, no output and no vitals for {min(e.silent_s, e.vitals_age_s):.1f} s",
        )
    return Verdict(
        Condition.HUNG,
        f"no answer and no output for {silent} "
        "(it sends no vitals to tell a long step from a hang)",
    )

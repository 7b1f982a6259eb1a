"""The liveness verdict as a table of scenarios, in plain data."""

from __future__ import annotations

import contextlib
import dataclasses
import socket

import pytest

from router.liveness import Condition, Evidence, Timeouts, judge
from router.vitals import VITALS_INTERVAL_S, EngineState, RankVitals, Vitals
from server.vitals import VitalsReporter

T = Timeouts(timeout_s=3.0, busy_timeout_s=300.0, join_grace_s=9.0, replace_after_s=30.0)
# A healthy rank that answered a moment ago, its vitals fresh and working.
ANSWERING = Evidence(
    healthy=True,
    silent_s=0.2,
    since_join_s=100.0,
    answered_since_join=True,
    answered_since_failure=True,
    vitals_age_s=0.2,
    engine=EngineState.RUNNING,
    cpu_idle_s=0.1,
)
# Long silent, as in an engine step of many seconds.
SILENT = dataclasses.replace(ANSWERING, silent_s=20.0)


def case(**changes: object) -> Evidence:
    return dataclasses.replace(SILENT, **changes)  # type: ignore[arg-type]


SCENARIOS = [
    ("answering", ANSWERING, Condition.ALIVE, False),
    ("a long step: running, CPU advancing", SILENT, Condition.BUSY, False),
    ("a step past the busy timeout", case(silent_s=301.0), Condition.HUNG, False),
    ("running, no CPU, no answer", case(cpu_idle_s=5.0), Condition.HUNG, False),
    ("running, CPU never seen advancing", case(cpu_idle_s=None), Condition.HUNG, False),
    ("killed: its connection dropped", case(silent_s=0.1, connection_dropped=True), Condition.DEAD, True),
    ("engine process exited", case(silent_s=0.5, engine=EngineState.GONE), Condition.DEAD, True),
    ("engine stopped 1 s, still answering late", case(silent_s=0.5, engine=EngineState.STOPPED, stopped_s=1.0), Condition.STOPPED, False),
    ("engine stopped a moment ago", case(silent_s=0.5, engine=EngineState.STOPPED, stopped_s=0.2), Condition.ALIVE, False),
    ("engine stopped, silent", case(engine=EngineState.STOPPED, stopped_s=0.2), Condition.STOPPED, False),
    ("rank server restarting: no engine", case(engine=EngineState.STARTING), Condition.DEAD, True),
    ("rank server stopped or cut off: vitals stale", case(vitals_age_s=4.0), Condition.UNREACHABLE, False),
    ("stale vitals say running: not trusted", case(vitals_age_s=4.0, engine=EngineState.RUNNING), Condition.UNREACHABLE, False),
    ("stale vitals say gone: not trusted", case(silent_s=0.5, vitals_age_s=4.0, engine=EngineState.GONE), Condition.ALIVE, False),
    ("no vitals ever, answering", case(silent_s=1.0, vitals_age_s=None, engine=None, cpu_idle_s=None), Condition.ALIVE, False),
    ("no vitals ever, silent", case(silent_s=3.5, vitals_age_s=None, engine=None, cpu_idle_s=None), Condition.HUNG, False),
    ("just joined, no answer yet", case(since_join_s=5.0, silent_s=5.0, answered_since_join=False, cpu_idle_s=None), Condition.JOINING, False),
    ("joined long ago, never answered, no vitals", case(since_join_s=10.0, silent_s=10.0, answered_since_join=False, vitals_age_s=None, engine=None), Condition.HUNG, False),
    ("shared connection dropped, it did not answer, no vitals", case(silent_s=1.0, shared_drop_unanswered=True, vitals_age_s=None, engine=None), Condition.DEAD, False),
    ("shared connection dropped, its vitals say running", case(silent_s=10.0, shared_drop_unanswered=True), Condition.BUSY, False),
    ("failed, answers again", case(healthy=False, silent_s=0.3, unhealthy_s=5.0), Condition.ALIVE, False),
    ("failed, looks alive, no answer since", case(healthy=False, silent_s=0.3, answered_since_failure=False, unhealthy_s=5.0), Condition.RECOVERING, False),
    ("failed, still cut off", case(healthy=False, vitals_age_s=10.0, unhealthy_s=10.0), Condition.UNREACHABLE, False),
    ("failed and cut off for long", case(healthy=False, vitals_age_s=40.0, unhealthy_s=31.0), Condition.UNREACHABLE, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("evidence", "condition", "replace"),
    [scenario[1:] for scenario in SCENARIOS],
    ids=[scenario[0] for scenario in SCENARIOS],
)
def test_verdict(evidence: Evidence, condition: Condition, replace: bool) -> None:
    verdict = judge(evidence, T)
    assert (verdict.condition, verdict.replace) == (condition, replace), verdict.reason
    assert verdict.healthy == (condition in {Condition.ALIVE, Condition.BUSY, Condition.JOINING})
    assert verdict.reason


def vitals(seq: int, cpu_s: float, sent_at: float, boot: str = "a", **kw: object) -> Vitals:
    fields: dict[str, object] = {"engine": EngineState.RUNNING, **kw}
    return Vitals(0, boot, seq, cpu_s=cpu_s, sent_at=sent_at, **fields)  # type: ignore[arg-type]


def test_vitals_round_trip_and_garbage() -> None:
    report = vitals(3, 1.5, 10.0, engine=EngineState.STOPPED)
    assert Vitals.decode(report.encode()) == report
    for garbage in (b"", b"{}", b"\xff\xfe", b'{"rank": "x"}', b"[1, 2]", b"null"):
        assert Vitals.decode(garbage) is None


def test_cpu_advancing_is_a_share_of_a_core_between_reports() -> None:
    rank = RankVitals(0.0, EngineState.RUNNING, "a")
    rank.update(vitals(1, 10.0, 100.0), now=1.0)
    rank.update(vitals(2, 10.2, 100.25), now=1.25)  # 80 % of a core
    assert rank.cpu_active_at == 1.25
    rank.update(vitals(3, 10.201, 100.5), now=1.5)  # 0.4 %: blocked
    assert rank.cpu_active_at == 1.25
    rank.update(vitals(2, 20.0, 100.75), now=1.75)  # late, out of order: ignored
    assert rank.cpu_active_at == 1.25
    rank.update(vitals(1, 0.0, 5.0, boot="b"), now=2.0)  # a restarted rank server
    assert (rank.boot, rank.cpu_active_at) == ("b", 0.0)


def test_stopped_since_the_first_report_that_says_so() -> None:
    rank = RankVitals(0.0, EngineState.RUNNING, "a")
    rank.update(vitals(1, 1.0, 1.0, engine=EngineState.STOPPED), now=1.0)
    rank.update(vitals(2, 1.0, 1.25, engine=EngineState.STOPPED), now=1.25)
    assert rank.stopped_since == 1.0
    rank.update(vitals(3, 1.0, 1.5), now=1.5)
    assert rank.stopped_since == 0.0


def test_a_rank_server_reports_its_engines_gone_as_they_exit() -> None:
    """The last report, in the same boot as the regular ones: vLLM's headless
    server exits as soon as its engine dies, often before the next sample."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as router:
        router.bind(("127.0.0.1", 0))
        router.settimeout(5.0)
        reporter = VitalsReporter(router.getsockname(), rank=3)
        reporter.start()
        first = Vitals.decode(router.recv(2048))
        reporter.engines_exited()
        reports = [Vitals.decode(router.recv(2048))]
        router.settimeout(3 * VITALS_INTERVAL_S)
        with contextlib.suppress(TimeoutError):
            while True:
                reports.append(Vitals.decode(router.recv(2048)))
    assert first is not None and first.rank == 3
    last = reports[-1]
    assert last is not None and last.engine is EngineState.GONE
    assert (last.boot, last.rank) == (first.boot, 3) and last.seq > first.seq

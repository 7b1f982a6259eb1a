"""The router's Prometheus metrics, served over HTTP by `--metrics-listen`.

Two kinds:
- events: requests by RPC and gRPC status, routing decisions by policy and
  reason, output tokens per rank (counted per message; `rate()` of it is
  tokens per second), and, once per request from its record
  (`progress.Progress`), its time to first token and per output token;
- state, read from the ledger at scrape time (`RankCollector`): per rank its
  state, in-flight requests, queued prompt tokens, the engine's waiting and
  running counts, KV-cache use, and its served / failed / cancelled totals.
  Nothing is copied: the ledger stays the one book of each rank.

The HTTP server runs in a thread of prometheus_client's, so a scrape
answers even while the event loop is busy; it reads the ledger's counters
without the loop (a snapshot of plain integers, each read whole).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.ledger import RankLoad, RankState
from router.progress import Progress

# Seconds. Tokens come every few ms from a small model on CPU and every
# 10-100 ms from a large one on a busy GPU; the first one can take seconds.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """The counters and histograms the router updates as requests go."""

    def __init__(self) -> None:
        # A registry of our own: the tests and each router instance start at zero.
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "dprouter_requests",
            "RPCs finished, by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self._decisions = Counter(
            "dprouter_routing_decisions",
            "Requests sent to a rank (retries included), by policy (or pin) and reason",
            ["policy", "reason"],
            registry=self.registry,
        )
        self._output_tokens = Counter(
            "dprouter_output_tokens",
            "Tokens generated, by the rank that generated them",
            ["rank"],
            registry=self.registry,
        )
        self._ttft = Histogram(
            "dprouter_time_to_first_token_seconds",
            "From the request's arrival to its first token (observed as it ends), by serving rank",
            ["rank"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self._tpot = Histogram(
            "dprouter_time_per_output_token_seconds",
            "Per request, the mean time between two tokens of a choice, by serving rank",
            ["rank"],
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )

        self._ranks: dict[int, _RankSeries] = {}

    def series(self, rank: int) -> _RankSeries:
        """The rank's series, looked up once: `labels()` costs more than an observation."""
        if (series := self._ranks.get(rank)) is None:
            label = str(rank)
            series = self._ranks[rank] = _RankSeries(
                self._output_tokens.labels(label),
                self._ttft.labels(label),
                self._tpot.labels(label),
            )
        return series

    def finished(self, method: str, code: str) -> None:
        self._requests.labels(method, code).inc()

    def routed(self, policy: str, reason: str) -> None:
        self._decisions.labels(policy, reason).inc()

    def output(self, rank: int, tokens: int) -> None:
        """One message of `tokens` tokens from `rank` went to a client."""
        if tokens:
            self.series(rank).output_tokens.inc(tokens)

    def ended(self, rank: int, progress: Progress) -> None:
        """A request that ran on `rank` ended: its timings, from its record."""
        series = self.series(rank)
        if (ttft := progress.time_to_first_token) is not None:
            series.ttft.observe(ttft)
        if (tpot := progress.time_per_output_token) is not None:
            series.tpot.observe(tpot)

    def watch(self, loads: Callable[[], Sequence[RankLoad]]) -> None:
        """Exports the ranks' state, read through `loads` at each scrape."""
        self.registry.register(RankCollector(loads))

    def serve(self, address: str) -> WSGIServer:
        """Serves /metrics on `address` (host:port; port 0 picks one) in a thread."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=self.registry
        )
        return server


@dataclass(frozen=True)
class _RankSeries:
    output_tokens: Counter
    ttft: Histogram
    tpot: Histogram


class RankCollector(Collector):
    """Each rank's state and counts from the ledger, at scrape time."""

    def __init__(self, loads: Callable[[], Sequence[RankLoad]]) -> None:
        self._loads = loads

    def collect(self) -> Iterator[Metric]:
        loads = self._loads()
        state = GaugeMetricFamily(
            "dprouter_rank_state",
            "1 for the rank's current state (serving, draining, unhealthy), 0 for the others",
            labels=["rank", "state"],
        )
        gauges = {
            "in_flight": GaugeMetricFamily(
                "dprouter_rank_in_flight",
                "Requests the router has on the rank",
                labels=["rank"],
            ),
            "queued_prompt_tokens": GaugeMetricFamily(
                "dprouter_rank_queued_prompt_tokens",
                "Prompt tokens of requests on the rank with no output yet",
                labels=["rank"],
            ),
            "waiting": GaugeMetricFamily(
                "dprouter_rank_engine_waiting",
                "Requests queued in the rank's engine, as it last reported (its queue depth)",
                labels=["rank"],
            ),
            "running": GaugeMetricFamily(
                "dprouter_rank_engine_running",
                "Requests running in the rank's engine, as it last reported",
                labels=["rank"],
            ),
            "kv_cache_usage": GaugeMetricFamily(
                "dprouter_rank_kv_cache_usage",
                "Fraction of the rank's KV cache in use, as its engine last reported",
                labels=["rank"],
            ),
        }
        outcomes = CounterMetricFamily(
            "dprouter_rank_requests",
            "Requests that left the rank, by outcome (served, failed, cancelled)",
            labels=["rank", "outcome"],
        )
        for load in loads:
            rank = str(load.rank)
            for each in RankState:
                state.add_metric([rank, each.value], 1.0 if load.state is each else 0.0)
            for field, family in gauges.items():
                family.add_metric([rank], float(getattr(load, field)))
            for outcome in ("served", "failed", "cancelled"):
                outcomes.add_metric([rank, outcome], float(getattr(load, outcome)))
        yield state
        yield from gauges.values()
        yield outcomes

"""The router's Prometheus endpoint, scraped before and after known traffic
on the session cluster; and the token timings on plain data."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from router.engine_types import EngineDelta
from router.ledger import Outcome
from router.metrics import Metrics
from router.progress import Progress
from tests.conftest import LONG_TOKENS

GENERATE = "dprouter.v1.GenerateService/Generate"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(url: str) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body: bytes = reply.read()
            return body.decode()

    return parse(await asyncio.to_thread(get))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def request(max_tokens: int, **fields: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt="count me",
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        **fields,  # type: ignore[arg-type]
    )


async def test_scrape_counts_known_traffic(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, metrics_url: str
) -> None:
    before = await scrape(metrics_url)
    for _ in range(3):
        _ = [r async for r in generate.Generate(request(5, data_parallel_rank=1))]
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [r async for r in generate.Generate(request(0))]  # max_tokens must be >= 1
    after = await scrape(metrics_url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("dprouter_requests_total", method=GENERATE, code="OK") == 3
    assert grew("dprouter_requests_total", method=GENERATE, code="INVALID_ARGUMENT") == 1
    assert grew("dprouter_routing_decisions_total", policy="pin", reason="data_parallel_rank") == 3
    assert grew("dprouter_output_tokens_total", rank="1") == 15
    assert grew("dprouter_time_to_first_token_seconds_count", rank="1") == 3
    assert grew("dprouter_time_to_first_token_seconds_sum", rank="1") > 0
    assert grew("dprouter_time_per_output_token_seconds_count", rank="1") == 3
    # Read from the ledger at scrape time.
    assert grew("dprouter_rank_requests_total", rank="1", outcome="served") == 3
    assert value(after, "dprouter_rank_in_flight", rank="1") == 0
    assert value(after, "dprouter_rank_state", rank="1", state="serving") == 1
    assert value(after, "dprouter_rank_state", rank="1", state="unhealthy") == 0


async def test_scrape_shows_in_flight_requests_and_drained_ranks(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
    metrics_url: str,
) -> None:
    call = generate.Generate(request(LONG_TOKENS, data_parallel_rank=0))
    async for _ in call:
        break  # running on rank 0
    await ranks.DrainRank(ranks_pb2.DrainRankRequest(rank=0))
    try:
        during = await scrape(metrics_url)
    finally:
        call.cancel()
        await ranks.ResumeRank(ranks_pb2.ResumeRankRequest(rank=0))
    assert value(during, "dprouter_rank_in_flight", rank="0") == 1
    assert value(during, "dprouter_rank_state", rank="0", state="draining") == 1
    assert value(during, "dprouter_rank_state", rank="0", state="serving") == 0
    after = await scrape(metrics_url)
    assert value(after, "dprouter_rank_state", rank="0", state="serving") == 1


def delta(index: int, tokens: int, finished: bool = False) -> EngineDelta:
    return EngineDelta(index, "", list(range(tokens)), [], None, "", finished, 0)


def test_a_request_is_timed_once_from_its_record() -> None:
    """Tokens are counted per message; the time to first token and per
    output token once, when the request ends, from its record."""
    metrics = Metrics()
    progress = Progress(arrived=time.monotonic())
    for index, tokens in [(0, 1), (1, 2), (0, 3), (1, 1), (0, 0)]:
        progress.output(delta(index, tokens))
        metrics.output(2, tokens)
    progress.output(delta(0, 0, finished=True))
    assert progress.completion_tokens == 7 and progress.outcome is Outcome.SERVED
    metrics.ended(2, progress)
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "dprouter_time_to_first_token_seconds_count", rank="2") == 1
    assert value(samples, "dprouter_output_tokens_total", rank="2") == 7
    assert value(samples, "dprouter_time_per_output_token_seconds_count", rank="2") == 1
    # Choice 0: 4 tokens, choice 1: 3; the mean of their gaps.
    (first0, last0, count0), (first1, last1, count1) = progress.choices.values()
    assert (count0, count1) == (4, 3)
    expected = ((last0 - first0) / 3 + (last1 - first1) / 2) / 2
    assert value(samples, "dprouter_time_per_output_token_seconds_sum", rank="2") == pytest.approx(
        expected
    )

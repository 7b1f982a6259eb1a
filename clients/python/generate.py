"""Streams a completion from dprouter, reads the served rank, and checks Health:
the Python example of the SDK (`dprouter.Client`), like the Go, TypeScript and
C++ ones in clients/. For a terminal, the `dprouter` command does more.

python -m clients.python.generate 127.0.0.1:50051 "The capital of France is"
"""

from __future__ import annotations

import sys

from dprouter import Client
from dprouter.calls import DEFAULT_ADDRESS
from dprouter.v1 import generate_pb2


def main(address: str = DEFAULT_ADDRESS, prompt: str = "The capital of France is") -> int:
    with Client(address, timeout=60) as client:
        sampling = generate_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        stream = client.generate(prompt, sampling=sampling)
        rank = -1
        for response in stream:
            # The first response names the rank; the response headers say it too.
            if response.HasField("data_parallel_rank"):
                rank = response.data_parallel_rank
                route = stream.route()
                print(f"rank: {rank} (x-data-parallel-rank: {route.rank}, "
                      f"x-route-reason: {route.reason})")  # fmt: skip
            print(response.text, end="", flush=True)
            if response.HasField("usage"):
                reason = generate_pb2.FinishReason.Name(response.finish_reason)
                tokens = response.usage.completion_tokens
                print(f"\nfinish: {reason.removeprefix('FINISH_REASON_')}, {tokens} tokens")
        overall, of_rank = client.health(), client.health(f"rank/{rank}")
        print(f"health: {overall} (rank/{rank}: {of_rank})")
        return 0 if overall == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

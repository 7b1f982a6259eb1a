"""Streams a completion from dprouter and prints tokens as they arrive.

python -m clients.python.generate "The capital of France is"
python -m clients.python.generate --chat "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import sys

import grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc


def build_request(args: argparse.Namespace) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos
        ),
        session_key=args.session or "",
    )
    if args.chat:
        request.messages.append(generate_pb2.ChatMessage(role="user", content=args.prompt))
    else:
        request.prompt = args.prompt
    if args.rank is not None:
        request.data_parallel_rank = args.rank
    return request


def main() -> int:
    parser = argparse.ArgumentParser(description="Stream a completion from dprouter.")
    parser.add_argument("prompt")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--rank", type=int, help="pin a data-parallel rank")
    parser.add_argument("--session", help="session key for affinity routing")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    args = parser.parse_args()

    with grpc.insecure_channel(args.address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        try:
            for response in stub.Generate(build_request(args), timeout=args.timeout):
                if response.HasField("data_parallel_rank"):
                    print(f"[rank {response.data_parallel_rank}] ", end="", file=sys.stderr)
                print(response.text, end="", flush=True)
                if response.HasField("usage"):
                    reason = generate_pb2.FinishReason.Name(response.finish_reason)
                    print(
                        f"\n[{reason}, {response.usage.completion_tokens} tokens]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
